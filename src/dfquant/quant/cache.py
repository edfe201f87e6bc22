"""Memory-bounded activation caches for block reconstruction.

Block inputs/outputs for 1024 images are needed at every unit. Small ones stay in RAM;
once a tensor would pass the budget it is written to a memory-mapped file in a temp
folder and streamed back per batch, so ResNet-50 at 224px does not need tens of GB.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch

DEFAULT_BUDGET_GB = float(os.environ.get("DFQ_CACHE_RAM_GB", "4"))


class ActivationCache:
    """A fixed-size (N, *shape) float32 store, in RAM or on disk."""

    def __init__(self, n: int, shape: tuple[int, ...], budget_gb: float = DEFAULT_BUDGET_GB):
        nbytes = n * math.prod(shape) * 4
        self.on_disk = nbytes > budget_gb * 2**30
        if self.on_disk:
            self._dir = tempfile.TemporaryDirectory(prefix="dfq-cache-")
            self.data = torch.from_numpy(np.lib.format.open_memmap(
                os.path.join(self._dir.name, "cache.npy"), mode="w+", dtype=np.float32, shape=(n, *shape)))
        else:
            self.data = torch.empty((n, *shape), dtype=torch.float32)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        return self.data[idx]

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        self.data[idx] = value.detach().float().cpu()


class _Stop(Exception):
    pass


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
        raise _Stop

    handle = module.register_forward_hook(hook) if outputs else module.register_forward_pre_hook(hook)
    cin = cout = None
    try:
        for i in range(0, len(images), batch_size):
            try:
                model(images[i : i + batch_size].to(device))
            except _Stop:
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
