"""Top-1 evaluation on the model's test set (embedded Fashion-MNIST or an ImageNet-style folder).

Every top-1 is a :class:`Top1`: the percentage, and how many images it was measured on, so that no
printed accuracy hides a 100-image subset.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dfquant.errors import DfqError
from dfquant.models.spec import ModelSpec


class Top1(float):
    """A top-1 accuracy in percent (a float, so it formats and serializes as one) with its image counts."""

    correct: int
    n: int

    def __new__(cls, correct: int, n: int) -> "Top1":
        obj = super().__new__(cls, 100.0 * correct / max(n, 1))
        obj.correct, obj.n = int(correct), int(n)
        return obj

    def __reduce__(self):  # pickles (DataLoader workers, deepcopy) as the two counts
        return (Top1, (self.correct, self.n))

    def describe(self) -> str:
        """``80.45% on 2000 images``: how every command prints a top-1."""
        return f"{float(self):.2f}% on {self.n} images"


@torch.no_grad()
def top1_tensors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                 desc: str = "eval", progress: bool = True) -> Top1:
    """Top-1 accuracy of ``model`` on pre-normalized ``images``."""
    model.eval()
    correct = 0
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress):
        correct += (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    return Top1(correct, len(images))


@torch.no_grad()
def top1_loader(model: nn.Module, loader: DataLoader, desc: str = "eval", progress: bool = True) -> Top1:
    model.eval()
    correct = total = 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return Top1(correct, total)


def test_tensors(spec: ModelSpec, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded test set of a zoo model, normalized for it."""
    from dfquant.data import fmnist

    x, y = fmnist.load_split("test", limit=limit)
    return spec.normalize(x), y


EVAL_SEED = 0  # the subset of a folder that --eval-limit draws: the same images in every command and run


def folder_dataset(root: str | Path, transform, num_classes: int | None = None,
                   limit: int | None = None) -> torch.utils.data.Dataset:
    """An ImageNet-style folder through ``transform``; with ``limit``, a class-balanced subset drawn with
    :data:`EVAL_SEED` (a folder sorted by class must not be scored on its first class)."""
    from dfquant.data.folders import ImageFolder, balanced_indices

    ds = ImageFolder(root, transform, num_classes=num_classes)
    if limit is not None and limit < len(ds):
        return torch.utils.data.Subset(ds, balanced_indices([y for _, y in ds.samples], limit, EVAL_SEED))
    return ds


def val_subset(spec: ModelSpec, val_dir: str | Path, limit: int | None = None) -> torch.utils.data.Dataset:
    """``val_dir`` through the model's preprocessing (:func:`folder_dataset`), saying once when its
    images are not at the model's input size."""
    from dfquant.data.folders import list_images, note_resize

    note_resize(val_dir, list_images(val_dir)[:1], spec.input_size[-1])
    return folder_dataset(val_dir, spec.transform(), spec.num_classes, limit)


def evaluate(spec: ModelSpec, model: nn.Module | None = None, val_dir: str | Path | None = None,
             limit: int | None = None, batch_size: int = 256, progress: bool = True) -> Top1:
    """Top-1 of ``model`` (default: ``spec.model``) on its test set; ``val_dir`` is required off the mini world.
    ``limit`` scores a class-balanced seeded subset of a folder (the first ``limit`` of the embedded set,
    which is shuffled)."""
    model = spec.model if model is None else model
    if val_dir is not None:
        ds = val_subset(spec, val_dir, limit)
        return top1_loader(model, DataLoader(ds, batch_size=batch_size, num_workers=2), progress=progress)
    if not spec.embedded:
        raise DfqError(f"{spec.name} has no embedded test set; pass --val /path/to/imagenet/val")
    x, y = test_tensors(spec, limit)
    return top1_tensors(model, x, y, batch_size, progress=progress)
