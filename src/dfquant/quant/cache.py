"""Memory-bounded activation caches for block reconstruction.

Block inputs/outputs for 1024 images are needed at every unit. Small ones stay in RAM;
once a tensor would pass the budget it is written to a memory-mapped file in a temp
folder and streamed back per batch. The full-precision targets are captured for as many
upcoming units as fit half the budget at a time (:func:`plan_chunks`), so neither RAM nor
disk ever holds every block's activations: for ResNet-50 at 224px with 1024 images, the outputs
of its 18 units alone are 26 GB in float32.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch

DEFAULT_BUDGET_GB = float(os.environ.get("DFQ_CACHE_RAM_GB", "4"))


class ActivationCache:
    """A fixed-size (N, *shape) float32 store, in RAM or on disk.

    The RAM budget is shared by all live caches: once the caches already in memory plus
    this one would pass it, this one goes to a memory-mapped file instead.
    """

    ram_in_use = 0  # bytes held in RAM by live caches (process-wide)

    def __init__(self, n: int, shape: tuple[int, ...], budget_gb: float = DEFAULT_BUDGET_GB):
        nbytes = n * math.prod(shape) * 4
        self.on_disk = ActivationCache.ram_in_use + nbytes > budget_gb * 2**30
        self._ram = 0 if self.on_disk else nbytes
        ActivationCache.ram_in_use += self._ram
        if self.on_disk:
            self._dir = tempfile.TemporaryDirectory(prefix="dfq-cache-")
            self.data = torch.from_numpy(np.lib.format.open_memmap(
                os.path.join(self._dir.name, "cache.npy"), mode="w+", dtype=np.float32, shape=(n, *shape)))
        else:
            self.data = torch.empty((n, *shape), dtype=torch.float32)

    def __del__(self) -> None:
        ActivationCache.ram_in_use -= getattr(self, "_ram", 0)
        self._ram = 0

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        return self.data[idx]

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Rows by index, as ``torch.Tensor.index_select`` (a training batch: row copies, faster than ``[idx]``)."""
        return self.data.index_select(dim, index)

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        self.data[idx] = value.detach().float().cpu()


class StopForward(Exception):
    """Raised by a forward hook to end a forward pass once the wanted tensor is captured."""


@torch.no_grad()
def capture(model: torch.nn.Module, module: torch.nn.Module, images: torch.Tensor, batch_size: int,
            outputs: bool, device: torch.device | str = "cpu", budget_gb: float = DEFAULT_BUDGET_GB
            ) -> tuple[ActivationCache, ActivationCache | None]:
    """Run ``model`` over ``images`` and cache ``module``'s input (and output), stopping each
    forward pass as soon as the module has run."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m, args, out=None):
        store["in"] = args[0]
        if out is not None:
            store["out"] = out
        raise StopForward

    handle = module.register_forward_hook(hook) if outputs else module.register_forward_pre_hook(hook)
    cin = cout = None
    try:
        for i in range(0, len(images), batch_size):
            try:
                model(images[i : i + batch_size].to(device))
            except StopForward:
                pass
            if cin is None:
                cin = ActivationCache(len(images), tuple(store["in"].shape[1:]), budget_gb)
                if outputs:
                    cout = ActivationCache(len(images), tuple(store["out"].shape[1:]), budget_gb)
            cin[i : i + batch_size] = store["in"]
            if outputs:
                cout[i : i + batch_size] = store["out"]
    finally:
        handle.remove()
    return cin, cout


@torch.no_grad()
def capture_all(model: torch.nn.Module, modules: dict[str, torch.nn.Module], images: torch.Tensor, batch_size: int,
                device: torch.device | str = "cpu", budget_gb: float = DEFAULT_BUDGET_GB
                ) -> dict[str, tuple[ActivationCache, ActivationCache]]:
    """One forward pass over ``images`` caching the input and output of every module in ``modules``
    (used for the full-precision targets, which do not change during reconstruction). Each pass
    stops as soon as every one of ``modules`` has run. Each tensor is copied when its module returns:
    the forward goes on, and an in-place op after it (a ReLU(inplace=True) behind a conv whose BatchNorm
    was folded into it, now an Identity) would otherwise change the cached value."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(key: str, args, out) -> None:
        store[key] = (args[0].clone(), out.clone())
        if len(store) == len(modules):
            raise StopForward

    handles = [m.register_forward_hook(lambda _m, a, out, k=k: hook(k, a, out)) for k, m in modules.items()]
    caches: dict[str, tuple[ActivationCache, ActivationCache]] = {}
    try:
        for i in range(0, len(images), batch_size):
            store.clear()
            try:
                model(images[i : i + batch_size].to(device))
            except StopForward:
                pass
            for k, (a, out) in store.items():
                if k not in caches:
                    caches[k] = (ActivationCache(len(images), tuple(a.shape[1:]), budget_gb),
                                 ActivationCache(len(images), tuple(out.shape[1:]), budget_gb))
                caches[k][0][i : i + batch_size] = a
                caches[k][1][i : i + batch_size] = out
    finally:
        for h in handles:
            h.remove()
    return caches


@torch.no_grad()
def io_bytes_per_image(model: torch.nn.Module, modules: dict[str, torch.nn.Module], image: torch.Tensor) -> dict[str, int]:
    """float32 bytes of each module's input + output for one image (one probe forward pass)."""
    sizes: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda _m, a, out, k=k: sizes.__setitem__(k, 4 * (a[0][0].numel() + out[0].numel())))
               for k, m in modules.items()]
    try:
        model(image[:1])
    finally:
        for h in handles:
            h.remove()
    return sizes


def forward_profile(model: torch.nn.Module, modules: dict[str, torch.nn.Module], batch: torch.Tensor,
                    repeats: int = 3) -> dict[str, tuple[float, int]]:
    """For each of ``modules``: the seconds of its part of a no-grad forward of ``model`` on ``batch`` (the fastest
    of ``repeats`` passes) and how many module calls that part makes (itself and its descendants).

    On CPU a unit's training step costs a per-op overhead (the calls) plus a per-element part (which the forward
    time follows), so these two numbers let the reconstruction's run-time estimate carry the rate it measured on
    one or two units over to the others."""
    import time

    starts: dict[str, float] = {}
    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    best: dict[str, float] = {}
    handles = []
    for k, m in modules.items():
        handles.append(m.register_forward_pre_hook(lambda _m, _a, k=k: starts.__setitem__(k, time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda _m, _a, _o, k=k: spent.__setitem__(k, spent.get(k, 0.0) + time.perf_counter() - starts[k])))
        for sub in m.modules():
            handles.append(sub.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls.get(k, 0) + 1)))
    try:
        with torch.no_grad():
            for _ in range(repeats):
                spent.clear()
                calls.clear()
                model(batch)
                best = {k: min(v, best.get(k, math.inf)) for k, v in spent.items()}
    finally:
        for h in handles:
            h.remove()
    return {k: (best[k], calls.get(k, 1)) for k in best}


def plan_chunks(names: list[str], bytes_per_unit: dict[str, int], budget_bytes: float) -> list[list[str]]:
    """Split ``names`` (forward order) into consecutive runs whose caches fit ``budget_bytes``
    together (a unit larger than the budget is a run of its own and spills to disk)."""
    chunks: list[list[str]] = []
    used = 0
    for name in names:
        size = bytes_per_unit.get(name, 0)
        if not chunks or used + size > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks
