"""Command-line jobs: resolve a model and its data, run the library, evaluate, write folders.

These are what ``dfq quantize`` / ``dfq export`` / ``dfq run`` do; they know the model registry,
the data sets and evaluation, which the library in :mod:`dfquant.quant` does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dfquant.errors import DfqError
from dfquant.models.spec import ModelSpec


def check_iters(algo: str, iters: int) -> None:
    """``--iters 0`` is range initialization only: RepQ-ViT as published, minmax / mse; an algorithm that learns
    (block reconstruction) would silently become another one, so it needs at least one iteration."""
    from dfquant.quant.algorithms import get_algorithm

    if iters < 1 and get_algorithm(algo).learns:
        raise DfqError(f"--iters {iters} must be at least 1 for {algo} (block reconstruction); 0 is range initialization "
                       "only: --algo repq-vit as published, or minmax / mse")


def run_quantize(spec: ModelSpec, calib_source: str, wbits: float, abits: float, algo: str, iters: int, n: int,
                 batch_size: int, seed: int, out, val=None, eval_limit: int | None = None, device: str = "cpu",
                 progress: bool = True, calib: torch.Tensor | None = None, fp_top1: float | None = None,
                 joint_iters: int = 0, bn_recalib: str = "none", keep_fp: tuple[str, ...] = (),
                 units: list[str] | None = None, evaluate_top1: bool = True, augment: str = "none",
                 augment_alpha: float = 1.0, target: str | None = None, log=print) -> dict:
    """Quantize ``spec``'s model on ``calib_source``, evaluate (when it has a test set or ``val``), and
    write the checkpoint (with how to rebuild the FP model) + results. ``augment`` mixes the calibration
    images at pixel level (:func:`~dfquant.data.calib.load_calibration`); a given ``calib`` is used as is.
    Generated calibration is checked first (:func:`~dfquant.data.calib.check_generated`, told through ``log``)."""
    from dfquant.data.calib import check_generated, load_calibration
    from dfquant.models.evaluate import evaluate
    from dfquant.io import versions, write_json
    from dfquant.quant.api import make_quant_config, quantize
    from dfquant.quant.checkpoint import save_quantized

    quant = {"target": target} if target else {}
    make_quant_config(algo, wbits, abits, **quant)  # validate before any slow work
    check_iters(algo, iters)
    calib = load_calibration(calib_source, spec, n, seed, augment, augment_alpha) if calib is None else calib
    calib_check = check_generated(spec, calib_source, log) if Path(str(calib_source)).is_dir() else None
    can_eval = evaluate_top1 and (spec.embedded or val is not None)
    if fp_top1 is None and can_eval:
        fp_top1 = evaluate(spec, val_dir=val, limit=eval_limit, progress=progress)
    qmodel, info = quantize(spec.model, calib, algo, wbits, abits, iters=iters, batch_size=batch_size, seed=seed,
                            device=device, progress=progress, bn_recalib=bn_recalib, keep_fp=keep_fp, units=units,
                            quant=quant)
    if joint_iters > 0:
        from dfquant.quant.joint import joint_finetune

        Path(out).mkdir(parents=True, exist_ok=True)
        joint_finetune(qmodel, calib, joint_iters, batch_size, seed=seed, resume=Path(out) / "joint_resume.pt",
                       progress=progress)
    q_top1 = evaluate(spec, qmodel, val_dir=val, limit=eval_limit, progress=progress) if can_eval else None
    meta = {"algo": algo, "wbits": wbits, "abits": abits, "target": target, "calib": str(calib_source), "n_calib": len(calib),
            "augment": None if augment == "none" else {"method": augment, "alpha": augment_alpha},
            "iters": iters, "joint_iters": joint_iters, "bn_recalib": bn_recalib, "batch_size": batch_size, "seed": seed,
            "fp_top1": fp_top1, "q_top1": q_top1, "eval_images": getattr(q_top1, "n", None), "calib_check": calib_check,
            "seconds": info["seconds"], "units": info["units"], "vit": info["vit"],
            "versions": versions(),
            "recon": {k: v for k, v in vars(info["recon"]).items()} if info.get("recon") else None,
            "full_precision_layers": info.get("full_precision_layers", [])}
    save_quantized(Path(out), spec.record(), qmodel, info["quant"], meta)
    write_json(Path(out) / "results.json", {k: meta[k] for k in ("algo", "wbits", "abits", "target", "calib", "augment", "n_calib", "iters",
                                                                   "seed", "fp_top1", "q_top1", "eval_images", "calib_check",
                                                                   "seconds")})
    return meta


def _verify_images(spec, n: int, val: str | Path | None, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images ``skip .. skip + n - 1`` of a zoo model's embedded test set, or of ``skip + n`` images spread
    evenly over ``val`` (only the ``n`` returned are decoded); a set with fewer than ``skip + n`` gives its last ``n``."""
    if val is None:
        if not spec.embedded:
            raise DfqError(f"{spec.name} has no embedded test set; pass --val /path/to/imagenet/val, or --no-verify")
        from dfquant.models.evaluate import test_tensors

        x, y = test_tensors(spec, skip + n)
        keep = slice(skip, None) if len(x) >= skip + n else slice(-n, None)
        return x[keep], y[keep]
    from dfquant.data.folders import ImageFolder

    ds = ImageFolder(val, spec.transform(), num_classes=spec.num_classes)
    idx = torch.linspace(0, len(ds) - 1, min(skip + n, len(ds))).round().long().unique().tolist()
    idx = idx[skip:] if len(idx) >= skip + n else idx[-n:]
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(list(xs)), torch.tensor(list(ys))



