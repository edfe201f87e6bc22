"""Quality and speed of a text-to-image generator as a calibration source.

* agreement: the zoo ResNet-20's top-1 on N generated single-class images, taking the
  prompt's class as the label (how often the classifier agrees with the prompt);
* FD: Fréchet distance between ResNet-20 penultimate features of the generated images
  and of the real test set (an FID-like number in this classifier's feature space;
  for reference the same distance between split B and the test set is reported);
* speed: images/s of dfquant's batched generation vs a plain per-image
  ``StableDiffusionPipeline.__call__`` loop on the same model and settings.
Writes <out>.md, <out>.json and <out>_grid.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from dfquant.analysis.features import penultimate
from dfquant.data import fmnist
from dfquant.data.folders import load_folder_images
from dfquant.evaluate import top1_tensors
from dfquant.generate.grid import contact_sheets
from dfquant.generate.pipeline import generate, load_pipeline, sampling
from dfquant.io import write_json, write_text
from dfquant.models.registry import get_model
from dfquant.prompts import make_manifest, read_manifest


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", default="mini")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--speed-images", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/generator_quality")
    args = ap.parse_args()
    out = Path(args.out)
    spec = get_model("fmnist/resnet20")
    pipe = load_pipeline(args.generator)
    pipe.set_progress_bar_config(disable=True)
    sample = sampling(args.generator, pipe, args.steps)
    steps, guidance = sample["steps"], sample["guidance"]
    rows = make_manifest(fmnist.CLASS_NAMES, args.n, "single", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "single"
        t0 = time.time()
        generate(rows, pipe, folder, batch_size=64, generator_id=args.generator, **sample)
        gen_seconds = time.time() - t0
        images = load_folder_images(folder, spec.transform())
        labels = torch.tensor([r.classes[0] for r in read_manifest(folder / "manifest.jsonl")])
        contact_sheets(folder, out.parent / f"{out.name}_grid.png", n=40)
        agreement = top1_tensors(spec.model, images, labels)
        xt, yt = fmnist.load_split("test")
        f_test = penultimate(spec.model, spec.normalize(xt)).numpy()
        f_gen = penultimate(spec.model, images).numpy()
        xb, _ = fmnist.load_split("B", limit=args.n, seed=0)
        f_b = penultimate(spec.model, spec.normalize(xb)).numpy()
        per_class = {fmnist.CLASS_NAMES[c]: round(100 * float((spec.model(images[labels == c]).argmax(1) == c).float().mean()), 1)
                     for c in range(10)}
        # speed: same prompts and settings, batched generate() vs a per-image __call__ loop
        k = args.speed_images
        t0 = time.time()
        generate(rows[:k], pipe, Path(tmp) / "speed", batch_size=k, generator_id=args.generator, progress=False, **sample)
        batched = k / (time.time() - t0)
        t0 = time.time()
        for r in rows[:k]:
            pipe(r.prompt, num_inference_steps=steps, guidance_scale=guidance, height=sample["height"],
                 width=sample["width"], generator=torch.Generator().manual_seed(r.seed))
        plain = k / (time.time() - t0)
    res = {"generator": args.generator, "steps": steps, "guidance": guidance, "n": args.n,
           "classifier_agreement_top1": round(agreement, 2), "per_class_agreement": per_class,
           "fd_generated_vs_test": round(frechet(f_gen, f_test), 3), "fd_splitB_vs_test": round(frechet(f_b, f_test), 3),
           "images_per_s_generate_full_run": round(args.n / gen_seconds, 2),
           "images_per_s_batched": round(batched, 2), "images_per_s_plain_call_loop": round(plain, 2),
           "speedup_vs_plain": round(batched / plain, 2), "torch_threads": torch.get_num_threads()}
    write_json(out.with_suffix(".json"), res)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    table = "\n".join(f"| {k} | {v} |" for k, v in res.items() if k != "per_class_agreement")
    pcs = " | ".join(f"{k}: {v}" for k, v in per_class.items())
    write_text(out.with_suffix(".md"), f"# Generator quality: {args.generator}\n\nCommand: `{cmd}` (CPU)\n\n| metric | value |\n|---|---|\n"
               f"{table}\n\nPer-class agreement (%): {pcs}\n\n![samples]({out.name}_grid.png)\n")
    print(res)


if __name__ == "__main__":
    main()
