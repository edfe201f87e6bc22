"""Image folders: ImageNet-style ``class/xxx.JPEG`` trees and flat calibration folders.

Images are always turned into tensors by the model's own preprocessing (see
:func:`dfquant.models.registry.ModelSpec.transform`), never resized by hand here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from dfquant.errors import DfqError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, sorted); a clear error if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise DfqError(f"{root} is not a folder; pass a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise DfqError(f"no images (png/jpg/jpeg/bmp/webp) found under {root}; pass a folder that holds images")
    return files


class ImageFolder(Dataset):
    """ImageNet-style val folder: one sub-folder per class, sorted names give class ids."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], torch.Tensor], num_classes: int | None = None):
        root = Path(root)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        if not classes:
            raise DfqError(f"{root} has no class sub-folders; pass an ImageNet-style folder (one sub-folder per class)")
        if num_classes is not None and len(classes) != num_classes:
            raise DfqError(f"{root} has {len(classes)} class folders but the model predicts {num_classes} classes; pass the matching val folder")
        self.samples = [(p, i) for i, c in enumerate(classes) for p in list_images(root / c)]
        self.root = root
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(open_rgb(path)), label


def load_folder_images(root: str | Path, transform: Callable[[Image.Image], torch.Tensor], limit: int | None = None,
                       size: int | None = None) -> torch.Tensor:
    """Load a flat (or nested) folder of calibration images into one tensor batch: the first ``limit``
    files in sorted order, or, in a folder of class sub-folders, ``limit`` spread evenly over the classes
    (:func:`balanced_indices`); ``size``: the model's input size, to say once when the images differ."""
    files = list_images(root)
    classes = sorted({p.parent for p in files})
    if limit is not None and limit < len(files) and len(classes) > 1 and all(c.parent == Path(root) for c in classes):
        # a class-per-folder tree sorts by class: its first files would be the first classes only
        ids = {c: i for i, c in enumerate(classes)}
        files = [files[i] for i in balanced_indices([ids[p.parent] for p in files], limit)]
    files = files[:limit]
    if size is not None:
        note_resize(root, files, size)
    return torch.stack([transform(open_rgb(p)) for p in files])


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, SyntaxError, ValueError) as exc:
        raise DfqError(f"{path} is not a readable image ({str(exc).splitlines()[0]}); delete or replace it") from None


_SIZE_NOTED: set[str] = set()


def note_resize(root: str | Path, files: list[Path], size: int) -> None:
    """Say once per folder when its images are not at the model's input size (they are resized, not refused)."""
    key = str(Path(root).resolve())
    if key in _SIZE_NOTED or not files:
        return
    h, w = image_size(files[0])
    if min(h, w) != size:
        import warnings

        _SIZE_NOTED.add(key)
        warnings.warn(f"the images in {root} are {w}x{h} (e.g. {files[0].name}), not the model's {size}x{size}: "
                      f"they are resized by the model's preprocessing; pass --size if {size} is not its resolution",
                      stacklevel=2)


def balanced_indices(labels: list[int], limit: int, seed: int = 0) -> list[int]:
    """``limit`` indices with (nearly) the same count of every class, drawn with a fixed seed: a subset
    of a class-sorted folder must not be its first classes. The ``limit % classes`` extra images go to
    classes drawn with the same seed; a class with too few images gives all it has."""
    import random

    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    classes = sorted(by_class)
    rng = random.Random(seed)
    per, extra = divmod(limit, len(classes))
    bonus = set(rng.sample(classes, extra))
    chosen: list[int] = []
    for c in classes:
        idx = by_class[c]
        chosen += rng.sample(idx, min(len(idx), per + (c in bonus)))
    return sorted(chosen)


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully (so a truncated file fails here, naming itself, not deep in a transform)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DfqError(f"{path} is not a readable image ({str(exc).splitlines()[0]}); delete or replace it") from None
