"""One quantize entry: every algorithm names a runner, options a runner cannot use are refused, and no
module outside the algorithm table and the entry branches on an algorithm's name."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.algorithms import ALGORITHMS, default_algorithm
from dfquant.quant.api import RUNNERS, quantize

SRC = Path(__file__).resolve().parents[1] / "src" / "dfquant"


def test_every_algorithm_names_an_existing_runner():
    for name, algo in ALGORITHMS.items():
        assert algo.runner in RUNNERS, f"{name} names runner {algo.runner!r}"
        assert callable(RUNNERS[algo.runner])


@pytest.fixture(scope="module")
def tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             num_classes=3).eval()


@pytest.mark.parametrize("kwargs, parameter", [
    ({"units": ["blocks.0"]}, "units="),
    ({"bn_recalib": "relative"}, "bn_recalib="),
    ({"bn_recalib": "absolute"}, "bn_recalib="),
    ({"recon": {"round_weight": 0.1}}, "recon="),  # with iters=0 RepQ-ViT has no reconstruction to override
])
def test_repq_vit_refuses_options_it_cannot_use(tiny_vit, kwargs, parameter):
    with pytest.raises(DfqError) as err:
        quantize(tiny_vit, torch.randn(4, 3, 32, 32), "repq-vit", 4, 4, iters=0, progress=False, **kwargs)
    msg = str(err.value)
    assert parameter in msg and "\n" not in msg


def test_repq_vit_units_message():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(DfqError, match="repq-vit calibrates every layer of the ViT at once; units= does not apply"):
        quantize(m, torch.randn(4, 3, 8, 8), "repq-vit", 4, 4, iters=0, units=["0"], progress=False)


def test_repq_vit_takes_quant_overrides(tiny_vit):
    _, info = quantize(tiny_vit, torch.randn(4, 3, 32, 32), "repq-vit", 4, 4, iters=0, progress=False,
                       quant={"act_clamp_first": True})
    assert info["quant"].act_clamp_first is True and info["vit"]["quant_attention"]


def test_default_algorithm(tiny_vit):
    assert default_algorithm(tiny_vit) == "repq-vit"
    assert default_algorithm(nn.Sequential(nn.Conv2d(3, 4, 3))) == "genie-m"


def test_no_algorithm_name_branches_outside_the_table():
    names = "|".join(re.escape(n) for n in ALGORITHMS)
    pattern = re.compile(rf"""algo\w*\s*(==|!=)\s*["']({names})["']|algo\w*\s+(not\s+)?in\s+\(\s*["']({names})["']""")
    allowed = {SRC / "quant" / "api.py", SRC / "quant" / "algorithms.py"}
    found = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in sorted(SRC.rglob("*.py")) if p not in allowed
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "branch on an algorithm name outside quant/algorithms.py:\n" + "\n".join(found)