def run_export(ckpt_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, verify: bool = True,
               n: int = 1000, opset: int | None = None, val: str | Path | None = None,
               fuse_bias: bool = False, raise_on_failure: bool = True, speed_runs: int = 10,
               integer_residual: bool = False, int8_weights: bool = False,
               model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``dfq export``: load a quantized checkpoint, write ``fmt`` to ``out`` (default inside the
    checkpoint folder), verify an ONNX export with onnxruntime on ``n`` test images, and
    write ``export_report.json`` next to the output. An ONNX export is also timed against the
    same architecture in float32 (``speed_runs`` interleaved runs at batch 1 and 32; 0 skips it):
    ``report["deployment"]`` is :func:`~dfquant.quant.export.deployment_gain`. Raises
    :class:`DfqError` (after writing the report) when the verification fails, unless
    ``raise_on_failure`` is false (then see :func:`verification_error`). An ONNX export is written to a
    temporary file next to ``out`` and moved onto ``out`` only once it passed verification (and the timing):
    a failed verification or an error on the way leaves no model of this run at ``out`` (a file already there
    stays as it was); the report says so (``kept`` false, ``error`` the reason).

    ``integer_residual`` / ``int8_weights``: the approximate integer forms of
    :func:`~dfquant.quant.export.export_onnx`; the scales of the added activation quantizers come
    from max |x| over the 64 test images after the ``n`` verification images (with ``val``: 64
    images spread over the folder, which may overlap them). ``fuse_bias`` measures on the same
    images which integer kernels with inexact int32 biases leave the logits alone."""
    import os
    import tempfile

    from dfquant.io import read_json, versions, write_json
    from dfquant.models.source import load_quantized_spec
    from dfquant.quant.export import (APPROX_TOP1_TOLERANCE_POINTS, DEFAULT_OPSET, FORMATS, LOGIT_MEAN_TOLERANCE,
                                      TOP1_TOLERANCE_POINTS, deployment_gain, export_int_state, export_onnx,
                                      verification_error, verify_onnx)

    if fmt not in FORMATS:
        raise DfqError(f"--format {fmt!r} is not supported; use one of: {', '.join(FORMATS)}")
    if n < 0:
        raise DfqError(f"--eval-limit {n} must be 0 or more")
    if verify and fmt == "onnx" and n < 1:
        raise DfqError(f"--eval-limit {n} must be at least 1 (or pass --no-verify)")
    opset = DEFAULT_OPSET if opset is None else opset
    ckpt_dir = Path(ckpt_dir)
    default_name = "model.onnx" if fmt == "onnx" else "model_int.safetensors"
    out = Path(out) if out is not None else ckpt_dir / default_name
    if out.suffix != FORMATS[fmt]:
        raise DfqError(f"--out {out} must end in {FORMATS[fmt]} for --format {fmt}")
    spec, qmodel = load_quantized_spec(ckpt_dir, **(model_overrides or {}))
    qmeta = read_json(ckpt_dir / "quant_config.json")
    meta = {"model": spec.name, "checkpoint": str(ckpt_dir)}
    meta.update({k: str(qmeta[k]) for k in ("algo", "wbits", "abits") if k in qmeta})
    meta["quant_config"] = json.dumps(qmeta.get("quant", {}))
    report: dict[str, Any] = {"checkpoint": str(ckpt_dir), "model": spec.name, "format": fmt, "output": str(out),
                              **{k: qmeta.get(k) for k in ("algo", "wbits", "abits", "q_top1")}}
    if fmt == "int-state":
        report["export"] = export_int_state(qmodel, out, metadata=meta)
        report["kept"] = True  # written atomically; nothing to verify
    else:
        # 64 test images after the verification ones: the scales of --integer-residual's quantizers, and
        # the measurement that lets --fuse-bias keep inexact int32 biases as integer kernels (without
        # images the exporter keeps those Convs float)
        images = val is not None or spec.embedded
        calib = _verify_images(spec, 64, val, skip=n)[0] if integer_residual or (fuse_bias and images) else None
        approximate = integer_residual or int8_weights
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        staged = Path(staged)
        try:
            report["export"] = export_onnx(qmodel, spec.input_size, staged, opset, metadata=meta, fuse_bias=fuse_bias,
                                           integer_residual=integer_residual, calib=calib, int8_weights=int8_weights)
            report["export"]["path"] = str(out)
            report["target"] = report["export"]["target"]
            slow = {k: v for k, v in report["export"]["float_kernels"].items() if "model output" not in v}
            if report["target"] is None and slow:
                report["note"] = (f"quantized with the papers' conventions (no --target): {len(slow)} Conv/Gemm/MatMul "
                                  "kernels run in float in onnxruntime, because the simulation keeps their inputs or "
                                  "outputs (residual sums, pooling inputs, the image) or biases off the integer grid, "
                                  "so this export is slow; quantize again with --target onnxruntime for an exact "
                                  "export that runs as integer kernels")
            if verify:
                images, labels = _verify_images(spec, n, val)
                report["verify"] = verify_onnx(qmodel, staged, images, labels, approximate=approximate)
                report["verify_limit"] = {"name": "--eval-limit", "set_size": len(images) if len(images) < n else None}
                report["tolerance"] = {
                    "top1_diff_points": APPROX_TOP1_TOLERANCE_POINTS if approximate else TOP1_TOLERANCE_POINTS,
                    "top1_diff_images": report["verify"]["top1_tolerance_images"],
                    "top1_rule": "correct images of onnxruntime and fake-quant differ by at most "
                                 "max(1, floor(n * top1_diff_points / 100))",
                    **({} if approximate else {"mean_rel_diff": LOGIT_MEAN_TOLERANCE})}
            report["kept"] = not verify or report["verify"]["passed"]
            if report["kept"]:
                if speed_runs > 0:
                    report["deployment"] = deployment_gain(spec.model, staged, spec.input_size, (1, 32), speed_runs)
                os.replace(staged, out)
        finally:
            if staged.exists():
                staged.unlink()
    report["versions"] = versions()
    report_path = out.parent / "export_report.json"
    report["report_path"] = str(report_path)
    err = verification_error(report)
    if err is not None:
        report["error"] = str(err)
    write_json(report_path, {k: v for k, v in report.items() if k != "report_path"})
    if raise_on_failure and err is not None:
        raise err
    return report


def run_qat(model: str | ModelSpec, calib_source: str, wbits: float, abits: float, out: Path, iters: int = 2000,
            lr: float = 1e-4, learn_bits: bool = False, avg_bits: float | None = None, n: int = 1024,
            batch_size: int = 32, seed: int = 0, val=None, eval_limit: int | None = None, bn_stats: str = "relative",
            act_reinit: bool = False, progress: bool = True, calib: torch.Tensor | None = None,
            fp_top1: float | None = None, save: bool = True, budget_by: str = "size") -> dict:
    """``dfq qat``: NIPQ data-free QAT, finalize, evaluate FP / init / QAT top-1, write checkpoint + results.json."""
    import copy
    import time

    from dfquant.data.calib import load_calibration
    from dfquant.models.evaluate import evaluate
    from dfquant.io import versions, write_json
    from dfquant.models.source import resolve_model
    from dfquant.quant.nipq import check_qat_args, finalize, prepare_nipq, qat_distill

    check_qat_args(wbits, abits, iters, lr, learn_bits, avg_bits, n, batch_size, bn_stats, budget_by)
    budget = (avg_bits if avg_bits is not None else float(wbits)) if learn_bits else None
    spec = resolve_model(model) if isinstance(model, str) else model
    if spec.is_vit:
        raise DfqError("NIPQ QAT supports CNNs only; quantize ViTs with `dfq quantize --algo repq-vit`")
    calib = load_calibration(calib_source, spec, n, seed) if calib is None else calib
    if len(calib) < batch_size:
        raise DfqError(f"calibration source {calib_source} gave {len(calib)} images, fewer than the batch size {batch_size}")
    if fp_top1 is None:
        fp_top1 = evaluate(spec, val_dir=val, limit=eval_limit, progress=progress)
    t0 = time.time()
    torch.manual_seed(seed)
    qmodel = prepare_nipq(spec.model, wbits, abits, learn_bits=learn_bits, init_bits=budget, calib=calib,
                          budget_by=budget_by)
    t_eval = time.time()
    init_top1 = evaluate(spec, qmodel, val_dir=val, limit=eval_limit, progress=progress)
    t0 += time.time() - t_eval  # "seconds" counts preparation, training and finalization only
    out = Path(out)
    losses = qat_distill(qmodel, spec.model, calib, iters, lr, budget, batch_size=batch_size, seed=seed,
                         resume=(out / "qat_resume.pt") if save else None, progress=progress)
    info = finalize(qmodel, calib, budget, fp_model=spec.model, bn_stats=bn_stats, act_reinit=act_reinit)
    seconds = round(time.time() - t0, 1)
    q_top1 = evaluate(spec, qmodel, val_dir=val, limit=eval_limit, progress=progress)
    k = max(1, min(50, len(losses) // 10))
    meta = {"algo": "nipq-qat", "wbits": wbits, "abits": abits, "calib": str(calib_source), "n_calib": len(calib),
            "iters": iters, "lr": lr, "learn_bits": learn_bits, "avg_bits_budget": budget, "batch_size": batch_size,
            "seed": seed, "act_reinit": act_reinit, "fp_top1": fp_top1,
            "init_top1": init_top1, "q_top1": q_top1, "seconds": seconds,
            "kl_first": sum(losses[:k]) / k if losses else None, "kl_last": sum(losses[-k:]) / k if losses else None,
            **info, "versions": versions()}
    if save:
        from dfquant.quant.checkpoint import save_quantized

        qcfg = copy.copy(qmodel.nipq_config)
        qcfg.act_symmetric = False  # NIPQ activation grids are affine (zero point 0 for non-negative inputs)
        save_quantized(out, spec.record(), qmodel, qcfg, meta)
        write_json(out / "results.json", {k_: meta[k_] for k_ in (
            "algo", "wbits", "abits", "calib", "n_calib", "iters", "lr", "learn_bits", "avg_bits_budget", "seed",
            "budget_by", "bn_stats", "act_reinit", "fp_top1", "init_top1", "q_top1", "avg_weight_bits_all",
            "avg_weight_bits_learned",
            "kl_first", "kl_last", "seconds")})
    meta["qmodel"] = qmodel
    return meta
