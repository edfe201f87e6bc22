"""Penultimate features (the input of the classifier's last Linear layer)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def penultimate(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    h = last.register_forward_pre_hook(lambda m, a: feats.append(a[0].flatten(1).cpu()))
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    finally:
        h.remove()
    return torch.cat(feats)
