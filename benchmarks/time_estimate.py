"""How close the reconstruction's printed run-time estimate comes to the time the reconstruction then takes.

For each model and algorithm: one quantization on real split-A calibration (1024 images, seed 0) with progress on,
so the estimate is made as a user sees it (once the second unit has timed 20 iterations); the row records that
estimate (the value behind the printed line) and the reconstruction's wall time (``seconds_total`` of its summary:
every unit's input capture, iterations, loss evaluations and the FP target captures; not the model preparation
or the evaluation). Results: ``<out>.csv`` and ``<out>.md`` with the command.

    python benchmarks/time_estimate.py --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
from pathlib import Path

import torch

from calib_cache import cached_source
from resumable_csv import log_command, notes_for
from dfquant.data.calib import load_calibration
from dfquant.io import atomic_path, write_text
from dfquant.models.registry import get_model
from dfquant.quant import estimate as E
from dfquant.quant.api import quantize
from dfquant.run import parse_bits

FIELDS = ["model", "algo", "bits", "iters", "threads", "estimate_s", "actual_s", "ratio"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist/resnet20", "fmnist/mobilenetv2"])
    ap.add_argument("--algos", nargs="+", default=["genie-m", "brecq"])
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--iters", type=int, nargs="+", default=[100, 400])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/time_estimate")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cmds = log_command(out)
    made: list[float] = []
    estimate = E.estimate_seconds

    def recording(*a, **k) -> float:
        made.append(estimate(*a, **k))
        return made[-1]

    E.estimate_seconds = recording
    rows = []
    for model in args.models:
        spec = get_model(model)
        calib = load_calibration(cached_source(spec, "real", 0, 1024, progress=False), spec, 1024, 0)
        for algo in args.algos:
            for iters in args.iters:
                made.clear()
                with contextlib.redirect_stderr(io.StringIO()):  # the bars; the estimate is recorded above
                    _, info = quantize(spec.model, calib, algo, *parse_bits(args.bits), iters=iters, seed=0, progress=True)
                actual = info["units"][-1]["seconds_total"]
                row = {"model": model, "algo": algo, "bits": args.bits, "iters": iters, "threads": args.threads,
                       "estimate_s": round(made[0], 1) if made else "", "actual_s": actual,
                       "ratio": round(made[0] / actual, 2) if made else ""}
                print(row, flush=True)
                rows.append(row)
    with atomic_path(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)
    table = "| " + " | ".join(FIELDS) + " |\n|" + "---|" * len(FIELDS) + "\n" + "".join(
        "| " + " | ".join(str(r[f]) for f in FIELDS) + " |\n" for r in rows)
    write_text(out.with_suffix(".md"), f"# {out.name}: the printed reconstruction time estimate against the time taken\n\n"
               "ratio = estimate / actual (1.0 is exact; below 1 the run took longer than said). Real split-A "
               "calibration, 1024 images, seed 0, one quantization per row; the machine may have been shared "
               "(see the commands and notes).\n\nCommands:\n\n" + cmds + "\n" + notes_for(out) + table)


if __name__ == "__main__":
    main()
