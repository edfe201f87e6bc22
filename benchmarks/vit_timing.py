"""RepQ-ViT cost on real ViT architectures with random weights (no downloads).

For timm DeiT-S, ViT-S and Swin-T at 224px: time and peak host memory (RSS) of
RepQ-ViT calibration at W4A4 on 32 random images, and of one forward pass of the
fake-quantized model. Accuracy is meaningless with random weights and is not reported.
Writes <out>.csv / <out>.md with the exact command.
"""

from __future__ import annotations

import argparse
import csv
import resource
import shlex
import sys
import time
from pathlib import Path

import timm
import torch

from dfquant.io import write_text
from dfquant.quant.api import quantize

MODELS = ["deit_small_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/vit_timing")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(args.n, 3, 224, 224)
        t0 = time.time()
        qmodel, info = quantize(model, x, "repq-vit", 4, 4, iters=0, progress=False)
        calib_s = time.time() - t0
        t0 = time.time()
        with torch.no_grad():
            qmodel(x[:8])
        fwd_s = (time.time() - t0) / 8
        t0 = time.time()
        with torch.no_grad():
            model(x[:8])
        fp_s = (time.time() - t0) / 8
        rows.append({"model": name, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                     "calib_images": args.n, "repq_calib_seconds": round(calib_s, 1),
                     "fakequant_forward_s_per_image": round(fwd_s, 3), "fp_forward_s_per_image": round(fp_s, 3),
                     "peak_rss_GB_so_far": round(peak_rss_gb(), 2), "threads": torch.get_num_threads()})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in rows)
    write_text(out.with_suffix(".md"), f"# RepQ-ViT W4A4 cost, random-weight timm models at 224px (CPU)\n\n"
               f"Command: `{cmd}`\n\nPeak RSS is the process maximum so far (models run in order).\n\n{head}{body}")


if __name__ == "__main__":
    main()
