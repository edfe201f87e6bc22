"""The quantization plan from the traced graph: units, input quantizers and BN folds."""

import json
from pathlib import Path

import pytest
import torch

from dfquant.models import zoo
from dfquant.quant.api import build_quantized, make_quant_config
from dfquant.quant.modules import QuantBlock
from dfquant.quant.plan import make_plan
from dfquant.quant.quantizers import UniformQuantizer
from dfquant.quant.transform import recon_units
from dfquant.quant.vit import default_vit_options

REFERENCE = json.loads((Path(__file__).parent / "data" / "zoo_plans_before_graph.json").read_text())["plans"]


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_zoo_plans_match_the_class_name_tables(key):
    """The graph plan gives the zoo models exactly the units, QuantBlocks, quantizer bits and state
    keys the class-name tables gave (recorded before they were removed), so results do not move."""
    arch, algo = key.split("/")
    model = zoo.ARCHS[arch](num_classes=10)
    vit = default_vit_options(model) if arch == "vit" else None
    q = build_quantized(model, make_quant_config(algo, 4, 4), init=False, vit=vit)
    ref = REFERENCE[key]
    assert recon_units(q) == ref["units"]
    assert recon_units(q, "layer") == ref["layer_units"]
    assert [n for n, m in q.named_modules() if isinstance(m, QuantBlock)] == ref["blocks"]
    assert {n: m.bits for n, m in q.named_modules() if isinstance(m, UniformQuantizer)} == ref["quantizers"]
    assert sorted(q.state_dict()) == ref["state_keys"]


@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2", "vit"])
def test_fx_and_hook_traces_give_the_same_plan(arch, monkeypatch):
    from dfquant.quant import graph, plan

    model = zoo.ARCHS[arch](num_classes=10)
    cfg = make_quant_config("brecq", 4, 4)
    if arch == "vit":
        from dfquant.quant.vit import prepare_vit

        model = prepare_vit(model, cfg, {})
    by_fx = make_plan(model, cfg)
    monkeypatch.setattr(plan, "trace_graph", lambda m, x=None: graph.trace_graph(m, x, method="hooks"))
    by_hooks = make_plan(model, cfg, torch.randn(2, 3, 32, 32))
    assert (by_fx.tracer, by_hooks.tracer) == ("fx", "hooks")
    assert {**by_hooks.to_dict(), "tracer": "fx"} == by_fx.to_dict()


class FlatResidual(torch.nn.Module):
    """A residual merge written in the top-level forward: no module holds it."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        z = self.conv3(torch.relu(self.conv2(y)))
        return self.fc((y + z).mean((2, 3)))


def test_ungroupable_residual_warns_once_naming_the_modules():
    from dfquant.quant.api import quantize

    model = FlatResidual().eval()
    plan = make_plan(model, make_quant_config("brecq", 4, 4))
    assert plan.unit_names() == ["conv1", "conv2", "conv3", "fc"]
    assert len(plan.warnings) == 1 and "residual add in the model's forward (branches: conv2, conv3)" in plan.warnings[0]
    with pytest.warns(UserWarning, match="could not group") as record:
        quantize(model, torch.randn(32, 3, 8, 8), "minmax", 8, 8, iters=0, progress=False)
    assert len(record) == 1


def test_pre_activation_block_folds_the_bn_after_the_conv_and_shares_the_shortcut_quantizer():
    from custom_models import preact_resnet

    plan = make_plan(preact_resnet().eval(), make_quant_config("brecq", 4, 4))
    assert plan.folds["layers.2.conv1"] == "layers.2.bn2" and "layers.2.conv2" not in plan.folds
    assert not any(bn.endswith("bn1") and conv.startswith("layers") for conv, bn in plan.folds.items())
    assert plan.layers["layers.2.conv1"].input == "shared layers.2.shortcut"
    assert [u.kind for u in plan.units].count("residual") == 4
