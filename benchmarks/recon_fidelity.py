"""Reconstruction fidelity: dfquant's former Genie-M maths against the reference codes' maths, and each change alone.

Every row quantizes a zoo model with Genie-M (or ``--algo``) on real split-A calibration images (``real:A``, 1024 images,
seed 0) and evaluates it on the test set. The variants differ only in :class:`~dfquant.quant.reconstruct.ReconConfig`
fields:

* ``old``: what dfquant computed before issue 17: the error summed over C*H*W per image (``sample``), rounding
  weight 0.01, the rounding learning rate decayed with the step sizes, batches drawn with replacement, activation
  steps initialised on 256 images through rounded weights;
* ``old+loss``: ``old`` with the reference loss reduction only (sum over channels, mean over batch and positions);
* ``old+rw``: ``old`` with Genie's rounding weight 1.0 only;
* ``old+loss+rw``: both (the issue's middle row);
* ``faithful``: the genie-m preset as it is now (both, plus a constant rounding learning rate, epoch shuffling and
  Genie's first-batch activation init);
* ``faithful-clampafter``: ``faithful`` with dfquant's former activation STE ``clamp(round_ste(x / s))`` (as
  BRECQ/QDrop: it blocks gradients within half a step of either bound) in place of Genie's
  ``round_ste(clamp(x / s))`` (``act_clamp_first``: gradients pass wherever x / s is inside the range);
* ``faithful-act256`` / ``faithful-cosineV`` / ``faithful-randint``: ``faithful-clampafter`` with one former setting
  put back (activation init on 256 images through rounded weights / the rounding lr decayed / sampling with
  replacement): they were measured before genie-m took Genie's STE;
* ``faithful-oldgrid``: ``faithful-clampafter`` with dfquant's former signed activation step ``max/(2^(b-1)-1)`` in
  place of Genie's ``2*max/(2^b-1)`` (``act_signed_step="qmax"``; only signed activations, e.g. MobileNetV2's
  block inputs);
* ``faithful-joint``: ``faithful`` in one joint pass (``stages="joint"``), for ``--algo brecq``/``adaround``, whose
  preset learns the rounding of every unit first and the activation steps in a second pass, as BRECQ's code;
* ``faithful-symgrid``: for ``--algo brecq``/``qdrop``/``adaround``, dfquant's former activation grid (symmetric,
  signed iff the data has negatives) and range search over 100 clip ratios, in place of their code's affine grid
  (BRECQ/AdaRound: searched over 80 ratios, 1.0..0.21);
* ``faithful-zp1d``: for ``--algo qdrop``, the range search without QDrop's zero-point search (``zero_point_search``:
  for two-sided tensors, weights per channel and activations, QDrop's ``MSEObserver`` tries every zero point at each
  range; the 1-D search takes the zero point that centres the clipped range where min/max put it).

Rows are appended to ``<out>.csv`` as they finish (an interrupted study resumes); ``<out>.md`` and ``<out>.png`` are
rewritten at the end, with every command that produced rows.
"""

from __future__ import annotations

import argparse
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
from dfquant.quant.api import quantize
from dfquant.report import accuracy_vs_bits, aggregate, pivot_table
from dfquant.run import parse_bits

OLD = dict(loss_reduction="sample", round_weight=0.01, rounding_schedule="cosine", sampling="randint",
           act_init="images", act_init_images=256, quant={"act_signed_step": "qmax", "act_clamp_first": False})
