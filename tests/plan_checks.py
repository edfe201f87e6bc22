"""Invariants every quantized model must satisfy, whatever its architecture (used by the plan tests
and by benchmarks/model_coverage.py)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

from dfquant.quant.graph import trace_graph
from dfquant.quant.modules import QuantBlock, QuantLayer
from dfquant.quant.plan import QuantPlan, _Analysis

sys.path.insert(0, str(Path(__file__).parent))  # custom_models, for the benchmark too


def layers_in_one_unit(plan: QuantPlan) -> None:
    seen = [la for u in plan.units for la in u.layers]
    assert sorted(seen) == sorted(plan.layers), "a quantized layer is in no unit or in two"


def residual_inputs_quantized_once(fp_model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> int:
    """For every residual unit, the layers that read the unit's input directly see ONE quantizer on it
    (the QuantBlock's, or one shared by those layers); returns the number of residual units checked."""
    plan: QuantPlan = qmodel.dfq_plan
    a = _Analysis(fp_model, trace_graph(fp_model, x), [])
    blocks = plan.blocks()
    n = 0
    for u in plan.units:
        if u.kind != "residual":
            continue
        x_in, ops = a.single_io(u.name)
        entries = [e for e in a.entries(x_in, ops) if e in plan.layers]
        qu = qmodel.get_submodule(u.name)
        quantizers = {id(qu.aq)} if u.name in blocks else set()
        assert (u.name in blocks) == isinstance(qu, QuantBlock)
        for e in entries:
            ql = qmodel.get_submodule(e.replace(u.name + ".", u.name + ".block.", 1) if u.name in blocks else e)
            assert isinstance(ql, QuantLayer)
            if ql.aq is not None:
                quantizers.add(id(ql.aq))
        assert len(quantizers) == (1 if entries else 0), f"{u.name}: its input has {len(quantizers)} quantizers"
        n += 1
    return n


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh models have mean 0, var 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


@torch.no_grad()
def folding_error(model: nn.Module, plan: QuantPlan, x: torch.Tensor) -> float:
    """Relative max error of the FP output after folding the plan's BN pairs."""
    from dfquant.quant.transform import fold_bn

    folded = fold_bn(copy.deepcopy(model), plan.folds)
    ref = model(x)
    return float((folded(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@torch.no_grad()
def top1_agreement(model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement (percent) and output SQNR (dB) of ``qmodel`` against ``model`` on ``x``."""
    y, yq = model(x), qmodel(x)
    sqnr = 10 * torch.log10(y.pow(2).sum() / (yq - y).pow(2).sum().clamp_min(1e-30))
    return float((y.argmax(1) == yq.argmax(1)).float().mean() * 100), float(sqnr)


def _tv(name: str, **kw):
    import torchvision

    return lambda: torchvision.models.get_model(name, num_classes=10, **kw)


def _timm(name: str, **kw):
    import timm

    return lambda: timm.create_model(name, num_classes=10, **kw)


def _custom(name: str):
    import custom_models

    return getattr(custom_models, name)


# model family -> (factory of a small random-weight model, input size)
FAMILIES = {
    "cifar-resnet option A (lambda shortcut)": (_custom("resnet_a"), 32),
    "cifar-resnet, block class renamed": (_custom("resnet_renamed"), 32),
    "cifar-resnet option B (1x1 conv shortcut)": (_custom("resnet_b"), 32),
    "pre-activation resnet": (_custom("preact_resnet"), 32),
    "torchvision resnet50": (_tv("resnet50"), 32),
    "torchvision mobilenet_v3_small": (_tv("mobilenet_v3_small"), 32),
    "torchvision efficientnet_b0": (_tv("efficientnet_b0"), 32),
    "torchvision regnet_y_400mf": (_tv("regnet_y_400mf"), 32),
    "timm resnet18": (_timm("resnet18"), 32),
    "timm convnext_atto": (_timm("convnext_atto"), 32),
    "timm efficientnet_b0": (_timm("efficientnet_b0"), 32),
    "timm mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), 32),
    "timm vit (2 blocks)": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    "timm deit (2 blocks)": (_timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    "timm swin (4 stages of 1 block)": (_timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4, depths=(1, 1, 1, 1),
                                              embed_dim=24, num_heads=(1, 1, 1, 1)), 64),
}


def check_family(name: str, n_calib: int = 32, n_eval: int = 100) -> dict:
    """Plan, fold, quantize at W8A8 with range init only, check the invariants; the coverage-table row."""
    import time
    import warnings

    import dfquant

    factory, size = FAMILIES[name]
    torch.manual_seed(0)
    model = randomize_bn(factory()).eval()
    x = torch.randn(1, 3, size, size)
    t0 = time.time()
    plan = dfquant.plan(model, x, algo="minmax", wbits=8, abits=8)
    plan_s = time.time() - t0
    layers_in_one_unit(plan)
    fold = folding_error(model, plan, torch.randn(4, 3, size, size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel, _ = dfquant.quantize(model, torch.randn(n_calib, 3, size, size), wbits=8, abits=8, algo="minmax", iters=0,
                                     batch_size=n_calib, progress=False)
    n_res = residual_inputs_quantized_once(model, qmodel, x)
    agreement, sqnr = top1_agreement(model, qmodel, torch.randn(n_eval, 3, size, size))
    return {"model": name, "units": len(plan.units), "residual_units": n_res, "folded_bn": len(plan.folds),
            "float_layers": dict(plan.float_layers), "warnings": list(plan.warnings), "fold_rel_err": fold,
            "w8a8_agreement": agreement, "w8a8_sqnr_db": sqnr,
            "plan_seconds": plan_s, "tracer": plan.tracer}
