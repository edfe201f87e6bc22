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
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(open_rgb(path)), label


def load_folder_images(root: str | Path, transform: Callable[[Image.Image], torch.Tensor], limit: int | None = None) -> torch.Tensor:
    """Load a flat (or nested) folder of calibration images into one tensor batch."""
    return torch.stack([transform(open_rgb(p)) for p in list_images(root)[:limit]])


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully (so a truncated file fails here, naming itself, not deep in a transform)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DfqError(f"{path} is not a readable image ({str(exc).splitlines()[0]}); delete or replace it") from None