AFTER = {"act_clamp_first": False}  # dfquant's STE clamp(round_ste(x / s)), under which the faithful-X rows were made
VARIANTS: dict[str, dict] = {
    "old": OLD,
    "old+loss": {**OLD, "loss_reduction": "channel"},
    "old+rw": {**OLD, "round_weight": 1.0},
    "old+loss+rw": {**OLD, "loss_reduction": "channel", "round_weight": 1.0},
    "faithful": {},
    # the faithful preset with one of the remaining former settings put back (which of them matters); the first four
    # were measured before genie-m took Genie's STE, so they keep dfquant's (compare them with faithful-clampafter)
    "faithful-clampafter": {"quant": AFTER},
    "faithful-act256": {"act_init": "images", "act_init_images": 256, "quant": AFTER},
    "faithful-cosineV": {"rounding_schedule": "cosine", "quant": AFTER},
    "faithful-randint": {"sampling": "randint", "quant": AFTER},
    "faithful-oldgrid": {"quant": {"act_signed_step": "qmax", **AFTER}},
    "faithful-joint": {"stages": "joint"},
    "faithful-symgrid": {"quant": {"act_symmetric": True, "clip_ratios": 100}},
    "faithful-zp1d": {"quant": {"zero_point_search": False}},
}
FIELDS = ["model", "strategy", "algo", "bits", "seed", "n_calib", "iters", "fp_top1", "q_top1", "quant_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist/resnet20", "fmnist/mobilenetv2"])
    ap.add_argument("--bits", nargs="+", default=["W4A4", "W3A3", "W2A4"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--algo", default="genie-m", help="the preset every variant modifies (default genie-m)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/recon_fidelity")
    ap.add_argument("--report-only", action="store_true", help="only rewrite <out>.md/.png from the CSV")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    csv_path = out.with_suffix(".csv")
    algo = f"{args.algo} {args.iters} it"
    done = open_results(csv_path, FIELDS, lambda r: (r["model"], r["strategy"], r["algo"], r["bits"], r["seed"]))
    cmds = log_command(out, record=not args.report_only)
    for model in [] if args.report_only else args.models:
        spec = get_model(model)
        calib = load_calibration(cached_source(spec, "real", args.seed, args.n), spec, args.n, args.seed)
        fp_top1 = None
        for bits in args.bits:
            for variant in args.variants:
                if (model, variant, algo, bits, str(args.seed)) in done:
                    continue
                fp_top1 = evaluate(spec, progress=False) if fp_top1 is None else fp_top1
                t0 = time.time()
                qmodel, _ = quantize(spec.model, calib, args.algo, *parse_bits(bits), iters=args.iters, seed=args.seed,
                                     progress=False, quant=VARIANTS[variant].get("quant"),
                                     recon={k: v for k, v in VARIANTS[variant].items() if k != "quant"})
                row = {"model": model, "strategy": variant, "algo": algo, "bits": bits,
                       "seed": args.seed, "n_calib": len(calib), "iters": args.iters, "fp_top1": round(fp_top1, 2),
                       "q_top1": round(evaluate(spec, qmodel, progress=False), 2),
                       "quant_seconds": round(time.time() - t0, 1)}
                print(row, flush=True)
                append_row(csv_path, FIELDS, row)
    with open(csv_path) as fh:
        rows = [{**r, "q_top1": float(r["q_top1"]), "fp_top1": float(r["fp_top1"])} for r in csv.DictReader(fh)]
    agg = aggregate(rows)
    accuracy_vs_bits(agg, out.with_suffix(".png"))
    write_text(out.with_suffix(".md"), f"# {out.name}: reconstruction maths, former vs reference\n\n"
               "Real split-A calibration (1024 images), seed 0, full 10k test set, CPU. Each column's algo says the "
               "preset the variants modify (genie-m unless the command has --algo). Variants (see the script's "
               "docstring): `old` = dfquant before issue 17 (error summed over C*H*W, rounding weight 0.01, rounding lr "
               "decayed, sampling with replacement, activation init on 256 images); `+loss` = reference loss reduction "
               "(sum over channels, mean over batch and positions); `+rw` = rounding weight 1.0; `faithful` = the "
               "preset now (all of the reference's settings); `faithful-clampafter` = faithful with dfquant's former "
               "activation STE clamp(round_ste(x/s)) in place of Genie's round_ste(clamp(x/s)); `faithful-X` (act256, "
               "cosineV, randint, oldgrid; measured before genie-m took Genie's STE) = faithful-clampafter with one "
               "former setting put back (act256: activation init on 256 images through rounded weights; cosineV: "
               "rounding lr decayed; randint: batches drawn with replacement; oldgrid: dfquant's former signed "
               "activation step max/(2^(b-1)-1) instead of Genie's 2*max/(2^b-1), which changes only signed "
               "activations, e.g. MobileNetV2's block inputs); joint: "
               "brecq/adaround in one joint pass instead of BRECQ's weights-then-activations passes; symgrid: "
               "brecq/qdrop/adaround with dfquant's former symmetric activation grid and 100 clip ratios instead of their "
               "code's affine grid (BRECQ/AdaRound: 80 ratios, 1.0..0.21); zp1d: qdrop without its 2-D search (every zero "
               "point at each range, for two-sided weights and activations), i.e. with the 1-D range search. The MobileNetV2 "
               "rows labelled faithful-oldgrid at W2A4 and W3A3 were made as `faithful` before genie-m took Genie's "
               "signed step (the same code path: a fresh faithful-oldgrid run reproduced that W4A4 row, 79.05, "
               "exactly). ResNet-20 has no signed activation quantizer, so its genie-m rows hold for either grid. "
               "Relabelled when genie-m took Genie's STE and BRECQ/QDrop/AdaRound their affine 80-ratio grid: genie-m "
               "rows made as `faithful` are now `faithful-clampafter` and those made as `faithful+clampfirst` are "
               "`faithful` (the same settings); brecq rows made as `faithful` are now `faithful-symgrid`, and the "
               "former brecq `faithful-joint` rows (symmetric grid) were dropped and re-run."
               "\n\nCommands:\n\n" + cmds
               + "\n## Top-1 % by variant\n\nRows: variant (the column header says calibration: every row uses the same "
               "real split-A images). Columns: model, iterations per block, bits. The CSV's quant_seconds is the wall "
               "time of quantization plus evaluation on one thread of a shared machine.\n\n"
               + pivot_table(agg, list(VARIANTS)) + f"\n![top-1 by variant]({out.with_suffix('.png').name})\n")


if __name__ == "__main__":
    main()
