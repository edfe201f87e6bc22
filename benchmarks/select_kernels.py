"""Why the fused quantizer multiplies by 0/1 float masks instead of selecting: elementwise kernel times on this CPU.

Times (median of 30 calls, 1 thread) of the operations a QDrop step can use on a 32x16x32x32 float tensor with a
random 50% mask: ``torch.where``/``masked_fill_`` against a multiply, and the random-number draw itself.

    python benchmarks/select_kernels.py     # writes benchmarks/results/select_kernels.md
"""

from __future__ import annotations

import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from dfquant.io import write_text


def _ms(fn, n: int = 30) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(32, 16, 32, 32), torch.randn(32, 16, 32, 32)
    mask = torch.rand_like(x) < 0.5
    maskf = mask.float()
    rows = {
        "torch.where(mask, x, y)": lambda: torch.where(mask, x, y),
        "x.clone().masked_fill_(mask, 0)": lambda: x.clone().masked_fill_(mask, 0.0),
        "x.clone() (the copy above alone)": lambda: x.clone(),
        "x * y": lambda: x * y,
        "x * maskf (0/1 float mask)": lambda: x * maskf,
        "x * (1 - maskf) + y * maskf": lambda: (x * (1.0 - maskf)).addcmul_(y, maskf),
        "torch.rand_like(x)": lambda: torch.rand_like(x),
    }
    table = "| operation | ms |\n|---|---|\n" + "".join(f"| `{k}` | {_ms(f):.3f} |\n" for k, f in rows.items())
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_text(Path("benchmarks/results/select_kernels.md"),
               f"# Select vs multiply kernels (1 thread, 32x16x32x32 float32, random 50% mask)\n\nCommand: `{cmd}` "
               "(the machine may have been shared; the ratios are what matter)\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
