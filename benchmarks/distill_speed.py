"""BN-inversion (``distill``) speed: images per second, the code of a given commit ("before") against this tree.

"before" is the ``distill`` module of ``--before`` (default ``a8fe352``; ``src/dfquant/quant/distill.py`` up to its
move to ``src/dfquant/data/distill.py``; its "genie" is what is now "genie-lite" and its "zeroq" the former pixel
maths), read with ``git show`` and loaded as a temporary module;
"after" is this working tree (``genie`` = Genie-D, ``zeroq`` = ZeroQ as their references compute them, ``genie-lite``).
Each row optimizes one batch of ``--batch`` images for ``--iters`` steps (after a 1-step warm-up) on
``--threads`` CPU threads; rows alternate within each of ``--repeats`` rounds and the fastest round is kept, so every
variant sees the same machine load. Rows ``after-nchw`` run the after code with its channels-last layouts switched
off (``CHANNELS_LAST_MODEL``: the model's weights and input in NCHW) and ``after-unfused`` with the generators' nearest
upsampling + 3x3 convolution pairs computed as two ops (``FUSE_UPSAMPLE_CONV``): what each of those choices is worth
on this CPU. ``zeroq`` is also timed at its reference batch of 32.

Rates: ``image_steps_s`` = batch x steps / s (the throughput of the optimization); ``images_s_default`` = the images
finished per second at the method's default number of steps (before: 500 for both; after: ``METHODS``), i.e. what
a 1024-image ``dfq distill`` gets. Models: the zoo ResNet-20 (``fmnist/resnet20``) and, when
``../shared/realworld/akamaster`` exists, akamaster's CIFAR-10 ResNet-20 with its pretrained weights (skipped
otherwise; its files are read in place).

    python benchmarks/distill_speed.py --threads 1     # writes benchmarks/results/distill_speed.{csv,md}
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dfquant.io import atomic_path, write_text
from dfquant.models.registry import get_model
from dfquant.data import distill as after

ROOT = Path(__file__).resolve().parents[1]
REALWORLD = ROOT.parent / "shared" / "realworld" / "akamaster"
FIELDS = ["model", "method", "code", "batch", "iters", "threads", "seconds", "step_ms", "image_steps_s",
          "default_iters", "images_s_default"]
BEFORE_DEFAULT_ITERS = 500  # the former distill(iters=500) for both methods


def load_before(rev: str):
    """The ``distill`` module of git revision ``rev``, as a temporary module (not on ``sys.modules``' dfquant path)."""
    for where in ("src/dfquant/data/distill.py", "src/dfquant/quant/distill.py"):  # the second: before its move
        shown = subprocess.run(["git", "show", f"{rev}:{where}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    src = shown.stdout
    fd, path = tempfile.mkstemp(prefix="distill_before_", suffix=".py")
    with os.fdopen(fd, "w") as fh:
        fh.write(src)
    try:
        spec = importlib.util.spec_from_file_location("dfquant_distill_before", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        os.unlink(path)
    return mod


def realworld_resnet20():
    """akamaster's ResNet-20 with its pretrained CIFAR-10 weights, loaded from the shared folder in place."""
    spec = importlib.util.spec_from_file_location("akamaster_resnet", REALWORLD / "resnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.resnet20()
    state = torch.load(REALWORLD / "pretrained_models" / "resnet20-12fca82f.th", map_location="cpu",
                       weights_only=False)["state_dict"]
    missing, unexpected = model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model.eval()


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return platform.processor() or "unknown CPU"
    lines = info.read_text().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    return f"{name} ({sum(ln.startswith('processor') for ln in lines)} logical CPUs visible)"


def loadavg() -> str:
    p = Path("/proc/loadavg")
    return " ".join(p.read_text().split()[:3]) if p.exists() else "?"


NCHW = {"CHANNELS_LAST_MODEL": False}
UNFUSED = {"FUSE_UPSAMPLE_CONV": False}


def time_one(fn, model, method: str, batch: int, iters: int, flags: dict | None = None) -> float:
    """Seconds for ``iters`` steps of one batch (after a 1-step warm-up), with ``flags`` set on the after module."""
    old = {k: getattr(after, k) for k in flags or {}}
    for k, v in (flags or {}).items():
        setattr(after, k, v)
    try:
        kw = dict(method=method, batch_size=batch, seed=0, progress=False)
        fn(model, batch, (3, 32, 32), iters=1, **kw)
        t0 = time.perf_counter()
        fn(model, batch, (3, 32, 32), iters=iters, **kw)
        return time.perf_counter() - t0
    finally:
        for k, v in old.items():
            setattr(after, k, v)


def _best_ms(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(1000 * best, 1)


def micro_rows() -> list[tuple[str, str, float]]:
    """Forward + backward times of the pieces behind the design choices: (what, variant, ms)."""
    import torch.nn.functional as F
    from torch import nn

    rows = []
    torch.manual_seed(0)
    x = (torch.randn(128, 16, 32, 32) * 2 + 1).requires_grad_(True)

    def run(stat):
        def f():
            x.grad = None
            a, b = stat()
            (a.sum() + b.sum()).backward()
        return f

    rows += [("BN statistics of a 128x16x32x32 input over N,H,W", "torch.std_mean",
              _best_ms(run(lambda: torch.std_mean(x, (0, 2, 3))))),
             ("", "two-pass (distill._mean_var)", _best_ms(run(lambda: after._mean_var(x, (0, 2, 3))))),
             ("per-image statistics (zeroq) over H,W", "torch.var_mean", _best_ms(run(lambda: torch.var_mean(x, (2, 3))))),
             ("", "two-pass (distill._mean_var)", _best_ms(run(lambda: after._mean_var(x, (2, 3)))))]
    for cin, cout, h in [(128, 64, 8), (64, 3, 16)]:
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        u = torch.randn(128, cin, h, h, requires_grad=True)

        def pair(fused):
            def f():
                u.grad = None
                conv.zero_grad()
                y = after.upsample_conv(u, conv) if fused else conv(F.interpolate(u, scale_factor=2, mode="nearest"))
                y.square().sum().backward()
            return f

        what = f"nearest 2x upsample + 3x3 conv {cin}->{cout}, 128x{cin}x{h}x{h} in"
        rows += [(what, "two ops", _best_ms(pair(False))), ("", "one transposed conv (fused)", _best_ms(pair(True)))]
    z = torch.randn(128, 256, requires_grad=True)
    for name, make in (("Genie-D generator, 32 px", lambda: after.GenieGenerator(32)),
                       ("genie-lite generator, 32 px", lambda: after._LiteGenerator(256, 32))):
        for layout in ("NCHW", "channels-last"):
            gen = make()
            if layout != "NCHW":
                gen.to(memory_format=torch.channels_last)

            def f(gen=gen):
                z.grad = None
                gen.zero_grad()
                gen(z).square().sum().backward()

            rows.append((name if layout == "NCHW" else "", f"fused, {layout}", _best_ms(f)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="a8fe352", help="git revision whose distill.py is 'before'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=6, help="timed steps per row")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/distill_speed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    before = load_before(args.before)
    models = {"zoo fmnist/resnet20": get_model("fmnist/resnet20").model.eval()}
    if REALWORLD.exists():
        models["akamaster resnet20 (CIFAR-10)"] = realworld_resnet20()
    else:
        print(f"{REALWORLD} is absent: the real-world row is skipped", flush=True)
    variants = [  # (code label, module, method, batch, flags on the after module)
        ("before", before, "genie", args.batch, None), ("before", before, "zeroq", args.batch, None),
        ("after", after, "genie", args.batch, None), ("after", after, "zeroq", args.batch, None),
        ("after", after, "genie-lite", args.batch, None),
        ("after-nchw", after, "genie", args.batch, NCHW), ("after-nchw", after, "zeroq", args.batch, NCHW),
        ("after-nchw", after, "genie-lite", args.batch, NCHW),
        ("after-unfused", after, "genie", args.batch, UNFUSED), ("after-unfused", after, "genie-lite", args.batch, UNFUSED),
        ("after", after, "zeroq", after.METHODS["zeroq"].batch_size, None),
    ]
    load0, t_start = loadavg(), time.perf_counter()
    best: dict[tuple, float] = {}
    for r in range(args.repeats):
        for mname, model in models.items():
            for code, mod, method, batch, flags in variants:
                s = time_one(mod.distill, model, method, batch, args.iters, flags)
                k = (mname, method, code, batch)
                best[k] = min(best.get(k, float("inf")), s)
                print(f"round {r + 1}: {mname} {code} {method} batch {batch}: {s:.2f} s", flush=True)
    micro = micro_rows()
    rows = []
    for (mname, method, code, batch), s in best.items():
        default = BEFORE_DEFAULT_ITERS if code == "before" else after.METHODS[method].iters
        step = s / args.iters
        rows.append({"model": mname, "method": method, "code": code, "batch": batch, "iters": args.iters,
                     "threads": args.threads, "seconds": round(s, 3), "step_ms": round(1000 * step, 1),
                     "image_steps_s": round(batch / step, 1), "default_iters": default,
                     "images_s_default": round(batch / (step * default), 3)})
    with atomic_path(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)

    def rate(mname, method, code, batch=args.batch, field="image_steps_s"):
        r = next((r for r in rows if (r["model"], r["method"], r["code"], r["batch"]) == (mname, method, code, batch)),
                 None)
        return r[field] if r else None

    def x(a, b):
        return f"{a / b:.2f}x" if a and b else ""

    summary = ["| model | before -> after | before image-steps/s | after image-steps/s | after / before | "
               "after without channels-last | after unfused | before images/s (500 steps) | "
               "after images/s (default steps) |", "|---|---|---|---|---|---|---|---|---|"]
    pairs = [("genie", "genie-lite", "same maths"), ("zeroq", "zeroq", "ZeroQ's maths"), ("genie", "genie", "Genie-D's maths")]
    for mname in models:
        for old, new, what in pairs:
            b, a = rate(mname, old, "before"), rate(mname, new, "after")
            nchw, unf = rate(mname, new, "after-nchw"), rate(mname, new, "after-unfused")
            summary.append(f"| {mname} | {old} -> {new} ({what}) | {b} | {a} | {x(a, b)} | {nchw or ''} | {unf or ''} | "
                           f"{rate(mname, old, 'before', field='images_s_default')} | "
                           f"{rate(mname, new, 'after', field='images_s_default')} |")
        z32 = after.METHODS["zeroq"].batch_size
        summary.append(f"| {mname} | zeroq at its reference batch {z32} | | {rate(mname, 'zeroq', 'after', z32)} | | | | | "
                       f"{rate(mname, 'zeroq', 'after', z32, 'images_s_default')} |")
    table = "| " + " | ".join(FIELDS) + " |\n|" + "---|" * len(FIELDS) + "\n" + "".join(
        "| " + " | ".join(str(r[f]) for f in FIELDS) + " |\n" for r in rows)
    write_text(out.with_suffix(".md"), f"""# distill_speed: BN-inversion images per second, before and after

Command: `{command}` (total {time.perf_counter() - t_start:.0f} s; load average {load0} at the start, {loadavg()} at
the end; a load above the thread count means other jobs shared the CPUs).

Machine: {cpu_model()}; torch {torch.__version__}, {args.threads} thread(s) (`torch.set_num_threads`).

"before" is commit {args.before}'s `distill` module (loaded from `git show`): its `genie` is today's
`genie-lite` (same maths, so that pair measures the speed work alone) and its `zeroq` the former batch-statistics
pixel maths. "after" is this tree: `genie` = Genie-D and `zeroq` = ZeroQ as their reference codes compute them
(other losses, generator and batch size, so those pairs compare what a user waits for, not the same work).
One batch of {args.batch}, {args.iters} timed steps after a 1-step warm-up, fastest of {args.repeats} interleaved rounds.
image-steps/s = batch x steps / s; images/s at default steps = images finished per second with the method's default
number of steps per batch (before: 500 for both; after: genie 4000, zeroq 500, genie-lite 500).
"without channels-last": `CHANNELS_LAST_MODEL = False` (the model's weights and input in NCHW); "unfused": `FUSE_UPSAMPLE_CONV =
False` (nearest upsampling and the 3x3 convolution after it as two ops instead of one transposed convolution).

{chr(10).join(summary)}

Design measurements (forward + backward, batch 128, fastest of 3, same threads), behind the choices in
`distill.py`: two-pass statistics instead of `torch.std_mean` / `torch.var_mean`, the fused upsampling + convolution,
and NCHW generators:

| piece | variant | ms |
|---|---|---|
{"".join(f"| {w} | {v} | {ms} |{chr(10)}" for w, v, ms in micro)}
All rows:

{table}""")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
