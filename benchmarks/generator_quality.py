"""Quality and speed of a text-to-image generator as a calibration source.

* agreement: the zoo ResNet-20's top-1 on N generated single-class images, taking the
  prompt's class as the label (how often the classifier agrees with the prompt);
* FD: Fréchet distance between ResNet-20 penultimate features of the generated images
  and of the real test set (an FID-like number in this classifier's feature space;
  for reference the same distance between split B and the test set is reported);
* mixup top-2: on N mixup-class prompts ("a photo of a X and a Y"), how often the ResNet-20's
  top-2 classes are exactly the two named ones (both objects were drawn recognisably), and how
  often its top-1 is one of them;
* speed: images/s of dfquant's batched generation vs a plain per-image
  ``StableDiffusionPipeline.__call__`` loop on the same model and settings (``--speed-images 0`` skips it).
Several ``--generators`` are measured side by side (e.g. ``mini mini-compose``, issue 22).
Writes <out>.md, <out>.json, and per generator <out>_grid[_<name>].png (single-class prompts) and
<out>_mixup_<name>.png (mixup prompts).
"""

from __future__ import annotations

import argparse
import json
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
from dfquant.models.evaluate import top1_tensors
from dfquant.generate.grid import contact_sheets
from dfquant.generate.pipeline import EMBEDDED, generate, load_pipeline, mini_generator_dir, sampling
from dfquant.io import write_json, write_text
from dfquant.models.registry import get_model
from dfquant.prompts import make_manifest, read_manifest


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def _render(pipe, generator: str, rows, folder: Path, sample: dict, spec) -> tuple[torch.Tensor, float]:
    t0 = time.time()
    generate(rows, pipe, folder, batch_size=64, generator_id=generator, **sample)
    return load_folder_images(folder, spec.transform()), time.time() - t0


