"""Reconstruction speed: Genie-M training iterations per second for each kind of unit, before and after.

"before" is the reconstruction code of a given git revision (default ``ee134e8``, the last commit before issue 17),
checked out into a temporary worktree; "after" is this working tree. Each measurement runs in its own subprocess
(``--worker``) with 1 or 2 threads; the two versions alternate, ``--repeats`` times, and the table reports medians,
so both versions see the same machine load. Units (fixed random inputs of the zoo models' shapes, batch 32, W2A4
Genie-M, QDrop on): the first conv, a basic block, a downsampling basic block and the classifier of ResNet-20, an
inverted residual of MobileNetV2 and a transformer block of the ViT; and a complete ResNet-20 Genie-M run
(1024 random images as the reference setting, every unit's input capture and range init included; its rate counts
iterations of all units together).

The complete run is timed at ``--complete-iters`` and at a quarter of it; a straight line through the two wall times
(fixed cost + cost per iteration) projects the time of the issue's setting, 2000 iterations per block. Issue 17
measured the reference Genie code at 2281 s and the "before" dfquant at 2111 s on that setting, so the
projected "after" time is also given as a share of the reference's (``REFERENCE_OVER_BEFORE``).

    python benchmarks/recon_speed.py            # writes benchmarks/results/recon_speed.md (+ .csv, .png)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

UNITS = {  # label -> (model, unit)
    "first conv": ("fmnist/resnet20", "conv1"),
    "basic block": ("fmnist/resnet20", "layer1.1"),
    "downsample block": ("fmnist/resnet20", "layer2.0"),
    "inverted residual": ("fmnist/mobilenetv2", "features.3"),
    "linear": ("fmnist/resnet20", "fc"),
    "ViT block": ("fmnist/vit", "blocks.1"),
    "complete ResNet-20": ("fmnist/resnet20", "*"),  # every unit, with its input capture (quantize())
}
ROOT = Path(__file__).resolve().parents[1]
REFERENCE_OVER_BEFORE = 2281 / 2111  # issue 17's table: reference Genie code vs dfquant before, same settings
TARGET_ITERS = 2000


def worker(model: str, unit_name: str, iters: int, warmup: int) -> dict:
    """Time ``iters`` Genie-M iterations of one unit in this process (the code on ``sys.path``)."""
    import copy
    import time

    import torch

    from dfquant.models.registry import get_model
    from dfquant.quant.api import build_quantized, make_quant_config
    from dfquant.quant.modules import set_quant_state
    from dfquant.quant.reconstruct import ReconConfig, reconstruct_unit

    spec = get_model(model)
    if unit_name == "*":  # a whole Genie-M run on 1024 images: what a user waits for
        from dfquant.quant.api import quantize

        calib = torch.randn(1024, *spec.input_size)
        t0 = time.perf_counter()
        _, info = quantize(spec.model, calib, "genie-m", 2, 4, iters=iters, progress=False)
        seconds = time.perf_counter() - t0
        return {"it_per_s": iters * len(info["units"]) / seconds, "seconds": seconds}
    vit = None
    if spec.is_vit:
        from dfquant.quant.vit import default_vit_options

        vit = default_vit_options(spec.model)
    torch.manual_seed(0)
    qmodel = build_quantized(spec.model, make_quant_config("genie-m", 2, 4), vit=vit)
    fp = copy.deepcopy(qmodel)
    set_quant_state(fp, weights=False, acts=False)
    set_quant_state(qmodel, weights=True, acts=True)
    images = torch.randn(128, *spec.input_size)
    seen: list = []
    hook = fp.get_submodule(unit_name).register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    with torch.no_grad():
        fp(images)
    hook.remove()
    x, y = seen[0]
    times = []
    for n in (warmup, iters):  # the first call pays for allocator warm-up and lazy initialisation
        unit = copy.deepcopy(qmodel.get_submodule(unit_name))
        cfg = ReconConfig.preset("genie-m", iters=n, batch_size=32)
        t0 = time.perf_counter()
        reconstruct_unit(unit, x, x, y, cfg, unit_name)
        times.append(time.perf_counter() - t0)
    return {"it_per_s": iters / times[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="ee134e8", help="git revision whose reconstruction is 'before'")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--units", nargs="+", default=list(UNITS), choices=list(UNITS))
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--complete-iters", type=int, default=200, help="iterations per unit of the complete run "
                    "(also timed at a quarter of it, to project 2000)")
    ap.add_argument("--out", default="benchmarks/results/recon_speed")
    ap.add_argument("--keep", nargs="*", default=[], metavar="FILE",
                    help="earlier rows to keep in the table (JSON lines, one row per line, e.g. a previous run's log "
                         "lines); rows of the units measured now replace them")
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "UNIT", "ITERS", "WARMUP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model, unit, iters, warmup = args.worker
        print(json.dumps(worker(model, unit, int(iters), int(warmup))))
        return
    out = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.before], check=True)
        try:
            for label in args.units:
                model, unit = UNITS[label]
                for threads in args.threads:
                    counts = [args.complete_iters, args.complete_iters // 4] if unit == "*" else [args.iters]
                    speeds: dict[tuple[str, int], list[dict]] = {}
                    for _ in range(args.repeats):
                        for iters in counts:
                            for version, src in (("before", old / "src"), ("after", ROOT / "src")):
                                env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
                                res = subprocess.run([sys.executable, __file__, "--worker", model, unit, str(iters), "5"],
                                                     env=env, capture_output=True, text=True, check=True)
                                speeds.setdefault((version, iters), []).append(json.loads(res.stdout.strip().splitlines()[-1]))
                    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in speeds.items()}
                    b, a = med[("before", counts[0])]["it_per_s"], med[("after", counts[0])]["it_per_s"]
                    row = {"unit": label, "model": model, "module": unit, "threads": threads,
                           "before_it_s": round(b, 2), "after_it_s": round(a, 2), "speedup": round(a / b, 2)}
                    if unit == "*":
                        row |= {f"{v}_s_at_{TARGET_ITERS}": round(_project(med[(v, counts[0])]["seconds"], med[(v, counts[1])]["seconds"],
                                                                        counts[0], counts[1]), 1) for v in ("before", "after")}
                    rows.append(row)
                    print(rows[-1], flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    measured = {(r["unit"], r["threads"]) for r in rows}
    kept = [json.loads(line.replace("'", '"')) for f in args.keep for line in Path(f).read_text().splitlines()
            if line.startswith("{")]
    rows = [r for r in kept if (r["unit"], r["threads"]) not in measured] + rows
    _write(out, rows, command, args)


def _project(t_hi: float, t_lo: float, n_hi: int, n_lo: int) -> float:
    """Wall time at TARGET_ITERS from a straight line through (n_lo, t_lo) and (n_hi, t_hi)."""
    per_iter = (t_hi - t_lo) / (n_hi - n_lo)
    return t_hi + per_iter * (TARGET_ITERS - n_hi)


def _write(out: Path, rows: list[dict], command: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dfquant.io import write_text

    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    complete = "".join(
        f"\nComplete ResNet-20 run, {r['threads']} thread(s), projected to {TARGET_ITERS} iterations per block: before "
        f"{r[f'before_s_at_{TARGET_ITERS}']:.0f} s, after {r[f'after_s_at_{TARGET_ITERS}']:.0f} s "
        f"({r[f'before_s_at_{TARGET_ITERS}'] / r[f'after_s_at_{TARGET_ITERS}']:.2f}x); the reference Genie code would take "
        f"{REFERENCE_OVER_BEFORE:.3f} x before = {REFERENCE_OVER_BEFORE * r[f'before_s_at_{TARGET_ITERS}']:.0f} s, so after takes "
        f"**{r[f'after_s_at_{TARGET_ITERS}'] / (REFERENCE_OVER_BEFORE * r[f'before_s_at_{TARGET_ITERS}']):.2f}** of the reference's "
        "time (goal: at most 0.50).\n" for r in rows if f"after_s_at_{TARGET_ITERS}" in r)
    table = "| unit | model / module | threads | before (it/s) | after (it/s) | speed-up |\n|---|---|---|---|---|---|\n"
    table += "".join(f"| {r['unit']} | {r['model']} `{r['module']}` | {r['threads']} | {r['before_it_s']} | "
                     f"{r['after_it_s']} | {r['speedup']}x |\n" for r in rows)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    write_text(out.with_suffix(".md"), f"# Reconstruction speed (Genie-M W2A4, batch 32, QDrop on)\n\nCommand: `{command}`\n\n"
               f"CPU: {cpu}, {os.cpu_count()} cores, shared with other work while this ran; before = revision "
               f"`{args.before}`, after = this tree; median of {args.repeats} alternating runs of {args.iters} "
               f"iterations each (the complete run: {args.complete_iters} and {args.complete_iters // 4} per unit), in separate processes.\n\n"
               + table + complete + f"\n![speed-up]({out.with_suffix('.png').name})\n")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = [f"{r['unit']}\n{r['threads']} thr" for r in rows]
    ax.bar(range(len(rows)), [r["speedup"] for r in rows], color="tab:green")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("after / before (it/s)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
