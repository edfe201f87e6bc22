"""Quantized layers and the model transform with the literature's conventions.

Every ``Conv2d``/``Linear`` becomes a :class:`QuantLayer` (per-channel weight quantizer +
per-tensor input quantizer). Residual blocks (found from the graph, :mod:`dfquant.quant.plan`)
are wrapped in :class:`QuantBlock`, which
quantizes the block input once so the identity branch of the residual addition and the
block's entry convolutions all see the same quantized tensor (their own input quantizers
are switched off) — the residual path is quantized, as in Genie/QDrop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.quant.quantizers import LogSqrt2Quantizer, SoftRoundingWeight, UniformQuantizer

@dataclass
class QuantConfig:
    """Bit-widths and conventions of one quantization run (a preset fills the conventions)."""

    wbits: float = 4
    abits: float = 4
    first_last_bits: float = 8       # first and last layer weights (and last layer input)
    quantize_first_input: bool = False  # Genie: image input unquantized; set True for an 8-bit input
    second_input_bits: float | None = 8  # BRECQ/Genie keep the second layer's input 8-bit; QDrop: None
    weight_init: str = "mse"         # mse (Lp, p=2.4) | minmax | percentile
    act_init: str = "mse"
    act_symmetric: bool = True       # signed iff the calibration data has negatives
    act_signed_step: str = "qmax"    # signed grids: qmax: max/(2^(b-1)-1) | span: 2*max/(2^b-1) (Genie; see UniformQuantizer)
    act_clamp_first: bool = False    # round_ste(clamp(x/s)) (Genie): the STE passes gradients inside the range, not
                                     # only where the rounded value is (BRECQ/QDrop: clamp(round_ste(x/s)))
    clip_ratios: int = 100           # mse range search over ratios 1.0, 0.99, ...: 100 (Genie, QDrop) | 80 (BRECQ)
    zero_point_search: bool = False  # affine grids, two-sided data: also search every zero point (QDrop's 2-D search)
    fold_bn: bool = False
    keep_fp: list[str] = field(default_factory=list)  # module-name globs left in full precision


def _act_quantizer(bits: float, cfg: QuantConfig) -> UniformQuantizer:
    q = UniformQuantizer(bits, symmetric=cfg.act_symmetric, learn_scale=True, signed_step=cfg.act_signed_step,
                         clamp_first=cfg.act_clamp_first, clip_ratios=cfg.clip_ratios,
                         zero_point_search=cfg.zero_point_search)
    q.init_method = cfg.act_init
    return q


class QuantLayer(nn.Module):
    """Conv2d or Linear with fake-quantized weight and input."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, wbits: float, abits: float | None, cfg: QuantConfig):
        super().__init__()
        self.layer = layer
        self.wq = UniformQuantizer(wbits, channel_axis=0, clip_ratios=cfg.clip_ratios,
                                   zero_point_search=cfg.zero_point_search)
        self.wq.init_range(layer.weight, method=cfg.weight_init)
        self.aq = _act_quantizer(abits, cfg) if abits else None
        self.soft: SoftRoundingWeight | None = None

    def enable_soft_rounding(self, learn_scale: bool) -> SoftRoundingWeight:
        self.soft = SoftRoundingWeight(self.wq, self.layer.weight, learn_scale)
        return self.soft

    def qweight(self) -> torch.Tensor:
        return self.soft() if self.soft is not None else self.wq(self.layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        w = self.qweight() if self.wq.enabled else self.layer.weight
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)  # honours padding_mode
        return F.linear(x, w, self.layer.bias)


class QuantBlock(nn.Module):
    """A residual block whose input is quantized once (shared by the identity branch)."""

    def __init__(self, block: nn.Module, abits: float, cfg: QuantConfig):
        super().__init__()
        self.block = block
        self.aq = _act_quantizer(abits, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.aq(x))


def quant_layers(module: nn.Module) -> list[QuantLayer]:
    return [m for m in module.modules() if isinstance(m, QuantLayer)]


def act_quantizers(module: nn.Module) -> list[nn.Module]:
    """Every activation quantizer (anything quantizer-like that is not a layer's weight quantizer)."""
    weight_qs = {id(m.wq) for m in module.modules() if isinstance(m, QuantLayer)}
    return [m for m in module.modules() if isinstance(m, (UniformQuantizer, LogSqrt2Quantizer)) and id(m) not in weight_qs]


def set_quant_state(module: nn.Module, weights: bool, acts: bool) -> None:
    """Switch weight and activation quantization on or off throughout ``module``."""
    for m in module.modules():
        if isinstance(m, QuantLayer):
            m.wq.enabled = weights
    for q in act_quantizers(module):
        q.enabled = acts


def train_keep_bn(module: nn.Module) -> None:
    """Training mode for the quantizers (QDrop, noise), but BatchNorm keeps its running statistics:
    in training mode it would normalize with calibration-batch statistics and overwrite the
    statistics the model was trained with, so the quantized model would no longer match its
    full-precision target."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
