"""ONNX export, torch side: the integer view of the quantizers and the modules torch traces into Q/DQ.

:func:`export_module` swaps each quantized layer and activation quantizer of a fake-quantized
model for an export-friendly module whose symbolic emits QuantizeLinear/DequantizeLinear (or, for
RepQ-ViT's log-sqrt2 softmax quantizer, elementwise ops), folding BatchNorm left unfolded into the
weight scales. Works on torch modules only; :func:`~dfquant.quant.export.int_state.export_int_state`
shares its integer view of the weights.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.modules import QuantBlock, QuantLayer
from dfquant.quant.plan import bn_folds
from dfquant.quant.quantizers import LogSqrt2Quantizer, SoftRoundingWeight, UniformQuantizer
from dfquant.quant.transform import bn_affine, remove_bn


INT32_MAX = 2**31 - 1  # an int32 bias plus the accumulator it is added to must stay below this


def _exact_int8_bound(x_max: int = 255) -> int:
    """The largest |int8 weight| whose products with uint8 inputs up to ``x_max`` stay exact on every CPU.

    AVX2 CPUs without VNNI multiply uint8 activations by int8 weights with VPMADDUBSW, which sums
    each pair of products in int16 with saturation: ``2 * x_max * w <= 2^15 - 1`` keeps every pair
    exact (64 for a full uint8 input; onnxruntime shifts int8 inputs by 128 first)."""
    return min(127, (2**15 - 1) // (2 * max(x_max, 1)))


# ----------------------------------------------------------------------------------------
# naming
# ----------------------------------------------------------------------------------------
def _inner_attr(m: nn.Module) -> str | None:
    """The attribute under which a dfquant wrapper keeps the module it wraps."""
    if isinstance(m, QuantLayer):
        return "layer"
    if isinstance(m, QuantBlock):
        return "block"
    if type(m).__name__ == "QuantAttention":
        return "attn"
    return None


def clean_names(qmodel: nn.Module) -> dict[str, str]:
    """Module name in ``qmodel`` -> the name the same module has in the original float model
    (the wrappers' ``.layer`` / ``.block`` / ``.attn`` hops removed)."""
    out = {"": ""}
    for name, m in qmodel.named_modules():
        inner = _inner_attr(m)
        for cname, _ in m.named_children():
            full = f"{name}.{cname}" if name else cname
            base = out[name]
            out[full] = base if cname == inner else (f"{base}.{cname}" if base else cname)
    return out


def _key(clean: str, leaf: str) -> str:
    return f"{clean}.{leaf}" if clean else leaf


# ----------------------------------------------------------------------------------------
# integer view of the quantizers
# ----------------------------------------------------------------------------------------
def _check_zero_point(z: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.equal(z, z.round()):
        raise DfqError(f"{where} has a non-integer zero point; quantize the model again (the checkpoint is inconsistent)")
    return z.round()


@torch.no_grad()
def integer_weight(ql: QuantLayer, name: str = "layer") -> dict[str, Any]:
    """The integer weight of a quantized layer: ``q`` (float tensor of integers in ``qrange``),
    per-channel ``scale`` and ``zero_point`` (same length), ``axis``, ``bits`` and ``qrange``,
    such that ``(q - zero_point) * scale == ql.qweight()`` exactly (broadcast along ``axis``)."""
    wq = ql.wq
    w = ql.layer.weight.detach()
    if not wq.initialized:
        raise DfqError(f"the weight quantizer of {name} was never initialized; quantize the model again")
    qmin, qmax = wq.qrange
    shape = wq._shape(w)
    s = wq.scale.detach().float().view(shape)
    z = _check_zero_point(wq.zero_point.detach().float(), f"weight quantizer of {name}").view(shape)
    if ql.soft is not None:
        if not ql.soft.hard:
            raise DfqError(f"{name} still has soft (unfinished) rounding, so its weight is not on the integer grid; "
                           "export a checkpoint saved after the quantization finished")
        q = torch.clamp(ql.soft.w_floor + (ql.soft.V >= 0).float() + z, qmin, qmax)
    else:
        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
    return {"q": q, "scale": wq.scale.detach().float().flatten().clone(), "zero_point": z.flatten().clone(),
            "axis": wq.channel_axis, "bits": wq.bits, "qrange": (qmin, qmax)}


def _container(qmin: int, qmax: int) -> torch.dtype:
    """int8 for signed grids, uint8 for unsigned ones (the 8-bit container of a b-bit grid)."""
    return torch.int8 if qmin < 0 else torch.uint8


def _act_params(q: UniformQuantizer, name: str) -> dict[str, Any]:
    if not q.initialized:
        raise DfqError(f"activation quantizer {name} was never calibrated; quantize the model again")
    if q.channel_axis is not None:
        raise DfqError(f"activation quantizer {name} is per-channel (axis {q.channel_axis}); the exporter writes "
                       "per-tensor activation quantizers only")
    s = q.scale.detach().float().flatten()
    if s.numel() != 1 or not bool(s.item() > 0) or not math.isfinite(s.item()):
        raise DfqError(f"activation quantizer {name} has scale {s.tolist()}; it must be one positive number — quantize the model again")
    z = _check_zero_point(q.zero_point.detach().float().flatten(), f"activation quantizer {name}")
    qmin, qmax = q.qrange
    dtype = _container(qmin, qmax)
    info = torch.iinfo(dtype)
    if not info.min <= int(z.item()) <= info.max:
        raise DfqError(f"activation quantizer {name} has zero point {int(z.item())} outside {dtype} range; quantize the model again")
    return {"scale": s.clone(), "zero_point": z.clone(), "bits": q.bits, "qrange": (qmin, qmax), "dtype": dtype}


# ----------------------------------------------------------------------------------------
# export-friendly modules (traced by torch.onnx.export; their symbolics emit Q/DQ nodes)
# ----------------------------------------------------------------------------------------
class _DequantizeWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale, zero_point, axis):  # noqa: D102 - ONNX DequantizeLinear semantics
        shape = [1] * q.dim()
        if axis is not None:
            shape[axis] = -1
        return (q.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):  # noqa: D102
        if axis is None:
            return g.op("DequantizeLinear", q, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


def _qdq_forward(x, scale, zero_point, qmin=None, qmax=None):
    info = torch.iinfo(zero_point.dtype)
    z = zero_point.float()
    q = torch.clamp(torch.round(x / scale) + z, info.min if qmin is None else qmin, info.max if qmax is None else qmax)
    return (q - z) * scale


class _QDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point):  # noqa: D102 - QuantizeLinear -> DequantizeLinear
        return _qdq_forward(x, scale, zero_point)

    @staticmethod
    def symbolic(g, x, scale, zero_point):  # noqa: D102
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


class _QClipDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # noqa: D102 - QuantizeLinear -> integer Clip -> DequantizeLinear
        return _qdq_forward(x, scale, zero_point, int(qmin), int(qmax))

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):  # noqa: D102
        q = g.op("Clip", g.op("QuantizeLinear", x, scale, zero_point), qmin, qmax)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _ActQDQ(nn.Module):
    """A per-tensor activation quantizer as QuantizeLinear (-> Clip) -> DequantizeLinear.

    dfquant computes ``(clamp(round(x/s) + z, qmin, qmax) - z) * s``. QuantizeLinear saturates
    to the 8-bit container, so a b-bit grid (b < 8) gets a ``Clip(qmin, qmax)`` on the integer
    tensor between Q and DQ: clamping to the container first and to the grid second is the
    same clamp, so the value is exact. Keeping the clip on the integer side leaves the
    producer's ``Conv/MatMul -> (Relu ->) QuantizeLinear`` pattern intact, which is what
    onnxruntime fuses into QLinearConv / QLinearMatMul; a float Clip before the Q would sit
    in that pattern and leave the producer a float Conv.
    """

    def __init__(self, q: UniformQuantizer, name: str, transposed: bool = False):
        super().__init__()
        self.transposed = transposed
        p = _act_params(q, name)
        dtype, (qmin, qmax) = p["dtype"], p["qrange"]
        scale, z = p["scale"].reshape(()), int(p["zero_point"].item())
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.tensor(z, dtype=dtype))
        info = torch.iinfo(dtype)
        self.clip = (qmin, qmax) != (info.min, info.max)
        if self.clip:
            self.register_buffer("qmin", torch.tensor(qmin, dtype=dtype))
            self.register_buffer("qmax", torch.tensor(qmax, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # see export_module: keeps DequantizeLinear directly before MatMul
            return self._qdq(x.transpose(-2, -1)).transpose(-2, -1)
        return self._qdq(x)

    def _qdq(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip:
            return _QClipDQ.apply(x, self.scale, self.zero_point, self.qmin, self.qmax)
        return _QDQ.apply(x, self.scale, self.zero_point)


class _LogSqrt2(nn.Module):
    """RepQ-ViT's log-sqrt2 quantizer in elementwise ops (no QDQ equivalent exists)."""

    def __init__(self, q: LogSqrt2Quantizer, name: str):
        super().__init__()
        if not q.initialized:
            raise DfqError(f"softmax quantizer {name} was never calibrated; quantize the model again")
        self.register_buffer("scale", q.scale.detach().float().reshape(()).clone())
        self.n_levels = 2 ** int(round(q.bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.round(-2 * torch.log2(torch.clamp(x / self.scale, min=1e-20)))
        zero = k >= self.n_levels
        k = torch.clamp(k, 0, self.n_levels - 1)
        out = self.scale * torch.pow(2.0, -k / 2)
        return torch.where(zero, torch.zeros_like(out), out)


class _ExportLayer(nn.Module):
    """A QuantLayer with its weight as integer buffer + DequantizeLinear (per output channel).

    The integer weight is stored in the form integer kernels run fastest: when every
    ``q - zero_point`` fits int8 (always for grids of at most 7 bits), as int8 ``q - zero_point``
    with zero point 0 (onnxruntime's symmetric u8s8 path); otherwise as the grid's own
    8-bit container with per-channel zero points. :meth:`fold_bn` folds a following
    BatchNorm into the per-channel scales and the bias without changing any integer.

    ``int8_weights`` re-rounds a grid whose ``q - z`` does not fit that form (8-bit asymmetric
    grids use both ends, so they never do) onto a symmetric int8 grid per channel, scale
    ``max|w| / 127``: an approximation (at most half the new step per weight) that lets integer
    kernels run u8s8 instead of u8u8 with per-channel zero points, the slow path. Up to 127 it
    relies on VNNI/AMX dot products; AVX2 without VNNI may saturate int16 pair sums (see :func:`_exact_int8_bound`).

    Unless ``fuse_bias``, the bias is added after the Conv/MatMul instead of being its bias
    input: runtimes that fuse DequantizeLinear -> Conv round a float bias to int32 with step
    ``s_x * s_w`` (onnxruntime's CPU optimizer does), which dfquant's simulation does not
    model — but the separate Add also keeps the Conv out of the integer-kernel pattern. With
    ``fuse_bias`` the exporter chooses those int32 biases itself (:func:`_int32_biases`).
    """

    def __init__(self, ql: QuantLayer, name: str, fuse_bias: bool = False, int8_weights: bool = False):
        super().__init__()
        self.int8_weights = int8_weights
        self.reround = False
        layer = ql.layer
        self.fuse_bias = fuse_bias
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.aq = _act_module(ql.aq, f"{name}.aq")
        self.oq = _act_module(ql.oq, f"{name}.oq")
        self.quantized = ql.wq.enabled
        bias = ql.bias()  # a deployment target's model adds its bias already rounded to int32 on s_x * s_w
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if self.quantized:
            iw = integer_weight(ql, name)
            self.bits, self.qrange = iw["bits"], iw["qrange"]
            c_out = layer.weight.shape[0]
            if iw["axis"] not in (None, 0):
                raise DfqError(f"{name} has its weight quantized along axis {iw['axis']}; the exporter writes axis 0")
            # the grid's integers and per-channel zero points; a per-tensor grid repeats its scale
            self.q, self.z, self.s = iw["q"], iw["zero_point"].expand(c_out).clone(), iw["scale"].expand(c_out).clone()
            self._store()
        else:
            self.register_buffer("weight", layer.weight.detach().clone())

    def _store(self) -> None:
        """Write the grid (q, z, s) as the buffers the graph reads."""
        shape = [-1] + [1] * (self.q.dim() - 1)
        d = self.q - self.z.view(shape)
        span = int(d.abs().max().item())
        bound = _exact_int8_bound()  # any uint8 input: the input grid is not known here
        if span <= bound:
            # the largest power of two m with m |q - z| <= bound: the same weight as (m (q - z)) * (s / m)
            # (exact: a power of two), and the int32 bias grid s_x s_w / m is m times finer
            m = 2 ** int(math.floor(math.log2(bound / max(span, 1))))
            w, zp, scale = (d * m).to(torch.int8), torch.zeros_like(self.z, dtype=torch.int8), self.s / m
        elif self.int8_weights:
            wf = d * self.s.view(shape)
            scale = (wf.abs().amax(dim=tuple(range(1, wf.dim()))) / 127).clamp_min(1e-12)
            w = torch.clamp(torch.round(wf / scale.view(shape)), -127, 127).to(torch.int8)
            zp, m, self.reround = torch.zeros_like(self.z, dtype=torch.int8), 1, True
        else:
            dtype, m, scale = _container(*self.qrange), 1, self.s
            w, zp = self.q.to(dtype), self.z.to(dtype)
        self.multiplier = m
        self.register_buffer("weight_int", w)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zp)

    @torch.no_grad()
    def fold_bn(self, k: torch.Tensor, c: torch.Tensor) -> None:
        """Absorb a following per-channel affine ``y * k + c`` (an eval-mode BatchNorm).

        The scale of channel j becomes ``s_j |k_j|``; a negative ``k_j`` mirrors the channel's
        integers inside the grid (``q -> qmin + qmax - q``, same for the zero point), which
        negates ``q - z`` exactly. The bias becomes ``b k + c``.
        """
        if self.quantized:
            neg = k < 0
            lo, hi = self.qrange
            shape = [-1] + [1] * (self.q.dim() - 1)
            self.q = torch.where(neg.view(shape), lo + hi - self.q, self.q)
            self.z = torch.where(neg, lo + hi - self.z, self.z)
            self.s = self.s * k.abs()
            self._store()
        else:
            self.weight.mul_(k.view([-1] + [1] * (self.weight.dim() - 1)))
        self.bias = (self.bias if self.bias is not None else torch.zeros_like(k)) * k + c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.aq(x)
        if self.quantized:
            w = _DequantizeWeight.apply(self.weight_int, self.weight_scale, self.weight_zero_point, 0)
        else:
            w = self.weight
        bias = self.bias if self.fuse_bias else None
        if self.conv:
            y = F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = F.linear(x, w, bias)
        if self.bias is not None and not self.fuse_bias:
            y = y + (self.bias.view(-1, 1, 1) if self.conv else self.bias)
        return self.oq(y)


def _act_module(q: nn.Module | None, name: str) -> nn.Module:
    if q is None or not q.enabled:
        return nn.Identity()
    if isinstance(q, LogSqrt2Quantizer):
        return _LogSqrt2(q, name)
    return _ActQDQ(q, name)


_KNOWN = (QuantLayer, QuantBlock, UniformQuantizer, LogSqrt2Quantizer, SoftRoundingWeight)


def _check_supported(qmodel: nn.Module) -> None:
    """Refuse modules whose quantization the exporter would silently drop."""
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer) and not isinstance(m.layer, (nn.Conv2d, nn.Linear)):
            raise DfqError(f"cannot export {name}: QuantLayer wraps {type(m.layer).__name__}, not Conv2d/Linear")
        if (isinstance(m, UniformQuantizer) and type(m).forward is not UniformQuantizer.forward
                and not getattr(m, "frozen", False)):
            # the export reads scale/zero_point/qrange; a subclass with its own forward must have
            # fallen back to that grid (``frozen``) for the export to compute what it computes
            raise DfqError(f"cannot export quantizer {name} ({type(m).__name__}): it overrides forward and is not "
                           "frozen onto its integer grid; freeze it (e.g. nipq.finalize) before exporting")
        if isinstance(m, _KNOWN) or type(m).__name__ == "QuantAttention":
            continue
        tname = type(m).__name__
        if "quant" in tname.lower() or (hasattr(m, "bits") and hasattr(m, "scale")):
            raise DfqError(f"cannot export module {name or '<root>'} ({type(m).__module__}.{tname}): the exporter "
                           "only knows dfquant's QuantLayer/QuantBlock/QuantAttention, UniformQuantizer and "
                           "LogSqrt2Quantizer; replace it or add it to dfquant.quant.export")


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _unfolded_bn(qmodel: nn.Module, example_input: torch.Tensor | None) -> dict[str, str]:
    """Quantized conv -> the BatchNorm2d its output flows into alone, as ``qmodel`` module names:
    the pairs the quantization plan folds (:func:`~dfquant.quant.plan.bn_folds`: data flow, not
    names), here among the BatchNorms the algorithm kept. The graph is traced on a view of
    ``qmodel`` without its QuantLayer/QuantBlock wrappers (the model the plan was made on);
    the view shares every tensor, so it costs no weight copies."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules()):
        return {}
    memo: dict[int, Any] = {id(t): t for t in (*qmodel.parameters(), *qmodel.buffers())}
    view = copy.deepcopy(qmodel, memo)
    wrappers = [(n, m) for n, m in view.named_modules() if n and isinstance(m, (QuantLayer, QuantBlock))]
    for name, m in sorted(wrappers, key=lambda nm: len(nm[0]), reverse=True):  # innermost first
        _set(view, name, m.layer if isinstance(m, QuantLayer) else m.block)
    view_names = {id(m): n for n, m in view.named_modules()}
    to_q: dict[str, str] = {}  # view name -> qmodel name (a QuantLayer stands for the conv it wraps)
    for name, m in qmodel.named_modules():
        copied = memo.get(id(m.layer if isinstance(m, QuantLayer) else m))
        if copied is not None and id(copied) in view_names:
            to_q.setdefault(view_names[id(copied)], name)
    return {to_q[c]: to_q[b] for c, b in bn_folds(view, example_input).items()
            if isinstance(qmodel.get_submodule(to_q[c]), QuantLayer)}


def export_module(qmodel: nn.Module, fuse_bias: bool = False, example_input: torch.Tensor | None = None,
                  int8_weights: bool = False) -> nn.Module:
    """A copy of ``qmodel`` in which every quantizer is an explicit integer/QDQ construct.

    BatchNorms that follow a quantized Conv are folded into it (``example_input`` is needed
    only for a model torch.fx cannot trace, as for the quantization plan). Its forward equals
    the fake-quantized model's up to float rounding; tracing it with
    ``torch.onnx.export(..., dynamo=False)`` yields the QDQ graph.
    """
    _check_supported(qmodel)
    folds = _unfolded_bn(qmodel, example_input)
    emodel = copy.deepcopy(qmodel).eval()
    for name, m in list(emodel.named_modules()):
        if isinstance(m, QuantLayer):
            _set(emodel, name, _ExportLayer(m, name, fuse_bias, int8_weights))
    # BatchNorm kept unfolded by the algorithm (Genie-M) sits between the Conv and the next
    # QuantizeLinear, where no runtime fuses it into an integer kernel: fold it into the
    # per-channel weight scales and the bias (the integers stay the same)
    for conv_name, bn_name in folds.items():
        emodel.get_submodule(conv_name).fold_bn(*bn_affine(emodel.get_submodule(bn_name)))
        remove_bn(emodel, bn_name)
    for name, m in list(emodel.named_modules()):
        if type(m).__name__ == "QuantAttention" and isinstance(m.k_q, UniformQuantizer) and m.k_q.enabled:
            # QuantAttention transposes k after quantizing it. Quantizing the transposed tensor
            # instead (per-tensor, so the same values) lets the exporter cancel the transpose
            # pair and puts DequantizeLinear right before the MatMul: onnxruntime (1.32) fails
            # to load a graph at opset >= 21 where an int8 DequantizeLinear feeds a Transpose
            # (its QDQ propagation and int8->uint8 conversion disagree on output_dtype).
            m.k_q = _ActQDQ(m.k_q, f"{name}.k_q", transposed=True)
    for name, m in list(emodel.named_modules()):
        if isinstance(m, (UniformQuantizer, LogSqrt2Quantizer)):
            _set(emodel, name, _act_module(m, name))
    for p in emodel.parameters():
        p.requires_grad_(False)
    return emodel
