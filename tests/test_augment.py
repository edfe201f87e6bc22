import pytest
import torch

from dfquant.data.augment import augment
from dfquant.errors import DfqError


def _images(n: int = 6) -> torch.Tensor:
    # image i is constant i: every output pixel tells which source image it came from
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()


def test_mixup_blends_two_distinct_images_reproducibly():
    x = _images()
    a, b = augment(x, "mixup", 1.0, seed=3), augment(x, "mixup", 1.0, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, augment(x, "mixup", 1.0, seed=4))
    for i in range(len(x)):
        v = a[i, 0, 0, 0].item()
        assert torch.all(a[i] == v)  # a convex blend of two constant images is constant
    assert not torch.equal(a, x)


def test_cutmix_pastes_a_box_of_area_one_minus_lambda():
    x = _images()
    out = augment(x, "cutmix", 1.0, seed=0)
    for i in range(len(x)):
        foreign = (out[i, 0] != i)
        values = out[i, 0][foreign].unique()
        assert len(values) <= 1 and (len(values) == 0 or values.item() != i)  # one partner, not itself
        if foreign.any():  # the pasted region is one axis-aligned rectangle
            rows, cols = foreign.any(1).nonzero().flatten(), foreign.any(0).nonzero().flatten()
            assert foreign.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert any((out[i, 0] != i).any() for i in range(len(x)))


def test_bad_augment_arguments():
    with pytest.raises(DfqError, match="unknown augmentation"):
        augment(_images(), "cutout")
    with pytest.raises(DfqError, match="positive"):
        augment(_images(), "mixup", alpha=0)


def test_cutmix_area_follows_beta():
    n = 400
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 32, 32).clone()
    out = augment(x, "cutmix", 1.0, seed=0)
    area = torch.stack([(out[i, 0] != i).float().mean() for i in range(n)])
    assert abs(area.mean().item() - 0.5) < 0.06  # E[1 - lambda] = 1/2 for Beta(1, 1)
    assert area.std().item() > 0.2  # uniform on [0, 1] has std 0.29: the weights vary per image
