"""``dfq run``: prompts -> generate -> quantize -> evaluate, with cached stages.

Every run folder holds ``config.yaml`` (resolved), ``versions.json``, ``run.log``,
``stages.json`` (the key of each finished stage), the stage outputs and
``results.json`` / ``results.md``. A stage whose key (a hash of everything that changes
its output) matches ``stages.json`` and whose output exists is reused, so a re-run of
the same config only does what is missing, and an interrupted one resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from dfquant.errors import DfqError
from dfquant.io import read_json, versions, write_json, write_text
from dfquant.validate import RunConfig, parse_bits


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Run:
    """A run folder with stage bookkeeping."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dir = Path(cfg.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stages_path = self.dir / "stages.json"
        self.stages: dict[str, str] = read_json(self.stages_path) if self.stages_path.exists() else {}

    def log(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(self.dir / "run.log", "a") as fh:
            fh.write(line + "\n")

    def cached(self, stage: str, key: str, output: Path) -> bool:
        return self.stages.get(stage) == key and output.exists()

    def done(self, stage: str, key: str) -> None:
        self.stages[stage] = key
        write_json(self.stages_path, self.stages)


def run(cfg: RunConfig, progress: bool = True) -> list[dict]:
    """Execute (or resume) the run described by ``cfg``; return one result row per bit setting."""
    import torch

    from dfquant.data.calib import load_calibration
    from dfquant.quant.bn import check_bn_mode

    bit_settings = [parse_bits(b) for b in cfg.bits]
    check_bn_mode(cfg.bn_recalib, "bn_recalib")
    torch.manual_seed(cfg.seed)
    from dfquant.models.source import ensure_input_size, resolve_model
    from dfquant.jobs import check_iters
    from dfquant.quant.algorithms import default_algorithm

    margs = _model_args(cfg)
    spec = resolve_model(margs)  # a bad model name or damaged weights must not leave a run folder behind
    folder = cfg.val or (cfg.source if cfg.source not in ("generated", "real", "distill") else None)
    spec = ensure_input_size(spec, folder)
    algo = cfg.algo if cfg.algo != "auto" else default_algorithm(spec.model)
    check_iters(algo, cfg.iters)
    r = Run(cfg)
    write_text(r.dir / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    write_json(r.dir / "versions.json", versions())
    r.log(f"run {r.dir}: {cfg.model} source={cfg.source} strategy={cfg.strategy} algo={algo} bits={cfg.bits}")

    calib_key, calib_src = _calibration_stage(r, spec, progress)
    calib = load_calibration(calib_src, spec, cfg.n, cfg.seed)
    if cfg.augment != "none":
        from dfquant.data.augment import augment, save_grid

        calib_key = _key(calib_key, cfg.augment, cfg.augment_alpha)
        plain, calib = calib, augment(calib, cfg.augment, cfg.augment_alpha, cfg.seed)
        save_grid(plain, calib, r.dir / "augment_grid.png", spec.mean, spec.std)
        r.log(f"augment: pixel-level {cfg.augment} (alpha {cfg.augment_alpha:g}) of the calibration set; "
              f"sample grid {r.dir / 'augment_grid.png'}")

    from dfquant.models.evaluate import evaluate

    model_key = [margs.preprocess_overrides(), cfg.weights, cfg.num_classes] if _model_args_given(cfg) else []
    fp_key = _key("fp", cfg.model, cfg.eval_limit, cfg.val, *model_key)  # old runs' keys stay valid
    fp_path = r.dir / "fp_top1.json"
    if r.cached("fp_eval", fp_key, fp_path):
        fp_top1 = read_json(fp_path)["fp_top1"]
    else:
        fp_top1 = evaluate(spec, val_dir=cfg.val, limit=cfg.eval_limit, progress=progress)
        write_json(fp_path, {"fp_top1": fp_top1, "eval_images": fp_top1.n})
        r.done("fp_eval", fp_key)
    r.log(f"FP top-1 {fp_top1:.2f}%" + _on(read_json(fp_path).get("eval_images")))

    rows = []
    for (wbits, abits), tag in zip(bit_settings, cfg.bits):
        qdir = r.dir / "quant" / tag.upper()
        key = _key("quant", calib_key, algo, wbits, abits, cfg.iters, cfg.batch_size, cfg.seed, cfg.eval_limit, cfg.val,
                   *([cfg.bn_recalib] if cfg.bn_recalib != "none" else []), *([cfg.target] if cfg.target else []),
                   *model_key)  # old runs' keys stay valid
        if r.cached(f"quant_{tag.upper()}", key, qdir / "results.json"):
            res = read_json(qdir / "results.json")
            r.log(f"{tag}: cached, top-1 {res['q_top1']:.2f}%" + _on(res.get("eval_images")))
        else:
            from dfquant.jobs import run_quantize

            r.log(f"{tag}: quantizing with {algo}, {cfg.iters} iterations per block")
            res = run_quantize(spec, calib_src, wbits, abits, algo, cfg.iters, cfg.n, cfg.batch_size, cfg.seed,
                               qdir, cfg.val, cfg.eval_limit, cfg.device, progress=progress, calib=calib, fp_top1=fp_top1,
                               bn_recalib=cfg.bn_recalib, augment=cfg.augment, augment_alpha=cfg.augment_alpha, target=cfg.target,
                               log=r.log)
            r.done(f"quant_{tag.upper()}", key)
            r.log(f"{tag}: top-1 {res['q_top1']:.2f}%{_on(res.get('eval_images'))} ({res['seconds']:.0f}s)")
        rows.append({"model": cfg.model, "source": cfg.source, "strategy": _strategy_label(cfg), "algo": algo,
                     "bits": tag.upper(), "wbits": wbits, "abits": abits, "n_calib": len(calib), "iters": cfg.iters,
                     "seed": cfg.seed, "fp_top1": round(fp_top1, 2), "q_top1": round(res["q_top1"], 2),
                     "quant_seconds": res["seconds"]})
    write_json(r.dir / "results.json", rows)
    write_text(r.dir / "results.md", results_table(rows))
    return rows


def _on(n: int | None) -> str:
    """' on N images' where the count is known (runs made before counts were recorded have none)."""
    return f" on {n} images" if n else ""


_MODEL_FIELDS = ("weights", "num_classes", "class_names", "size", "resize", "crop_pct", "interpolation", "mean", "std")


def _model_args_given(cfg: RunConfig) -> bool:
    return any(getattr(cfg, k) is not None for k in _MODEL_FIELDS)


def _model_args(cfg: RunConfig):
    """The run's model description, as every command takes it."""
    from dfquant.models.source import ModelArgs

    return ModelArgs(cfg.model, **{k: getattr(cfg, k) for k in _MODEL_FIELDS})


def _strategy_label(cfg: RunConfig) -> str:
    if cfg.source != "generated":
        label = cfg.source if cfg.source in ("real", "distill") else "folder"
    elif cfg.strategy == "mixup":
        label = f"mixup-{cfg.pairing}-k{cfg.k}"
    else:
        label = cfg.strategy
    return label + (f"+{cfg.augment}" if cfg.augment != "none" else "")


def _calibration_stage(r: Run, spec, progress: bool) -> tuple[str, str]:
    """Produce the calibration source for the run; return (stage key, source string)."""
    cfg = r.cfg
    if cfg.source == "real":
        return _key("real", cfg.n, cfg.seed), "real:A"
    if cfg.source == "distill":
        out = r.dir / "distill.safetensors"
        key = _key("distill", cfg.model, cfg.distill_method, cfg.distill_iters, cfg.n, cfg.seed,
                   *([cfg.weights, spec.input_size] if _model_args_given(cfg) else []),
                   *(["reference"] if cfg.distill_method != "genie-lite" else []))  # genie/zeroq follow their references
        if not r.cached("distill", key, out):
            from dfquant.io import save_tensors
            from dfquant.data.distill import distill

            r.log(f"distill: {cfg.n} images of {spec.input_size[-1]}px by BN-statistics inversion ({cfg.distill_method}, "
                  f"{cfg.distill_iters or 'the reference number of'} iters)")
            images = distill(spec.model, cfg.n, spec.input_size, cfg.distill_method, cfg.distill_iters, seed=cfg.seed,
                             device=cfg.device, progress=progress, resume=r.dir / "distill.partial")
            save_tensors(out, {"images": images})
            r.done("distill", key)
        return key, str(out)
    if cfg.source != "generated":
        if not Path(cfg.source).is_dir():
            raise DfqError(f"source {cfg.source!r} is not generated, real, distill or an existing folder of images")
        return _key("folder", str(Path(cfg.source).resolve())), cfg.source

    from dfquant.generate.pipeline import generate, load_pipeline, preset_for, resolve_dtype, sampling
    from dfquant.prompts import class_similarity, make_manifest, write_manifest

    manifest = r.dir / "prompts.jsonl"
    pkey = _key("prompts", spec.class_names, cfg.strategy, cfg.k, cfg.pairing, cfg.n, cfg.seed,
                cfg.generator if cfg.pairing != "random" else None)
    pipe = None
    if not r.cached("prompts", pkey, manifest):
        sim = None
        if cfg.strategy == "mixup" and cfg.pairing != "random":
            pipe = load_pipeline(cfg.generator, cfg.dtype, cfg.device, cfg.scheduler)
            sim = class_similarity(spec.class_names, pipe.tokenizer, pipe.text_encoder)
        rows = make_manifest(spec.class_names, cfg.n, cfg.strategy, cfg.k, cfg.pairing, cfg.seed, sim)
        write_manifest(rows, manifest)
        r.done("prompts", pkey)
        r.log(f"prompts: {len(rows)} {cfg.strategy} prompts, e.g. {rows[0].prompt!r}")
    preset = preset_for(cfg.generator)
    steps = cfg.steps or preset["steps"]
    guidance = cfg.guidance if cfg.guidance is not None else preset["guidance"]
    images = r.dir / "images"
    embeds, ekey = None, None
    if cfg.strategy == "learned":
        from dfquant.generate.learned import learn_prompts, load_embeddings, save_embeddings

        epath = r.dir / "prompt_embeds.safetensors"
        ekey = _key("learn", cfg.model, cfg.generator, cfg.modes, cfg.learn_iters, guidance, cfg.seed)
        if not r.cached("learn_prompts", ekey, epath):
            pipe = pipe or load_pipeline(cfg.generator, cfg.dtype, cfg.device, cfg.scheduler)
            r.log(f"learn-prompts: {cfg.modes} modes per class, {cfg.learn_iters} steps")
            args = sampling(cfg.generator, pipe, steps, guidance)
            save_embeddings(epath, learn_prompts(pipe, spec, cfg.modes, cfg.learn_iters, guidance=args["guidance"],
                                                 seed=cfg.seed, progress=progress, size=args["height"], call=args["call"]),
                            spec.class_names, {"model": cfg.model})
            r.done("learn_prompts", ekey)
        embeds = load_embeddings(epath)
    gkey = _key("generate", pkey, ekey, cfg.generator, steps, guidance, cfg.scheduler,
                resolve_dtype(cfg.dtype, preset, cfg.device))
    if not r.cached("generate", gkey, images / "manifest.jsonl"):
        from dfquant.prompts import read_manifest

        pipe = pipe or load_pipeline(cfg.generator, cfg.dtype, cfg.device, cfg.scheduler)
        args = sampling(cfg.generator, pipe, steps, guidance)
        r.log(f"generate: {cfg.n} images with {cfg.generator}, {args['steps']} steps, guidance {args['guidance']}, "
              f"{args['height']}px")
        t0 = time.time()
        rows = read_manifest(manifest)
        row_embeds = None
        if embeds is not None:
            from dfquant.generate.learned import rows_embeddings

            row_embeds = rows_embeddings(rows, embeds)
        generate(rows, pipe, images, batch_size=cfg.gen_batch_size, generator_id=cfg.generator, prompt_embeds=row_embeds,
                 progress=progress, **args)
        r.done("generate", gkey)
        r.log(f"generate: done in {time.time() - t0:.0f}s")
    return gkey, str(images)


def results_table(rows: list[dict]) -> str:
    head = "| model | calibration | algo | bits | FP top-1 | quantized top-1 | drop | quant time (s) |\n|---|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {x['model']} | {x['strategy']} | {x['algo']} | {x['bits']} | {x['fp_top1']:.2f} | {x['q_top1']:.2f} | "
        f"{x['fp_top1'] - x['q_top1']:.2f} | {x['quant_seconds']:.0f} |\n" for x in rows)
