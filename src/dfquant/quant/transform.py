"""Turn a full-precision classifier into a fake-quantized one (:func:`quantize_model`).

Conventions (switchable through :class:`~dfquant.quant.modules.QuantConfig` presets):
first and last layer weights at 8 bit, the image input unquantized (Genie) or 8-bit,
the last layer's input 8-bit, the second layer's input 8-bit for BRECQ/Genie-M (not
QDrop), per-channel weights, per-tensor activations, optional BN folding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dfquant.quant.modules import BLOCK_ENTRIES, QuantBlock, QuantConfig, QuantLayer



def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(_get(model, parent) if parent else model, attr, new)


def conv_bn_pairs(model: nn.Module, is_conv=lambda m: isinstance(m, nn.Conv2d)) -> list[tuple[str, str]]:
    """(conv, BatchNorm2d) module-name pairs in which the BN directly follows the conv: adjacent
    children of a Sequential, or ``convN``/``bnN`` attributes of one module. ``is_conv`` says what
    counts as a conv (the ONNX exporter passes its wrapped layers)."""
    pairs = []
    for name, mod in model.named_modules():
        children = list(mod.named_children())
        for (n1, c1), (n2, c2) in zip(children, children[1:]):
            if is_conv(c1) and isinstance(c2, nn.BatchNorm2d):
                pairs.append((f"{name}.{n1}".lstrip("."), f"{name}.{n2}".lstrip(".")))
        for cname, c in children:
            if is_conv(c) and cname.startswith("conv") and isinstance(getattr(mod, "bn" + cname[4:], None), nn.BatchNorm2d):
                pairs.append((f"{name}.{cname}".lstrip("."), f"{name}.bn{cname[4:]}".lstrip(".")))
    return list(dict.fromkeys(pairs))


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as ``x * k + c`` per channel: ``(k, c)``."""
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return k, bn.bias - bn.running_mean * k


@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d (``convN``/``bnN`` pairs and Sequentials) into it."""
    for conv_name, bn_name in conv_bn_pairs(model):
        conv = _get(model, conv_name)
        k, c = bn_affine(_get(model, bn_name))
        conv.weight.mul_(k.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(k)
        conv.bias = nn.Parameter(bias * k + c)
        _set(model, bn_name, nn.Identity())
    return model


def quantize_model(model: nn.Module, cfg: QuantConfig, init: bool = True) -> nn.Module:
    """Return a fake-quantized copy of ``model`` (the original is left untouched).

    ``init=False`` skips the weight range search (used when loading a saved checkpoint).
    """
    qmodel = copy.deepcopy(model).eval()
    if cfg.fold_bn:
        fold_bn(qmodel)
    layers = [n for n, m in qmodel.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in cfg.keep_fp]
    if not layers:
        raise ValueError("model has no Conv2d/Linear layer to quantize")
    first, last = layers[0], layers[-1]
    blocks = [n for n, m in qmodel.named_modules() if type(m).__name__ in BLOCK_ENTRIES]
    entries = {f"{b}.{e}" for b in blocks for e in BLOCK_ENTRIES[type(_get(qmodel, b)).__name__]}
    second = layers[1] if len(layers) > 1 else None
    for name in layers:
        wbits = cfg.first_last_bits if name in (first, last) else cfg.wbits
        if name == first:
            abits = cfg.first_last_bits if cfg.quantize_first_input else None
        elif name == last:
            abits = cfg.first_last_bits
        elif name in entries:
            abits = None  # the enclosing QuantBlock quantizes this input
        else:
            abits = cfg.second_input_bits if (name == second and cfg.second_input_bits) else cfg.abits
        layer = _get(qmodel, name)
        ql = QuantLayer(layer, wbits, abits, cfg) if init else _uninit(layer, wbits, abits, cfg)
        _set(qmodel, name, ql)
    for b in sorted(blocks, key=len, reverse=True):
        is_second = second is not None and f"{b}." in second + "." and second.startswith(b + ".")
        abits = cfg.second_input_bits if (is_second and cfg.second_input_bits) else cfg.abits
        _set(qmodel, b, QuantBlock(_get(qmodel, b), abits, cfg))
    return qmodel


def _uninit(layer: nn.Module, wbits: float, abits: float | None, cfg: QuantConfig) -> QuantLayer:
    cheap = copy.copy(cfg)
    cheap.weight_init = "minmax"
    return QuantLayer(layer, wbits, abits, cheap)


def recon_units(qmodel: nn.Module, granularity: str = "block") -> list[str]:
    """Reconstruction units in forward order: QuantBlocks (and torchvision conv-norm-act
    stacks) for ``block``, every QuantLayer for ``layer``; leftover layers are their own unit."""
    names = [n for n, m in qmodel.named_modules()]
    units: list[str] = []
    covered: list[str] = []
    for n in names:
        m = _get(qmodel, n) if n else qmodel
        if any(n.startswith(c + ".") for c in covered):
            continue
        if granularity == "block" and (isinstance(m, QuantBlock) or type(m).__name__ in {"Conv2dNormActivation", "Block", "SwinTransformerBlock"}):
            units.append(n); covered.append(n)
        elif isinstance(m, QuantLayer):
            units.append(n); covered.append(n)
    return units
