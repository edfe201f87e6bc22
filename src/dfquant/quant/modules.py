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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.quant.integer import mark, on_grid
from dfquant.quant.quantizers import LogSqrt2Quantizer, SoftRoundingWeight, UniformQuantizer, round_ste

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
    # quantizer constructors, not conventions (never saved; None: the UniformQuantizers below). weight_quantizer
    # takes a layer's weight quantizer, its range searched on the weight, and returns the one the layer uses;
    # act_quantizer(bits, cfg) builds every activation quantizer. NIPQ passes its pseudo-quantizers here.
    weight_quantizer: Callable[[UniformQuantizer], nn.Module] | None = field(default=None, repr=False, compare=False,
                                                                           metadata={"saved": False})
    act_quantizer: Callable[[float, QuantConfig], nn.Module] | None = field(default=None, repr=False, compare=False,
                                                                          metadata={"saved": False})
    # deployment target (dfquant.quant.target): None keeps the papers' conventions; a target sets the fields below
    target: str | None = None
    weight_symmetric_8bit: bool = False  # 8-bit weights on a symmetric int8 grid (zero point 0), as integer kernels take
    int32_bias: bool = False         # conv biases rounded to int32 on the step s_x * s_w (what QLinearConv adds)
    weight_reduce_range: bool = False  # 8-bit weights on 7 bits (-64..63, onnxruntime's reduce_range): products with
                                       # uint8 inputs never saturate int16 pair sums (AVX2 without VNNI; target.py)


def _act_quantizer(bits: float, cfg: QuantConfig) -> UniformQuantizer:
    if cfg.act_quantizer is not None:
        return cfg.act_quantizer(bits, cfg)
    q = UniformQuantizer(bits, symmetric=cfg.act_symmetric, learn_scale=True, signed_step=cfg.act_signed_step,
                         clamp_first=cfg.act_clamp_first, clip_ratios=cfg.clip_ratios,
                         zero_point_search=cfg.zero_point_search)
    q.init_method = cfg.act_init
    return q


def depthwise(layer: nn.Module) -> bool:
    """A depthwise convolution (one input and one output channel per group), which integer runtimes run with
    their own kernels rather than as a matrix product."""
    return isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels == layer.out_channels > 1


