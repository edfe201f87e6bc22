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
