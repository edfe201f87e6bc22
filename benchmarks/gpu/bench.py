"""GPU benchmark (issue 9): SD-v1.5-size generation throughput and ResNet-50 Genie-M timing.

Part ``generate``: a random-weight SD v1.5 architecture (``tests/architectures.py``,
859.5M-parameter UNet) at 512 px in fp16, ``--gen-steps`` sampling steps (25 and 50, SD v1.5's
PNDM scheduler), guidance 3.5 (so the UNet runs on a doubled batch, as in calibration-set generation), with
and without ``torch.compile`` of the UNet. Reports images/s after one warm-up batch.

Part ``families``: images/s of each generator family at its preset (steps, guidance, dtype)
and native resolution, batch ``--family-batch``, after one warm-up batch. Families with a
written-out architecture (sd15, sd-turbo, sdxl-turbo, sd35-medium, flux-schnell) are built with
random weights at their published sizes (``random_pipeline``); the others (pixart-sigma, sana,
flux2-klein) are timed only when their weights are in the Hugging Face cache, else skipped with
a line saying so. ``--smoke`` runs every family's tiny random pipeline at 32 px instead.

Part ``recon``: torchvision ResNet-50 (random weights, ``--recon-images`` random-normal
images at 224 px; timing does not depend on pixel content) quantized W4A4 with Genie-M,
``--recon-iters`` iterations per block, batch 32. Reports seconds per block (input capture
+ optimization), total seconds, peak GPU memory and the process's peak host RSS.

Without a CUDA GPU the script says so and exits 0 (``--smoke`` instead runs both parts at toy
sizes on the CPU, which the test suite uses to keep this script working). Results go to
``<out>.csv`` / ``<out>.md`` with the GPU name and the exact command.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # architectures.py: the written-out pipelines

from dfquant.io import write_text  # noqa: E402

FIELDS = ["part", "device", "setting", "value", "unit"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["generate", "families", "recon"],
                    choices=["generate", "families", "recon"])
    ap.add_argument("--families", nargs="+", default=None, help="preset names (default: all but mini)")
    ap.add_argument("--family-batch", type=int, default=4)
    ap.add_argument("--gen-steps", nargs="+", type=int, default=[25, 50])
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--gen-batches", type=int, default=3, help="timed batches per setting (after one warm-up)")
    ap.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--recon-images", type=int, default=1024)
    ap.add_argument("--recon-iters", type=int, default=500, help="Genie-M iterations per block (paper: 20000)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: measure the CPU path (e.g. --parts recon for host peak RSS)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (exercises the code, measures nothing)")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing measured. Run this script where a GPU is available "
              "(or pass --smoke to exercise it on the CPU at toy sizes).")
        return 0
    device = "cpu" if args.smoke else args.device
    device_name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name()
    rows: list[dict] = []

    def record(part: str, setting: str, value: float, unit: str) -> None:
        row = {"part": part, "device": device_name, "setting": setting, "value": round(value, 4), "unit": unit}
        print(row, flush=True)
        rows.append(row)

    if "generate" in args.parts:
        _bench_generate(args, device, record)
    if "families" in args.parts:
        _bench_families(args, device, record)
    if "recon" in args.parts:
        _bench_recon(args, device, record)
    out = Path(args.out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out.with_suffix(".csv"), buf.getvalue())
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    table = "| part | setting | value | unit |\n|---|---|---|---|\n" + "".join(
        f"| {r['part']} | {r['setting']} | {r['value']} | {r['unit']} |\n" for r in rows)
    write_text(out.with_suffix(".md"), f"# {out.name}\n\nDevice: {device_name}; torch {torch.__version__}.\n\n"
               f"Command: `{cmd}`\n\nRandom weights, timing only; the settings are in the script's docstring "
               "(benchmarks/gpu/bench.py).\n\n" + table)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return 0


def _cpu_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "cpu") if Path("/proc/cpuinfo").exists() else "cpu"
    return f"{model}, {torch.get_num_threads()} torch threads"


def _images_per_second(batch, n_batches: int, batch_size: int, device) -> float:
    """Images per second of ``n_batches`` calls of ``batch`` (``batch_size`` images each), after one untimed
    warm-up call (allocator, cuDNN autotuning, ``torch.compile``)."""
    batch()
    _sync(device)
    t0 = time.time()
    for _ in range(n_batches):
        batch()
    _sync(device)
    return batch_size * n_batches / (time.time() - t0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _bench_generate(args, device: str, record) -> None:
    from architectures import random_pipeline
    from dfquant.generate.mini import build_pipeline

    if args.smoke:
        pipe, size, label = build_pipeline("tiny"), 32, "tiny random pipeline 32px fp32"
    else:
        dtype = "float16" if device == "cuda" else "float32"
        pipe, size, label = random_pipeline("sd15", dtype=dtype, device=device), 512, f"sd15-arch 512px {dtype}"

    prompts = ["a photo of a kite and a vulture"] * args.gen_batch
    for compiled in args.compile:
        if compiled == "on":
            pipe.unet = torch.compile(pipe.unet)
        for steps in args.gen_steps:
            def batch() -> None:
                pipe(prompts, num_inference_steps=steps, guidance_scale=3.5, height=size, width=size, output_type="np")

            rate = _images_per_second(batch, args.gen_batches, args.gen_batch, device)  # after a warm-up/compile call
            record("generate", f"{label} batch {args.gen_batch}, {steps} steps, compile {compiled}",
                   rate, "images/s")


def _bench_families(args, device: str, record) -> None:
    import gc

    from dfquant.errors import DfqError
    from architectures import ARCHITECTURES, TINY, random_pipeline, tiny_pipeline
    from dfquant.generate.pipeline import PRESETS, call_kwargs, load_pipeline, place, sampling

    names = args.families or [n for n in PRESETS if n != "mini"]
    for name in names:
        preset = PRESETS[name]
        dtype = "float32" if args.smoke else preset["gpu_dtype"]
        if args.smoke:
            pipe, how = (tiny_pipeline(name), "tiny random") if name in TINY else (None, "")
        elif name in ARCHITECTURES:
            pipe, how = random_pipeline(name, dtype=dtype, device=device), "random weights, published size"
        else:
            os.environ["HF_HUB_OFFLINE"] = "1"  # cached weights only: never wait on (or download from) the hub
            try:
                pipe, how = load_pipeline(name, dtype, device), "hub weights"
            except DfqError as exc:
                print(f"{name}: skipped ({exc})", flush=True)
                continue
        if pipe is None:
            continue
        if not args.smoke and name in ARCHITECTURES:
            place(pipe, device)  # VAE slicing (and offload if it does not fit), as dfq generate does
        sample = sampling(name, pipe, 1 if args.smoke else None, None, 32 if args.smoke else None,
                          32 if args.smoke else None)
        prompts = ["a photo of a kite and a vulture"] * args.family_batch
        extra = call_kwargs(pipe, sample["call"])

        def batch() -> None:
            gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            pipe(prompt=prompts, generator=gens, num_inference_steps=sample["steps"], guidance_scale=sample["guidance"],
                 height=sample["height"], width=sample["width"], output_type="np", **extra)

        rate = _images_per_second(batch, args.gen_batches, args.family_batch, device)
        record("families", f"{name} ({how}) {sample['height']}px {dtype}, {sample['steps']} steps, guidance "
               f"{sample['guidance']}, batch {args.family_batch}", rate, "images/s")
        del pipe
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def _bench_recon(args, device: str, record) -> None:
    import torchvision

    from dfquant.quant.api import quantize

    if args.smoke:
        model, n, size, iters = torchvision.models.resnet18(num_classes=10), 64, 32, 2
    else:
        model, n, size, iters = torchvision.models.resnet50(), args.recon_images, 224, args.recon_iters
    calib = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    _, info = quantize(model.eval(), calib, "genie-m", 4, 4, iters=iters, batch_size=32, device=device)
    total = time.time() - t0
    arch = "resnet18 32px" if args.smoke else "resnet50 224px"
    for u in info["units"]:
        record("recon", f"{arch}, {n} images, {iters} iters: {u['unit']}", u["seconds"], "s")
    record("recon", f"{arch}: set-up (weight range init, FP targets)", total - sum(u["seconds"] for u in info["units"]), "s")
    record("recon", f"{arch}, {n} images, {iters} iters: total", total, "s")
    if device == "cuda":
        record("recon", f"{arch}: peak GPU memory", torch.cuda.max_memory_allocated() / 2**30, "GiB")
    record("recon", f"{arch}: peak host RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB")


if __name__ == "__main__":
    sys.exit(main())