class QuantLayer(nn.Module):
    """Conv2d or Linear with fake-quantized weight and input (and, under a deployment target, output).

    ``oq``: an output quantizer (a target's integer kernel writes integers). With ``cfg.int32_bias`` a
    Conv2d adds its bias rounded on the step ``s_x * s_w`` of the integer accumulator, ``s_x`` the scale
    of the quantizer that reads its input (:attr:`input_quantizer`: its own, or the one of the block or
    layer it shares), as QLinearConv does.

    Without autograd (evaluation, calibration captures) such a Conv2d whose output integers one quantizer
    writes (:attr:`output_quantizer`, from the plan's ``kernels``) computes what QLinearConv computes
    (:meth:`_kernel_forward`): the exact integer accumulator plus the int32 bias, requantized in float32 as
    ``round(float(acc + B) * (s_x * s_w / s_y))``, and returns that integer times ``s_y``; the quantizer
    (after a ReLU/ReLU6, which the kernel folds into its clip) then clamps it onto its grid. Summing the
    dequantized products in float instead moves about one output in a million by a grid step (a half-way
    value rounded the other way), and the step travels to the logits. With autograd (reconstruction's
    steps) the float form runs: the same values up to that rounding, and its gradients."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, wbits: float, abits: float | None, cfg: QuantConfig):
        super().__init__()
        self.layer = layer
        eight = float(wbits) == 8
        symmetric = (cfg.weight_symmetric_8bit or cfg.weight_reduce_range) and eight
        # depthwise kernels multiply in 16/32 bits (no int16 pair sums): their int8 grid stays whole
        reduce = cfg.weight_reduce_range and eight and not depthwise(layer)
        self.wq = UniformQuantizer(7 if reduce else wbits, channel_axis=0,
                                   clip_ratios=cfg.clip_ratios, zero_point_search=cfg.zero_point_search,
                                   symmetric=symmetric, signed=True if symmetric else None)
        self.wq.init_range(layer.weight, method=cfg.weight_init)
        if cfg.weight_quantizer is not None:
            self.wq = cfg.weight_quantizer(self.wq)
        self.aq = _act_quantizer(abits, cfg) if abits else None
        self.oq: UniformQuantizer | None = None
        self.soft: SoftRoundingWeight | None = None
        self.int32_bias = cfg.int32_bias and isinstance(layer, nn.Conv2d)
        self.__dict__["_in_q"] = None  # a plain reference: the block's quantizer is owned (and saved) by the block
        self.__dict__["_out_q"] = None  # likewise: the quantizer that writes this layer's output integers

    @property
    def input_quantizer(self) -> nn.Module | None:
        """The quantizer whose grid this layer's input is on: its own, or the block's it reads."""
        return self.aq if self.aq is not None else self.__dict__["_in_q"]

    def read_input_from(self, q: nn.Module) -> None:
        """Record that ``q`` (a block's input quantizer) quantizes this layer's input."""
        self.__dict__["_in_q"] = q

    @property
    def output_quantizer(self) -> nn.Module | None:
        """The quantizer that requantizes this layer's output (its ``oq``, or the one reader of the output)."""
        return self.__dict__["_out_q"]

    def write_output_to(self, q: nn.Module) -> None:
        """Record that ``q`` requantizes this layer's output (an integer kernel's output grid)."""
        self.__dict__["_out_q"] = q

    def _integer_kernel(self) -> bool:
        """Whether :meth:`_kernel_forward` applies: an int32-bias conv with hard-rounded integer weights between
        two calibrated per-tensor grids."""
        return (self.int32_bias and on_grid(self.wq, per_tensor=False) and (self.soft is None or self.soft.hard)
                and on_grid(self.input_quantizer) and on_grid(self.output_quantizer))

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """QLinearConv's output integer ``k`` times ``s_y`` (see the class doc); ``x`` is on the input grid."""
        s_x, s_y = self.input_quantizer.scale.reshape(()), self.output_quantizer.scale.reshape(())
        s_w = self.wq.scale.reshape(-1)
        shape = (-1,) + (1,) * (self.layer.weight.dim() - 1)
        xi = torch.round(x / s_x)  # x - z_x on the integer grid (padding adds x = 0, the zero point)
        wi = torch.round(self.qweight() / s_w.view(shape))
        # float32 sums of integers are exact below 2^24 (oneDNN's direct convolution on CPU); beyond, or on
        # accelerators (TF32), float64
        bound = float(wi.abs().flatten(1).sum(1).max() * xi.abs().max())
        dtype = torch.float32 if bound < 2**24 and x.device.type == "cpu" else torch.float64
        acc = self.layer._conv_forward(xi.to(dtype), wi.to(dtype), None).double()
        step = s_x * s_w
        if self.layer.bias is not None:
            acc = acc + self._bias_codes(step).double().view(-1, 1, 1)
        k = torch.round(acc.float() * (step / s_y).view(-1, 1, 1))  # int32 -> float32, float32 multiplier
        return k * s_y

    def bias(self) -> torch.Tensor | None:
        b = self.layer.bias
        q = self.input_quantizer
        if not (self.int32_bias and b is not None and self.wq.enabled and q is not None and q.enabled
                and getattr(q, "initialized", False)):
            return b
        step = q.scale.reshape(()) * self.wq.scale.reshape(-1)
        return self._bias_codes(step) * step.clamp_min(1e-30)

    def _bias_codes(self, step: torch.Tensor) -> torch.Tensor:
        """The bias as int32 codes on ``step`` = ``s_x * s_w`` (what QLinearConv adds to its accumulator)."""
        return round_ste(self.layer.bias / step.clamp_min(1e-30)).clamp(-(2**31), 2**31 - 1)

    def enable_soft_rounding(self, learn_scale: bool) -> SoftRoundingWeight:
        self.soft = SoftRoundingWeight(self.wq, self.layer.weight, learn_scale)
        return self.soft

    def qweight(self) -> torch.Tensor:
        return self.soft() if self.soft is not None else self.wq(self.layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        if not torch.is_grad_enabled() and self._integer_kernel():
            y = self._kernel_forward(x)
            return mark(self.oq(y), self.oq) if self.oq is not None else y
        w = self.qweight() if self.wq.enabled else self.layer.weight
        if isinstance(self.layer, nn.Conv2d):
            y = self.layer._conv_forward(x, w, self.bias())  # honours padding_mode
        else:
            y = F.linear(x, w, self.bias())
        return mark(self.oq(y), self.oq) if self.oq is not None else y


class QuantBlock(nn.Module):
    """A module whose input is quantized once (a residual block: shared by the identity branch) and/or
    whose output is quantized (a deployment target's integer tensor, e.g. a residual sum)."""

    def __init__(self, block: nn.Module, abits: float | None, cfg: QuantConfig, out_bits: float | None = None):
        super().__init__()
        self.block = block
        self.aq = _act_quantizer(abits, cfg) if abits else None
        self.oq = _act_quantizer(out_bits, cfg) if out_bits else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(mark(self.aq(x), self.aq) if self.aq is not None else x)
        return mark(self.oq(y), self.oq) if self.oq is not None else y


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
