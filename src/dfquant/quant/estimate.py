"""The reconstruction's run-time estimate: what :func:`~dfquant.quant.reconstruct.reconstruct` prints once its
second unit has timed its iterations.

:func:`unit_profile` measures, once, every full-precision unit's forward and backward on one batch and the elements
its activation quantizers take in; :func:`estimate_seconds` carries the first units' measured times over to the
whole run (every unit, both passes of a two-stage algorithm, input captures, loss evaluations, FP targets);
:func:`duration` says it in the unit a user reads. Measuring draws no random numbers and leaves no gradients, so
a run with the estimate computes what a run without it does.
"""

from __future__ import annotations

import itertools
import math
import time

import torch
from torch import nn

from dfquant.quant.modules import act_quantizers


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def unit_profile(fp_model: nn.Module, fp_units: dict[str, nn.Module], batch: torch.Tensor,
                  repeats: int = 2) -> dict[str, tuple[float, int]]:
    """For each unit of the full-precision copy, on ``batch`` (one training batch): the seconds of a forward and
    backward of the unit alone on its input (the fastest of ``repeats``; weight gradients, as a reconstruction step
    computes them, and none for the input), and how many elements its activation quantizers take in (the work of
    their range initialisation). One forward of ``fp_model`` in eval mode: no random numbers are drawn, and the
    gradients it makes are put back as they were."""
    seconds: dict[str, float] = {}
    elements: dict[str, int] = {}
    busy = [False]  # inside a unit's timed passes: no counting, no nested timing

    def time_unit(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if busy[0] or name in seconds:
            return
        busy[0] = True
        params = [q for q in module.parameters() if q.requires_grad]
        grads = [q.grad for q in params]
        try:
            x = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            best = math.inf
            for _ in range(repeats):
                t = time.perf_counter()
                with torch.enable_grad():
                    out = module(*x, **kwargs)
                    out = out if torch.is_tensor(out) else next(o for o in out if torch.is_tensor(o))
                    if out.requires_grad:
                        out.float().pow(2).sum().backward()
                best = min(best, time.perf_counter() - t)
            seconds[name] = best
        finally:
            for q, g in zip(params, grads):
                q.grad = g
            busy[0] = False

    def count(name: str, args: tuple) -> None:
        if not busy[0] and args and torch.is_tensor(args[0]):
            elements[name] = elements.get(name, 0) + args[0].numel()

    handles = []
    for name, module in fp_units.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, k, name=name: time_unit(name, m, a, k),
                                                        with_kwargs=True))
        for q in act_quantizers(module):
            handles.append(q.register_forward_pre_hook(lambda m, a, name=name: count(name, a)))
    try:
        with torch.no_grad():
            fp_model(batch)
    finally:
        for h in handles:
            h.remove()
    return {u: (seconds[u], elements.get(u, 0)) for u in seconds}


def estimate_seconds(units: list[str], profile: dict[str, tuple[float, int]], work: dict[str, tuple[float, int]],
                      timed: dict[str, dict[str, float]], iters: int, batches: float, eval_batches: float,
                      passes: int, fp_capture_s: float) -> float:
    """The whole reconstruction's seconds, from the first one or two units' measurements.

    ``profile`` (:func:`~dfquant.quant.cache.forward_profile`) gives each unit's forward seconds ``f`` on one batch
    and its module calls ``c``; ``work`` (:func:`unit_profile`) the seconds ``g`` of a forward and backward of the
    full-precision unit alone on that batch and the elements ``e`` its activation quantizers take in; ``timed`` the
    first units' seconds per iteration (``rate``), activation-range initialisation (``init``), input capture and,
    for the first, the rest (loss evaluations, init, hardening).

    A step costs ``a c + g``: the unit's own forward and backward, measured, plus a per-call overhead (fake
    quantization, soft rounding, the optimizer, Python) fitted on the timed units (``a`` = the sum of their
    ``rate - g`` over the sum of their ``c``). The unit's share of compute is measured rather than scaled from its
    forward: a depthwise convolution's backward costs many times its forward on CPU, a full convolution's about
    twice. Where the timed units ran faster than ``g`` (``a < 0``), ``g`` alone is scaled to their rates. The
    activation-range initialisation (a range search over every element entering the unit's activation
    quantizers) costs in proportion to ``e``, at the seconds per element of the last timed unit that has any.
    Capturing a unit's input runs the quantized model up to it over ``batches`` probe-sized batches, about the FP
    forward before it; the rest evaluates the unit's loss on ``eval_batches`` probe-sized batches beyond the first
    unit's. ``fp_capture_s`` covers the FP targets of one pass; ``passes`` (1, or 2 for weights-then-acts) repeats
    them and the rest."""
    fwd = {u: profile.get(u, (0.0, 1))[0] for u in units}
    calls = {u: profile.get(u, (0.0, 1))[1] for u in units}
    grad = {u: work.get(u, (fwd[u], 0))[0] for u in units}
    elems = {u: work.get(u, (0.0, 0))[1] for u in units}
    first = units[0]
    rated = [u for u in timed if "rate" in timed[u]]
    ref = rated[-1]
    over = sum(timed[u]["rate"] - grad[u] for u in rated)
    a = over / max(sum(calls[u] for u in rated), 1)
    if a >= 0:
        train = iters * sum(a * calls[u] + grad[u] for u in units)
    else:
        share = sum(timed[u]["rate"] for u in rated) / max(sum(grad[u] for u in rated), 1e-12)
        train = iters * share * sum(grad.values())
    before = dict(zip(units, itertools.accumulate([0.0] + [fwd[u] for u in units[:-1]])))
    c_ref = timed[ref].get("capture", 0.0)
    capture = timed[first].get("capture", 0.0) + sum(max(0.0, c_ref + batches * (before[u] - before[ref]))
                                                     for u in units[1:])
    with_init = [u for u in rated if elems[u] > 0 and "init" in timed[u]]
    per_element = timed[with_init[-1]]["init"] / elems[with_init[-1]] if with_init else 0.0
    rest0 = timed[first].get("rest", 0.0)
    rest = sum(max(0.0, rest0 + per_element * (elems[u] - elems[first]) + eval_batches * (fwd[u] - fwd[first]))
               for u in units)
    return train + capture + passes * (rest + fp_capture_s)
