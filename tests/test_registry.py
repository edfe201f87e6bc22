import subprocess
import sys

import pytest
import torch

from dfquant.errors import DfqError
from dfquant.models.evaluate import evaluate
from dfquant.models.registry import get_model


@pytest.mark.parametrize("name", ["fmnist/resnet20", "fmnist/mobilenetv2", "fmnist/vit"])
def test_zoo_architectures_build(name):
    spec = get_model(name, pretrained=False)
    out = spec.model(torch.zeros(2, *spec.input_size))
    assert out.shape == (2, 10) and spec.num_classes == 10


def test_hub_architectures_build_offline():
    spec = get_model("torchvision/resnet18", pretrained=False)
    assert spec.input_size == (3, 224, 224) and spec.num_classes == 1000
    assert spec.class_names[0] == "tench"
    vit = get_model("timm/deit_tiny_patch16_224", pretrained=False)
    assert vit.is_vit and vit.input_size == (3, 224, 224)


@pytest.mark.parametrize("name,match", [("nope/x", "unknown model name"), ("fmnist/vgg", "unknown zoo model"),
                                        ("torchvision/notanet", "unknown torchvision"), ("timm/notanet", "unknown timm")])
def test_unknown_names(name, match):
    with pytest.raises(DfqError, match=match):
        get_model(name, pretrained=False)


def test_offline_hub_weights_give_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DfqError, match="not cached"):
        get_model("timm/resnet18.a1_in1k", pretrained=True)


ZOO = ["fmnist/resnet20", "fmnist/mobilenetv2", "fmnist/vit"]


@pytest.mark.parametrize("name", ZOO)
def test_committed_checkpoint_matches_model_card(name):
    spec = get_model(name)
    card = spec.card
    assert card["model"] == name and card["data"].startswith("Fashion-MNIST split A") and card["command"]
    acc = evaluate(spec, progress=False)
    assert abs(acc - card["test_top1"]) <= 0.5
    if name == "fmnist/resnet20":
        assert card["test_top1"] >= 91.0


def test_cli_bad_model_exits_2():
    r = subprocess.run([sys.executable, "-m", "dfquant.cli", "eval", "fmnist/nope"], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fmnist/resnet20" in lines[0]


def test_eval_val_folder_class_mismatch(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "0.png")
    spec = get_model("torchvision/resnet18", pretrained=False)
    with pytest.raises(DfqError, match="1000 classes"):
        evaluate(spec, val_dir=tmp_path)
