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


def test_calibration_augmentation_reaches_the_quantize_job(tmp_path):
    """`dfq quantize --augment cutmix` calibrates on the mixed images and records the augmentation."""
    from dfquant.data.calib import load_calibration
    from dfquant.jobs import run_quantize
    from dfquant.models.registry import get_model
    from dfquant.io import read_json

    spec = get_model("fmnist/resnet20")
    plain = load_calibration("real:A", spec, 8, 0)
    mixed = load_calibration("real:A", spec, 8, 0, "cutmix", 1.0)
    assert torch.equal(mixed, augment(plain, "cutmix", 1.0, seed=0)) and not torch.equal(mixed, plain)
    res = run_quantize(spec, "real:A", 8, 8, "mse", 1, 8, 8, 0, tmp_path / "q", evaluate_top1=False,
                       augment="cutmix", augment_alpha=0.5, progress=False)
    assert res["augment"] == {"method": "cutmix", "alpha": 0.5}
    assert read_json(tmp_path / "q" / "results.json")["augment"] == {"method": "cutmix", "alpha": 0.5}


def test_run_config_labels_and_validates_the_augmentation():
    from dfquant.run import RunConfig, _strategy_label

    assert _strategy_label(RunConfig(strategy="single", augment="mixup")) == "single+mixup"
    assert _strategy_label(RunConfig(strategy="single")) == "single"
    with pytest.raises(DfqError, match="--augment 'blend' is not one of none, mixup, cutmix"):
        RunConfig.load(None, augment="blend")
    with pytest.raises(DfqError, match="--augment-alpha"):
        RunConfig.load(None, augment_alpha=0.0)


def test_save_grid_writes_a_png(tmp_path):
    from PIL import Image

    from dfquant.data.augment import save_grid

    x = torch.rand(4, 3, 8, 8)
    save_grid(x, augment(x, "mixup"), tmp_path / "g.png", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    img = Image.open(tmp_path / "g.png")
    assert img.height > img.width / 4 and img.width >= 2 * 4 * 8  # two rows of four, enlarged
