"""Fashion-MNIST reader and the project's fixed data splits.

Images are served as 32x32, 3-channel float tensors in [0, 1] (the 28x28 digit is
zero-padded by 2 pixels on each side and repeated over channels), so the same
classifier code and the same generator resolution serve the whole mini world.

Splits of the 60k training images (fixed, independent of the machine):
  * split ``A`` — 30,000 images for training the classifier zoo and for the
    real-data calibration upper bound;
  * split ``B`` — the other 30,000 images, used only to train the mini generator,
    so synthetic calibration never touches the classifiers' training data.
The assignment is a permutation of ``range(60000)`` drawn from ``numpy`` PCG64
with seed 20250728: the first 30k indices form A, the rest B.
The 10k ``test`` set is used for evaluation only.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from dfquant.errors import DfqError

CLASS_NAMES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
SPLIT_SEED = 20250728
SPLIT_A_SIZE = 30000
SIZE = 32
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_dir() -> Path:
    """Where the idx files live: $DFQ_FMNIST_DIR, the Debian package, or a torchvision download."""
    env = os.environ.get("DFQ_FMNIST_DIR")
    candidates = [Path(env)] if env else [Path(DEBIAN_DIR), Path.home() / ".cache" / "dfquant" / "FashionMNIST" / "raw"]
    for cand in candidates:
        if all((cand / f).exists() for pair in _FILES.values() for f in pair):
            return cand
    if env:  # an explicit location that is wrong is an error, not a reason to look elsewhere
        raise DfqError(f"no Fashion-MNIST idx.gz files in DFQ_FMNIST_DIR={env}; point it at a folder holding {_FILES['train'][0]} etc.")
    return _download()


def _download() -> Path:
    root = Path.home() / ".cache" / "dfquant"
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure has the same fix
        raise DfqError(
            "Fashion-MNIST not found; install it with `apt-get install -y dataset-fashion-mnist` "
            f"or set DFQ_FMNIST_DIR ({type(exc).__name__} while downloading)"
        ) from None
    return root / "FashionMNIST" / "raw"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def _load(part: str) -> tuple[np.ndarray, np.ndarray]:
    root = data_dir()
    img_file, lbl_file = _FILES[part]
    return _read_idx(root / img_file), _read_idx(root / lbl_file)


def split_indices(split: str) -> np.ndarray:
    """Indices into the 60k training set for split ``A`` or ``B`` (sorted)."""
    perm = np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(60000)
    if split == "A":
        return np.sort(perm[:SPLIT_A_SIZE])
    if split == "B":
        return np.sort(perm[SPLIT_A_SIZE:])
    raise DfqError(f"unknown split {split!r}; use A, B or test")


def to_tensor(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 3, 32, 32) in [0, 1], zero-padded."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).float().div_(255.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def load_split(split: str, limit: int | None = None, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of a split: ``A``, ``B`` or ``test``.

    ``limit`` takes a class-balanced-in-expectation random subset when ``seed`` is given,
    otherwise the first ``limit`` images.
    """
    if split == "test":
        images, labels = _load("test")
        idx = np.arange(len(labels))
    else:
        images, labels = _load("train")
        idx = split_indices(split)
    if limit is not None and limit < len(idx):
        if seed is not None:
            idx = np.sort(np.random.Generator(np.random.PCG64(seed)).choice(idx, size=limit, replace=False))
        else:
            idx = idx[:limit]
    return to_tensor(images[idx]), torch.from_numpy(labels[idx].astype(np.int64))