def measure(generator: str, n: int, steps: int | None, speed_images: int, out: Path, spec, f_test: np.ndarray,
            grid_name: str) -> dict:
    """Every metric of one generator (see the module docstring)."""
    pipe = load_pipeline(generator)
    pipe.set_progress_bar_config(disable=True)
    sample = sampling(generator, pipe, steps)
    rows = make_manifest(fmnist.CLASS_NAMES, n, "single", seed=0)
    mix_rows = make_manifest(fmnist.CLASS_NAMES, n, "mixup", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        images, gen_seconds = _render(pipe, generator, rows, Path(tmp) / "single", sample, spec)
        labels = torch.tensor([r.classes[0] for r in read_manifest(Path(tmp) / "single" / "manifest.jsonl")])
        contact_sheets(Path(tmp) / "single", out.parent / grid_name, n=40)
        mixed, _ = _render(pipe, generator, mix_rows, Path(tmp) / "mixup", sample, spec)
        pairs = torch.tensor([r.classes for r in read_manifest(Path(tmp) / "mixup" / "manifest.jsonl")])
        contact_sheets(Path(tmp) / "mixup", out.parent / f"{out.name}_mixup_{generator}.png", n=40)
        with torch.no_grad():
            top2 = torch.cat([spec.model(mixed[i:i + 256]).topk(2, 1).indices for i in range(0, len(mixed), 256)])
        both = (top2.sort(1).values == pairs.sort(1).values).all(1).float().mean().item()
        top1_named = (top2[:, :1] == pairs).any(1).float().mean().item()
        agreement = top1_tensors(spec.model, images, labels)
        f_gen = penultimate(spec.model, images).numpy()
        with torch.no_grad():
            per_class = {fmnist.CLASS_NAMES[c]: round(100 * float((spec.model(images[labels == c]).argmax(1) == c).float().mean()), 1)
                         for c in range(10)}
        res = {"generator": generator, "steps": sample["steps"], "guidance": sample["guidance"], "n": n,
               "classifier_agreement_top1": round(agreement, 2), "per_class_agreement": per_class,
               "fd_generated_vs_test": round(frechet(f_gen, f_test), 3),
               "mixup_top2_both_named": round(100 * both, 2), "mixup_top1_one_of_named": round(100 * top1_named, 2),
               "images_per_s_generate_full_run": round(n / gen_seconds, 2)}
        if speed_images:  # same prompts and settings, batched generate() vs a per-image __call__ loop
            k = speed_images
            t0 = time.time()
            generate(rows[:k], pipe, Path(tmp) / "speed", batch_size=k, generator_id=generator, progress=False, **sample)
            batched = k / (time.time() - t0)
            t0 = time.time()
            for r in rows[:k]:
                pipe(r.prompt, num_inference_steps=sample["steps"], guidance_scale=sample["guidance"],
                     height=sample["height"], width=sample["width"], generator=torch.Generator().manual_seed(r.seed))
            plain = k / (time.time() - t0)
            res |= {"images_per_s_batched": round(batched, 2), "images_per_s_plain_call_loop": round(plain, 2),
                    "speedup_vs_plain": round(batched / plain, 2)}
    card = mini_generator_dir(generator) / "model_card.json" if generator in EMBEDDED else None
    if card is not None and card.is_file():  # the embedded generators record how they were trained
        info = json.loads(card.read_text())
        res |= {"train_seconds": round(info.get("vae_seconds", 0) + info.get("unet_seconds", 0)),
                "weights_mb": round(sum(f.stat().st_size for f in card.parent.rglob("*.safetensors")) / 2**20, 1)}
    res["torch_threads"] = torch.get_num_threads()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generators", nargs="+", default=["mini"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--speed-images", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/generator_quality")
    args = ap.parse_args()
    out = Path(args.out)
    spec = get_model("fmnist/resnet20")
    xt, _ = fmnist.load_split("test")
    f_test = penultimate(spec.model, spec.normalize(xt)).numpy()
    xb, _ = fmnist.load_split("B", limit=args.n, seed=0)
    fd_b = round(frechet(penultimate(spec.model, spec.normalize(xb)).numpy(), f_test), 3)
    results = [measure(g, args.n, args.steps, args.speed_images, out, spec, f_test,
                       f"{out.name}_grid.png" if i == 0 else f"{out.name}_grid_{g}.png")
               for i, g in enumerate(args.generators)]
    write_json(out.with_suffix(".json"), {"fd_splitB_vs_test": fd_b, "generators": results})
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    keys = [k for k in dict.fromkeys(k for r in results for k in r) if k not in ("generator", "per_class_agreement")]
    table = "| metric | " + " | ".join(r["generator"] for r in results) + " |\n|---|" + "---|" * len(results) + "\n"
    table += "".join(f"| {k} | " + " | ".join(str(r.get(k, "")) for r in results) + " |\n" for k in keys)
    per_class = "".join(f"| {c} | " + " | ".join(str(r["per_class_agreement"][c]) for r in results) + " |\n"
                        for c in fmnist.CLASS_NAMES)
    sheets = "".join(f"\n{r['generator']}: ![single]({out.name}_grid{'' if i == 0 else '_' + r['generator']}.png) "
                     f"![mixup]({out.name}_mixup_{r['generator']}.png)\n" for i, r in enumerate(results))
    write_text(out.with_suffix(".md"), f"# Generator quality: {', '.join(args.generators)}\n\nCommand: `{cmd}` (CPU)\n\n"
               f"{table}\nFréchet distance of real split B to the test set (the floor): {fd_b}\n\n"
               "mixup_top2_both_named: share of mixup-prompt images whose classifier top-2 is exactly the two named classes; "
               "mixup_top1_one_of_named: share whose top-1 is one of them.\n\n"
               "Per-class agreement on single-class prompts (%):\n\n| class | " + " | ".join(r["generator"] for r in results)
               + " |\n|---|" + "---|" * len(results) + "\n" + per_class + sheets)
    print(results)


if __name__ == "__main__":
    main()
