"""Turn a full-precision classifier into a fake-quantized one by its plan (:func:`quantize_model`).

Conventions (switchable through :class:`~dfquant.quant.modules.QuantConfig` presets):
first and last layer weights at 8 bit, the image input unquantized (Genie) or 8-bit,
the last layer's input 8-bit, the second layer's input 8-bit for BRECQ/Genie-M (not
QDrop), per-channel weights, per-tensor activations, optional BN folding. Which layers
form a unit, which inputs are quantized once for a whole block and which BatchNorm folds
into which conv come from the model's graph (:mod:`dfquant.quant.plan`), not from names.
"""

from __future__ import annotations

import copy
from dataclasses import fields

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.algorithms import get_algorithm
from dfquant.quant.integer import link
from dfquant.quant.modules import QuantBlock, QuantConfig, QuantLayer, _act_quantizer
from dfquant.quant.plan import QuantPlan, bn_folds, make_plan
from dfquant.quant.quantizers import SIGNED_STEPS, check_bits
from dfquant.quant.target import get_target
from dfquant.quant.vit import has_attention, prepare_vit  # noqa: F401 (has_attention: importable from here)


def make_quant_config(algo: str, wbits: float, abits: float, **overrides) -> QuantConfig:
    """The preset conventions for ``algo`` at WxAy."""
    for b, what in ((wbits, "wbits"), (abits, "abits")):
        try:
            check_bits(b)
        except ValueError:
            raise DfqError(f"{what}={b} is not supported; use an integer from 2 to 8 (or 1.58 for ternary weights)",
                           params=(what,)) from None
    if abits == 1.58:
        raise DfqError("ternary (1.58) applies to weights only; use abits=2..8", params=("abits",))
    unknown = sorted(set(overrides) - {f.name for f in fields(QuantConfig)})
    if unknown:
        raise DfqError(f"unknown quantization setting(s) {', '.join(unknown)}; use fields of QuantConfig: "
                       + ", ".join(f.name for f in fields(QuantConfig)))
    target = get_target(overrides.get("target"))
    conventions = target.conventions if target is not None else {}
    clash = sorted(k for k in overrides if k in conventions and overrides[k] != conventions[k])
    if clash:
        raise DfqError(f"target={target.name!r} fixes {', '.join(f'{k}={conventions[k]!r}' for k in clash)} (what its "
                       "integer kernels compute); drop the override or the target", params=("target",))
    cfg = QuantConfig(wbits=wbits, abits=abits, **{**get_algorithm(algo).quant, **conventions, **overrides})
    if not (isinstance(cfg.clip_ratios, int) and 1 <= cfg.clip_ratios <= 100):
        raise DfqError(f"clip_ratios {cfg.clip_ratios!r} is not an integer from 1 to 100 (80: BRECQ/AdaRound, 100: Genie/QDrop)")
    if cfg.act_signed_step not in SIGNED_STEPS:
        raise DfqError(f"act_signed_step {cfg.act_signed_step!r} is not one of {', '.join(SIGNED_STEPS)}")
    return cfg


