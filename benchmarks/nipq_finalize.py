"""Which step of NIPQ's finalization (hard quantization + recalibration) keeps or loses accuracy.

After pseudo-quantization-noise training, :func:`dfquant.quant.nipq.finalize` hardens the grids and
then (a) re-estimates BatchNorm statistics (``--bn-stats``) and (b), only with ``--act-reinit`` (the default
until this measurement), re-initializes the activation ranges by range search. This script trains one NIPQ model per setting and
evaluates the same trained model under every combination of (a) and (b), so the effect of each
step is measured on identical weights. It was written after MobileNetV2 W2A4 QAT ended at chance
level in ``qat.py``.

Rows go to ``<out>.csv`` (resumable per model/bits/steps), ``<out>.md`` holds the table and the command.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

import torch

from calib_cache import cached_source
from resumable_csv import append_row, log_command, open_results
from dfquant.data.calib import load_calibration
from dfquant.models.evaluate import evaluate
from dfquant.io import write_text
from dfquant.models.registry import get_model
from dfquant.quant.nipq import finalize, prepare_nipq, qat_distill
from dfquant.run import parse_bits

FIELDS = ["model", "bits", "qat_steps", "calib", "stage", "bn_stats", "act_reinit", "eval_images", "q_top1", "seconds"]
FINALIZE = [("relative", True), ("relative", False), ("none", True), ("none", False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist/mobilenetv2"])
    ap.add_argument("--bits", nargs="+", default=["W2A4"])
    ap.add_argument("--steps", type=int, default=150, help="NIPQ QAT steps before finalization")
    ap.add_argument("--calib", default="mixup", help="mixup (the cached seed-0 mixup set of ptq_grid/qat) or any calibration source")
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/nipq_finalize")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    csv_path = out.with_suffix(".csv")
    key = lambda r: (r["model"], r["bits"], str(r["qat_steps"]), r["calib"], r["stage"], r["bn_stats"], str(r["act_reinit"]))
    done = open_results(csv_path, FIELDS, key)
    cmds = log_command(out)
    for model in args.models:
        spec = get_model(model)
        src = cached_source(spec, "mixup", 0) if args.calib == "mixup" else args.calib
        for bits in args.bits:
            base = dict(model=model, bits=bits, qat_steps=args.steps, calib=args.calib, eval_images=args.eval_limit)
            todo = [dict(base, stage="finalize", bn_stats=b, act_reinit=a) for b, a in FINALIZE]
            todo = [dict(base, stage="before finalize", bn_stats="–", act_reinit="–")] + todo
            if all(key(r) in done for r in todo):
                continue
            calib = load_calibration(src, spec, 1024, 0)
            wbits, abits = parse_bits(bits)
            t0 = time.time()
            trained = prepare_nipq(spec.model, wbits, abits, calib=calib)
            qat_distill(trained, spec.model, calib, args.steps, 1e-4, None, batch_size=32, seed=0, progress=True)
            trained.eval()
            t_train = time.time() - t0
            for row in todo:
                t0 = time.time()
                if row["stage"] == "finalize":
                    q = copy.deepcopy(trained)
                    finalize(q, calib, None, fp_model=spec.model, bn_stats=row["bn_stats"], act_reinit=row["act_reinit"])
                else:  # the trained model as it is: hard rounding on the learned grids, FP-trained BN statistics
                    q = trained
                row.update(q_top1=evaluate(spec, q, limit=args.eval_limit, progress=False),
                           seconds=round(time.time() - t0 + (t_train if q is trained else 0), 1))
                print(row, flush=True)
                if key(row) not in done:
                    append_row(csv_path, FIELDS, row)
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    table = "| model | bits | QAT steps | stage | BN re-estimation | activation range re-init | top-1 |\n|---|---|---|---|---|---|---|\n"
    table += "".join(f"| {r['model']} | {r['bits']} | {r['qat_steps']} | {r['stage']} | {r['bn_stats']} | {r['act_reinit']} | "
                     f"{float(r['q_top1']):.1f} |\n" for r in rows)
    write_text(out.with_suffix(".md"), f"# {out.name}\n\nCommands:\n\n{cmds}\nOne NIPQ-trained model per (model, bits); every "
               f"finalization variant starts from a copy of it. Calibration: the seed-0 mixup set (1024 images); test: first "
               f"{args.eval_limit} images; CPU, 1 thread.\n\n" + table)
    print(f"wrote {csv_path}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
