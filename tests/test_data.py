import numpy as np
import pytest
import torch

from dfquant.data import fmnist
from dfquant.errors import DfqError


def test_split_shapes_and_labels():
    x, y = fmnist.load_split("A", limit=256)
    assert x.shape == (256, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, :, :2], torch.zeros_like(x[:, :, :2]))  # gray, padded
    assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(10))
    xt, yt = fmnist.load_split("test")
    assert xt.shape == (10000, 3, 32, 32) and torch.bincount(yt).tolist() == [1000] * 10


def test_splits_are_disjoint_cover_train_and_fixed():
    a, b = fmnist.split_indices("A"), fmnist.split_indices("B")
    assert len(a) == len(b) == 30000
    assert np.intersect1d(a, b).size == 0 and np.union1d(a, b).size == 60000
    assert a[:5].tolist() == fmnist.split_indices("A")[:5].tolist()
    # split A is roughly class balanced (a random half of a balanced set)
    _, labels = fmnist._load("train")
    counts = np.bincount(labels[a], minlength=10)
    assert counts.min() > 2800 and counts.max() < 3200


def test_random_subset_is_seeded():
    x1, y1 = fmnist.load_split("A", limit=64, seed=1)
    x2, y2 = fmnist.load_split("A", limit=64, seed=1)
    x3, _ = fmnist.load_split("A", limit=64, seed=2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)


def test_bad_split_and_missing_dir(monkeypatch, tmp_path):
    with pytest.raises(DfqError):
        fmnist.split_indices("C")
    monkeypatch.setenv("DFQ_FMNIST_DIR", str(tmp_path))
    with pytest.raises(DfqError, match="DFQ_FMNIST_DIR"):
        fmnist.data_dir()


def test_image_folder_errors(tmp_path):
    from dfquant.data.folders import ImageFolder, list_images

    with pytest.raises(DfqError, match="no images"):
        list_images(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    from PIL import Image

    for c in "ab":
        Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / c / "x.png")
    with pytest.raises(DfqError, match="class folders"):
        ImageFolder(tmp_path, lambda im: im, num_classes=10)
    ds = ImageFolder(tmp_path, lambda im: torch.zeros(1), num_classes=2)
    assert len(ds) == 2 and ds[1][1] == 1
