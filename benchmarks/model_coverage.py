"""Which model families dfquant's graph plan handles: small configs, random weights, CPU.

Per family (tests/plan_checks.py FAMILIES, the same checks tests/test_model_families.py runs):
reconstruction units, residual units (each checked: its input quantized exactly once), BN folds
(FP output unchanged after folding, relative max error), layers kept float and why, plan warnings,
and the top-1 agreement with the FP model at W8A8 with range init only (``minmax``, no
reconstruction) on random inputs. Random weights make many logits near-ties, so agreement is a
lower bound of what trained weights give. Writes <out>.md with the exact command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from plan_checks import FAMILIES, check_family  # noqa: E402

from dfquant.io import versions, write_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=list(FAMILIES))
    ap.add_argument("--n-eval", type=int, default=1000, help="random inputs for the agreement")
    ap.add_argument("--out", default="benchmarks/results/model_coverage")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        r = check_family(name, n_eval=args.n_eval)
        rows.append(r)
        print(name, {k: v for k, v in r.items() if k != "warnings"}, flush=True)
    import time

    import torchvision

    import dfquant

    t0 = time.time()
    dfquant.plan(torchvision.models.resnet50(), torch.zeros(1, 3, 224, 224))
    rn50_plan_s = time.time() - t0
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    head = ("| model | units | residual units (input quantized once) | BN folded | fold rel. error | layers kept float "
            "| warnings | W8A8 agreement (%) | W8A8 output SQNR (dB) | plan time (s) | graph |\n|" + "---|" * 11 + "\n")
    body = "".join(
        f"| {r['model']} | {r['units']} | {r['residual_units']} | {r['folded_bn']} | {r['fold_rel_err']:.1e} | "
        f"{', '.join(f'{k} ({v})' for k, v in r['float_layers'].items()) or '-'} | "
        f"{'; '.join(w for w in r['warnings'] if not w.startswith('kept in float')) or '-'} | "
        f"{r['w8a8_agreement']:.1f} | {r['w8a8_sqnr_db']:.1f} | {r['plan_seconds']:.2f} | {r['tracer']} |\n" for r in rows)
    v = versions()
    write_text(Path(args.out).with_suffix(".md"),
               f"# Model coverage of the graph plan (random weights, CPU)\n\nCommand: `{cmd}`\n\n"
               f"torch {v.get('torch')}, torchvision {v.get('torchvision')}, timm {v.get('timm')}, "
               f"{torch.get_num_threads()} threads. Agreement: top-1 of the W8A8 `minmax` model (range init only, "
               f"32 random calibration images) vs the FP model on {args.n_eval} random inputs; with random weights many "
               f"logits are near ties, so this is a lower bound; the output SQNR (signal to quantization noise of the "
               f"logits) measures the W8A8 error itself. Planning torchvision ResNet-50 at 224x224 took "
               f"{rn50_plan_s:.2f} s.\n\n{head}{body}")


if __name__ == "__main__":
    main()
