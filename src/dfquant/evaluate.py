"""Top-1 evaluation on the model's test set (embedded Fashion-MNIST or an ImageNet-style folder)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dfquant.errors import DfqError
from dfquant.models.registry import ModelSpec


@torch.no_grad()
def top1_tensors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                 desc: str = "eval", progress: bool = True) -> float:
    """Top-1 accuracy (percent) of ``model`` on pre-normalized ``images``."""
    model.eval()
    correct = 0
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress):
        correct += (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    return 100.0 * correct / max(len(images), 1)


@torch.no_grad()
def top1_loader(model: nn.Module, loader: DataLoader, desc: str = "eval", progress: bool = True) -> float:
    model.eval()
    correct = total = 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


def test_tensors(spec: ModelSpec, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded test set of a zoo model, normalized for it."""
    from dfquant.data import fmnist

    x, y = fmnist.load_split("test", limit=limit)
    return spec.normalize(x), y


def evaluate(spec: ModelSpec, model: nn.Module | None = None, val_dir: str | Path | None = None,
             limit: int | None = None, batch_size: int = 256, progress: bool = True) -> float:
    """Top-1 of ``model`` (default: ``spec.model``) on its test set; ``val_dir`` is required off the mini world."""
    model = spec.model if model is None else model
    if val_dir is not None:
        from dfquant.data.folders import ImageFolder

        ds = ImageFolder(val_dir, spec.transform(), num_classes=spec.num_classes)
        if limit is not None:
            ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
        return top1_loader(model, DataLoader(ds, batch_size=batch_size, num_workers=2), progress=progress)
    if not spec.embedded:
        raise DfqError(f"{spec.name} has no embedded test set; pass --val /path/to/imagenet/val")
    x, y = test_tensors(spec, limit)
    return top1_tensors(model, x, y, batch_size, progress=progress)
