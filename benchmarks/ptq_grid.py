"""Accuracy grid: models x calibration sources x algorithms x bit-widths x seeds.

Each calibration set is produced once per (source, seed) through the same stage code as
``dfq run`` (cached by ``calib_cache.cached_source``: generated sets are shared by models with
the same labels, BN-inversion sets are per model), then every algorithm and bit setting is
quantized from it. Rows are appended to ``<out>.csv`` as they finish, so an interrupted
grid resumes; ``<out>.md`` (mean ± std over seeds) and ``<out>.png`` (accuracy vs bits)
are rewritten at the end. The command line is recorded in the Markdown file.

Sources: real | distill | single | template | mixup | mixup-similar | mixup-dissimilar | mixup-k3 | learned
| single+mixup | single+cutmix | single-compose | mixup-compose
(learned: multi-mode prompt embeddings learned against the model, rendered in 4 steps as learned;
single+mixup / single+cutmix: the single-class set mixed in pairs at pixel level, whose first images are
drawn to ``<out>_<source>.png``; *-compose: rendered by the compositional generator ``mini-compose``).
``--bn-recalib relative`` also records ``<algo>+bnrel``: the same block-wise model after relative
BatchNorm re-estimation on the calibration set (:mod:`dfquant.quant.bn`; costs one evaluation).
``--joint-iters N`` adds joint end-to-end PTQ of all quantization parameters after the block-wise
step: each run then records the block-wise row and, from the same model, the ``<algo>+jointN`` row.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

import torch

from dfquant.data.calib import load_calibration
from calib_cache import SOURCES, augmentation, cached_source
from resumable_csv import append_row, log_command, open_results, notes_for
from dfquant.models.evaluate import evaluate
from dfquant.io import write_text
from dfquant.models.registry import get_model
from dfquant.quant.algorithms import default_algorithm
from dfquant.quant.api import quantize
from dfquant.quant.bn import batchnorms, recalibrate_bn
from dfquant.quant.joint import joint_finetune
from dfquant.report import accuracy_vs_bits, aggregate, aggregate_table, paired_comparison, pivot_table
from dfquant.run import parse_bits

FIELDS = ["model", "strategy", "algo", "bits", "seed", "n_calib", "iters", "fp_top1", "q_top1", "quant_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist/resnet20"])
    ap.add_argument("--sources", nargs="+", default=["real", "distill", "single", "mixup"], choices=list(SOURCES))
    ap.add_argument("--algos", nargs="+", default=["genie-m"], help="'auto' = genie-m for CNNs, repq-vit for ViTs")
    ap.add_argument("--bits", nargs="+", default=["W4A4", "W2A4"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--distill-iters", type=int, default=200)
    ap.add_argument("--joint-iters", type=int, default=0, help="joint end-to-end PTQ steps after block-wise PTQ")
    ap.add_argument("--joint-lr", type=float, default=1e-5, help="Adam learning rate of the joint steps")
    ap.add_argument("--bn-recalib", default="none", choices=["none", "relative", "absolute"],
                    help="also record <algo>+bn<mode>: the block-wise model after BN re-estimation on the calibration set")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/grid")
    ap.add_argument("--report-only", action="store_true", help="only rewrite <out>.md/.png from the CSV")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.with_suffix(".csv")
    done = open_results(csv_path, FIELDS, lambda r: (r["model"], r["strategy"], r["algo"], r["bits"], r["seed"]))
    cmds = log_command(out, record=not args.report_only)
    specs = {m: get_model(m) for m in ([] if args.report_only else args.models)}
    fp_top1s: dict[str, float] = {}
    for source in args.sources:  # source-major: a generated set is rendered once and serves every model
        for seed in args.seeds:
            for model, spec in specs.items():
                if source == "distill" and not batchnorms(spec.model):
                    print(f"skip {model} / distill: no BatchNorm statistics to invert", flush=True)
                    continue
                pending = [(a, b) for a in args.algos for b in args.bits  # the block-wise row (+ the extra rows)
                           if any((model, source, label, b, str(seed)) not in done for label in _labels(a, spec, args))]
                if not pending:
                    continue
                if model not in fp_top1s:
                    fp_top1s[model] = evaluate(spec, limit=args.eval_limit)
                fp_top1 = fp_top1s[model]
                src = cached_source(spec, source, seed, args.n, args.distill_iters)
                calib = load_calibration(src, spec, args.n, seed)
                if augmentation(source):
                    from dfquant.data.augment import augment, save_grid

                    plain, calib = calib, augment(calib, seed=seed, **augmentation(source))
                    sheet = out.parent / f"{out.name}_{source.replace('+', '_')}.png"
                    if not sheet.exists():
                        save_grid(plain, calib, sheet, spec.mean, spec.std)
                for algo, bits in pending:
                    wbits, abits = parse_bits(bits)
                    algo = _algo(algo, spec)
                    base = {"model": model, "strategy": source, "bits": bits, "seed": seed, "n_calib": len(calib),
                            "iters": args.iters, "fp_top1": round(fp_top1, 2)}

                    def record(label: str, qm: torch.nn.Module, seconds: float) -> None:
                        """Evaluate ``qm``; ``seconds`` counts its quantization (+ BN re-estimation or joint) steps."""
                        t_eval = time.time()
                        row = {**base, "algo": label, "q_top1": round(evaluate(spec, qm, limit=args.eval_limit), 2)}
                        row["quant_seconds"] = round(seconds + time.time() - t_eval, 1)
                        print(row, flush=True)
                        append_row(csv_path, FIELDS, row)
                        done.add((model, source, label, bits, str(seed)))

                    t0 = time.time()
                    qmodel, _ = quantize(spec.model, calib, algo, wbits, abits, iters=args.iters, batch_size=32, seed=seed)
                    t_block = time.time() - t0
                    if (model, source, algo, bits, str(seed)) not in done:  # the block-wise row comes for free
                        record(algo, qmodel, t_block)
                    bn_label = next((lab for lab in _labels(algo, spec, args) if "+bn" in lab), None)
                    if bn_label and (model, source, bn_label, bits, str(seed)) not in done:
                        t0 = time.time()
                        recalibrated = copy.deepcopy(qmodel)  # the joint steps below start from the block-wise model
                        recalibrate_bn(recalibrated, calib, args.bn_recalib, spec.model)
                        record(bn_label, recalibrated, t_block + time.time() - t0)
                    if args.joint_iters > 0:
                        t0 = time.time()
                        joint_finetune(qmodel, calib, args.joint_iters, 32, lr=args.joint_lr, seed=seed)
                        record(_labels(algo, spec, args)[-1], qmodel, t_block + time.time() - t0)
    with open(csv_path) as fh:
        rows = [{**r, "q_top1": float(r["q_top1"]), "fp_top1": float(r["fp_top1"])} for r in csv.DictReader(fh)]
    agg = aggregate(rows)
    accuracy_vs_bits(agg, out.with_suffix(".png"))
    write_text(out.with_suffix(".md"), f"# {out.name}\n\nCommands that produced the rows (CPU, 2 cores shared; "
               "each row of the CSV records its iterations per block, calibration size and seed; paper: 20000 "
               "iterations per block, 1024 images, batch 32):\n\n" + cmds + "\n" + notes_for(out) + "time (s): wall time of one row on one "
               "CPU thread (quantization, joint steps if any, and the test-set evaluation), mean over seeds; the calibration "
               "set's generation or distillation is not included.\n\nTest set: "
               f"{'first ' + str(args.eval_limit) if args.eval_limit else 'full 10k'} images.\n\n"
               + "## By calibration source\n\nTop-1 %, mean ± std over seeds (number of seeds).\n\n"
               + pivot_table(agg, list(SOURCES)) + "\n## All rows\n\n"
               + aggregate_table(agg) + f"\n![accuracy vs bits]({out.with_suffix('.png').name})\n" + _paired(rows))


def _paired(rows: list[dict]) -> str:
    """Seed-paired differences of each calibration source against single-class prompts (and mixup)."""
    present = {r["strategy"] for r in rows}
    pairs = [(a, "single") for a in SOURCES if a != "single" and a in present and "single" in present]
    pairs += [(a, "mixup") for a in ("mixup-similar", "mixup-dissimilar", "mixup-k3", "mixup-compose") if {a, "mixup"} <= present]
    pairs += [(a, b) for a, b in (("mixup-compose", "single-compose"), ("mixup", "single+mixup"), ("mixup", "single+cutmix"),
                                  ("mixup-compose", "single+mixup"), ("mixup-compose", "single+cutmix")) if {a, b} <= present]
    tables = [f"\n### {a} vs {b}\n\n" + t for a, b in pairs if (t := paired_comparison(rows, a, b))]
    return "\n## Paired by seed\n" + "".join(tables) if tables else ""


def _algo(algo: str, spec) -> str:
    return default_algorithm(spec.model) if algo == "auto" else algo


def _labels(algo: str, spec, args) -> list[str]:
    """Row labels one quantization yields: block-wise, then +bn<mode> and +joint<N> when asked."""
    a = _algo(algo, spec)
    return ([a] + ([f"{a}+bn{args.bn_recalib[:3]}"] if args.bn_recalib != "none" and batchnorms(spec.model) else [])
            + ([f"{a}+joint{args.joint_iters}"] if args.joint_iters > 0 else []))


if __name__ == "__main__":
    main()