def build_quantized(model: nn.Module, qcfg: QuantConfig, init: bool = True, vit: dict | None = None,
                    plan: QuantPlan | None = None, example_input: torch.Tensor | None = None,
                    units: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` for quantization (ViTs get quantized attention first), laid out by ``plan``
    or by the plan of the (attention-patched) model's graph."""
    if vit is not None:
        model = prepare_vit(model, qcfg, vit)
    if plan is None:
        plan = make_plan(model, qcfg, example_input, units)
    return quantize_model(model, qcfg, init=init, plan=plan)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as ``x * k + c`` per channel: ``(k, c)``."""
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return k, bn.bias - bn.running_mean * k


def remove_bn(model: nn.Module, bn_name: str) -> None:
    """Take a folded BatchNorm out of ``model``; a norm-act layer (timm BatchNormAct2d) keeps what follows its BN."""
    bn = model.get_submodule(bn_name)
    _set(model, bn_name, nn.Identity() if type(bn) is nn.BatchNorm2d else nn.Sequential(bn.drop, bn.act))


@torch.no_grad()
def fold_bn(model: nn.Module, pairs: dict[str, str] | None = None, example_input: torch.Tensor | None = None) -> nn.Module:
    """Fold BatchNorm2d into the conv that feeds it, in place: ``pairs`` (conv -> BN names), by default
    every pair the data flow shows (a conv whose only consumer is the BN, :func:`bn_folds`)."""
    if pairs is None:
        pairs = bn_folds(model, example_input)
    for conv_name, bn_name in pairs.items():
        conv = model.get_submodule(conv_name)
        k, c = bn_affine(model.get_submodule(bn_name))
        conv.weight.mul_(k.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(k)
        conv.bias = nn.Parameter(bias * k + c)
        remove_bn(model, bn_name)
    return model


def quantize_model(model: nn.Module, cfg: QuantConfig, init: bool = True, plan: QuantPlan | None = None,
                   example_input: torch.Tensor | None = None) -> nn.Module:
    """Return a fake-quantized copy of ``model`` laid out by ``plan`` (default: :func:`make_plan`);
    the original is left untouched. The plan travels with the copy as ``qmodel.dfq_plan``.

    ``init=False`` skips the weight range search (used when loading a saved checkpoint).
    """
    plan = plan if plan is not None else make_plan(model, cfg, example_input)
    qmodel = copy.deepcopy(model).eval()
    fold_bn(qmodel, plan.folds)
    made: dict[str, QuantLayer] = {}
    for name, lp in plan.layers.items():
        layer = qmodel.get_submodule(name)
        ql = QuantLayer(layer, lp.wbits, lp.abits, cfg) if init else _uninit(layer, lp.wbits, lp.abits, cfg)
        if lp.input.startswith("shared "):
            ql.aq = made[lp.input.split(" ", 1)[1]].aq  # one quantizer for a tensor several layers read
        made[name] = ql
        _set(qmodel, name, ql)
    blocks, outputs = plan.blocks(), plan.outputs
    # quantizer modules of the model that write a kernel's output, found before wrapping moves their names
    writers = [*plan.kernels.values(), *(w for op in plan.int_ops for w in (*op["inputs"], op["output"]))]
    modules = {w: qmodel.get_submodule(w.split(" ", 1)[1]) for w in writers if w.startswith("module ")}
    wrapped: dict[str, QuantBlock] = {}
    for name in sorted(set(blocks) | set(outputs), key=len, reverse=True):  # innermost first: names stay valid
        if name in made:  # a quantized layer's own output quantizer
            made[name].oq = _act_quantizer(outputs[name], cfg)
            continue
        qb = wrapped[name] = QuantBlock(qmodel.get_submodule(name), blocks.get(name), cfg, outputs.get(name))
        _set(qmodel, name, qb)
        if qb.aq is not None:
            for lp in plan.layers.values():
                if lp.input == f"block {name}":
                    made[lp.name].read_input_from(qb.aq)

    def resolve(writer: str) -> nn.Module:
        """The quantizer a plan's writer name stands for."""
        kind, _, owner = writer.partition(" ")
        return {"layer": lambda: made[owner].input_quantizer, "block": lambda: wrapped[owner].aq,
                "module": lambda: modules[writer], "output": lambda: (made[owner] if owner in made else wrapped[owner]).oq}[kind]()

    for conv, writer in plan.kernels.items():  # the grid each integer conv writes (QuantLayer._kernel_forward)
        made[conv].write_output_to(resolve(writer))
    link(plan.int_ops, resolve)  # integer additions and poolings (dfquant.quant.integer)
    qmodel.dfq_plan = plan
    return qmodel


def _uninit(layer: nn.Module, wbits: float, abits: float | None, cfg: QuantConfig) -> QuantLayer:
    cheap = copy.copy(cfg)
    cheap.weight_init = "minmax"
    return QuantLayer(layer, wbits, abits, cheap)


def recon_units(qmodel: nn.Module, granularity: str = "block") -> list[str]:
    """Reconstruction units of a model made by :func:`quantize_model`, in execution order: the
    plan's units for ``block``, every quantized layer for ``layer``."""
    if granularity == "layer":
        return [n for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    return qmodel.dfq_plan.unit_names()
