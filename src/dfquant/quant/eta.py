"""A time estimate for block reconstruction, printed once after its first iterations.

The paper's 20,000 iterations per block take hours on a CPU; a user should learn that within
seconds, not after the first block. :class:`EtaTrace` rides on ``reconstruct(trace=...)``, which
appends one entry per optimization step: it keeps none of them, times a few steps of the first
unit after a short warm-up, and scales them to every unit by the units' forward times
(:func:`unit_forward_seconds`; a step's backward costs about as much as its forward).
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@torch.no_grad()
def unit_forward_seconds(qmodel: nn.Module, units: list[str], x: torch.Tensor) -> list[float]:
    """Forward time of each unit inside one pass of ``qmodel`` on ``x`` (the faster of two passes).

    The passes must not change the model: quantizers are switched off (an uninitialized one would
    otherwise take its range from ``x``) and every module is in eval mode (BatchNorm keeps its
    statistics); both are restored afterwards."""
    modes = {m: m.training for m in qmodel.modules()}
    switches = {m: m.enabled for m in qmodel.modules() if hasattr(m, "enabled") and hasattr(m, "initialized")}
    start: dict[str, float] = {}
    best = {u: float("inf") for u in units}

    def pre(name: str):
        return lambda mod, args: start.__setitem__(name, time.perf_counter())

    def post(name: str):
        return lambda mod, args, out: best.__setitem__(name, min(best[name], time.perf_counter() - start[name]))

    hooks = [h for u in units for h in (qmodel.get_submodule(u).register_forward_pre_hook(pre(u)),
                                        qmodel.get_submodule(u).register_forward_hook(post(u)))]
    try:
        qmodel.eval()
        for q in switches:
            q.enabled = False
        for _ in range(2):
            qmodel(x)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
        for q, enabled in switches.items():
            q.enabled = enabled
    return [best[u] if best[u] != float("inf") else 0.0 for u in units]


class EtaTrace(list):
    """Drop-in ``trace`` list for :func:`dfquant.quant.reconstruct.reconstruct` that stores nothing and
    prints the estimated total once ``warmup + steps`` iterations have run (none for shorter runs).

    ``unit_seconds``: forward time of each unit (first = the unit reconstructed first)."""

    def __init__(self, unit_seconds: list[float], iters: int, warmup: int = 3, steps: int = 20) -> None:
        super().__init__()
        first = max(unit_seconds[0], 1e-9)
        # a unit costs at least as much per step as the first one (optimizer and loss overheads)
        self.scale = sum(max(1.0, s / first) for s in unit_seconds)
        self.units, self.iters, self.warmup, self.steps = len(unit_seconds), iters, warmup, steps
        self.seen, self.t0 = 0, 0.0
        self.message: str | None = None

    def append(self, entry: object) -> None:  # noqa: ARG002 - the entry itself is not needed
        self.seen += 1
        if self.seen == self.warmup:
            self.t0 = time.perf_counter()
        elif self.seen == self.warmup + self.steps:
            per_step = (time.perf_counter() - self.t0) / self.steps
            total = per_step * self.iters * self.scale
            self.message = (f"estimated reconstruction time: {_duration(total)} ({self.units} blocks x {self.iters} "
                            f"iterations); lower --iters for a quicker, coarser run")
            from tqdm.auto import tqdm

            tqdm.write(self.message, file=sys.stderr)
