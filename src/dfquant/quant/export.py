"""Deployment export of a fake-quantized model: an ONNX QDQ graph and an integer state dict.

dfquant's quantized models *simulate* integer inference (fake quantization): every
quantizer rounds a float tensor onto its integer grid and scales it straight back, and all
arithmetic stays in float32. Accuracies measured on them are what integer inference with
the same grids gives, but the PyTorch models themselves are neither smaller nor faster.
This module writes what a deployment runtime consumes:

* :func:`export_onnx` — an ONNX graph in QDQ form, shaped for onnxruntime's integer kernels.
  Each quantized weight is an integer initializer followed by ``DequantizeLinear`` per output
  channel: int8 ``q - z`` with zero point 0 where it fits (scaled by a power of two, see
  :class:`_ExportLayer`), else the grid's int8/uint8 container with per-channel zero points;
  grids of at most 4 bits (ternary included) are stored packed as INT4/UINT4 at opset 21+.
  BatchNorm left unfolded by the algorithm is folded into the weight scales and the bias.
  Each activation quantizer becomes ``QuantizeLinear -> DequantizeLinear`` on int8 (signed
  grids) or uint8 (unsigned or asymmetric grids); below 8 bits a ``Clip`` to the b-bit range
  acts on the integer tensor between the two. With ``fuse_bias`` the Conv/Gemm nodes fit the
  pattern onnxruntime turns into QLinearConv (:func:`runtime_graph` shows what it ran; nodes it
  will run in float get their weights dequantized by constant ops it folds at load), with int32
  biases that reproduce the simulation's output integers, or the Conv kept float (:func:`_int32_biases`). What
  dfquant keeps in float (ReLU, pooling, residual additions, LayerNorm, GELU, softmax) stays
  float in the graph. RepQ-ViT's log-sqrt2 softmax quantizer has no QDQ form and is written as
  elementwise ops (Div, Clip, Log, Round, Pow, Where).
* :func:`export_int_state` — a safetensors file with the integer weights, their scales and
  zero points, the activation quantizers and every remaining float tensor (key names in
  its docstring).
* :func:`verify_onnx` — runs the ONNX file in onnxruntime next to the fake-quantized
  PyTorch model and reports logit differences and top-1 agreement.
* :func:`runtime_graph`, :func:`measure_latency`, :func:`deployment_gain` — what onnxruntime
  makes of the file (integer vs float kernels, from its optimized graph) and what it buys over
  float32 (size, interleaved latency).

The exporter traces with torch's TorchScript-based ONNX exporter (``dynamo=False``), which
writes opsets up to 20; later opsets are reached with ``onnx.version_converter``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import DfqError
from dfquant.io import atomic_path, save_tensors
from dfquant.quant.modules import QuantBlock, QuantLayer
from dfquant.quant.quantizers import LogSqrt2Quantizer, SoftRoundingWeight, UniformQuantizer
from dfquant.quant.plan import bn_folds
from dfquant.quant.transform import bn_affine, remove_bn

DEFAULT_OPSET = 21          # first opset with INT4/UINT4 (4-bit weights stored packed)
MIN_OPSET = 13              # per-axis QuantizeLinear/DequantizeLinear
TORCHSCRIPT_MAX_OPSET = 20  # highest opset torch's TorchScript exporter writes
INT4_MIN_OPSET = 21
INT32_MAX = 2**31 - 1  # an int32 bias plus the accumulator it is added to must stay below this


def _exact_int8_bound(x_max: int = 255) -> int:
    """The largest |int8 weight| whose products with uint8 inputs up to ``x_max`` stay exact on every CPU.

    AVX2 CPUs without VNNI multiply uint8 activations by int8 weights with VPMADDUBSW, which sums
    each pair of products in int16 with saturation: ``2 * x_max * w <= 2^15 - 1`` keeps every pair
    exact (64 for a full uint8 input; onnxruntime shifts int8 inputs by 128 first)."""
    return min(127, (2**15 - 1) // (2 * max(x_max, 1)))

# Acceptance thresholds of ``dfq export --verify``. Q/DQ and the integer weights reproduce
# dfquant bit for bit (tests/test_export.py), but onnxruntime's float Conv/MatMul sum in
# another order than PyTorch's; where that ~1e-7 relative noise moves a value across a
# rounding boundary of an activation quantizer, the value lands one grid step away and the
# step propagates. Measured mean |logit diff| / max |logit| on 256-1000 test images:
# 1e-5..1.5e-4 for the trained fmnist/resnet20 (W8A8 to W3A3, ternary), up to ~2e-3 for
# random-weight ResNet-20s, whose layers amplify perturbations more. The logit bound sits
# 5x above the worst of those and well below the error of a wrong scale, zero point or clip
# range (the size of the quantization noise itself, >= several percent).
# The top-1 bound is counted in images (top1_tolerance_images): on n images the numbers of correctly classified
# images of onnxruntime and of the fake-quantized model may differ by max(1, floor(n * points / 100)), so
# float rounding of percentages cannot fail a one-image difference that the bound allows.
TOP1_TOLERANCE_POINTS = 0.1  # |top-1(onnxruntime) - top-1(fake-quant)| in percentage points (the bound)
LOGIT_MEAN_TOLERANCE = 0.01  # mean |logit diff| / max |logit|
# --integer-residual / --int8-weights quantize what the simulation keeps in float: the deployed top-1
# may move, and only that is bounded (1 point: the size of the drop a user would notice)
APPROX_TOP1_TOLERANCE_POINTS = 1.0
# Integer kernels whose int32 bias cannot reproduce the simulation's output integers run in float
# unless, measured on calibration images, they move the logits by at most this mean |difference| /
# max |logit| and change no argmax (_int32_biases): a tenth of LOGIT_MEAN_TOLERANCE, since a moved
# output integer can change classes well below that bound (benchmarks/results/int32_bias.md).
BIAS_ROUNDING_LOGIT_TOLERANCE = 0.001


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
        raise DfqError(f"{where} has a non-integer zero point; re-run `dfq quantize` (the checkpoint is inconsistent)")
    return z.round()


@torch.no_grad()
def integer_weight(ql: QuantLayer, name: str = "layer") -> dict[str, Any]:
    """The integer weight of a quantized layer: ``q`` (float tensor of integers in ``qrange``),
    per-channel ``scale`` and ``zero_point`` (same length), ``axis``, ``bits`` and ``qrange``,
    such that ``(q - zero_point) * scale == ql.qweight()`` exactly (broadcast along ``axis``)."""
    wq = ql.wq
    w = ql.layer.weight.detach()
    if not wq.initialized:
        raise DfqError(f"the weight quantizer of {name} was never initialized; re-run `dfq quantize`")
    qmin, qmax = wq.qrange
    shape = wq._shape(w)
    s = wq.scale.detach().float().view(shape)
    z = _check_zero_point(wq.zero_point.detach().float(), f"weight quantizer of {name}").view(shape)
    if ql.soft is not None:
        if not ql.soft.hard:
            raise DfqError(f"{name} still has soft (unfinished) rounding, so its weight is not on the integer grid; "
                           "export a checkpoint written by `dfq quantize` after reconstruction finished")
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
        raise DfqError(f"activation quantizer {name} was never calibrated; re-run `dfq quantize`")
    if q.channel_axis is not None:
        raise DfqError(f"activation quantizer {name} is per-channel (axis {q.channel_axis}); the exporter writes "
                       "per-tensor activation quantizers only")
    s = q.scale.detach().float().flatten()
    if s.numel() != 1 or not bool(s.item() > 0) or not math.isfinite(s.item()):
        raise DfqError(f"activation quantizer {name} has scale {s.tolist()}; it must be one positive number — re-run `dfq quantize`")
    z = _check_zero_point(q.zero_point.detach().float().flatten(), f"activation quantizer {name}")
    qmin, qmax = q.qrange
    dtype = _container(qmin, qmax)
    info = torch.iinfo(dtype)
    if not info.min <= int(z.item()) <= info.max:
        raise DfqError(f"activation quantizer {name} has zero point {int(z.item())} outside {dtype} range; re-run `dfq quantize`")
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
            raise DfqError(f"softmax quantizer {name} was never calibrated; re-run `dfq quantize`")
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
        self.quantized = ql.wq.enabled
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
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
        if self.bias is None or self.fuse_bias:
            return y
        return y + (self.bias.view(-1, 1, 1) if self.conv else self.bias)


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


# ----------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------
def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise DfqError("ONNX export needs onnx and onnxruntime; install them with `pip install 'dfquant[export]'`") from None


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 (torch's TorchScript exporter prints the whole graph to
    stdout when it fails, before the one-line error this module raises)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _locate_op(emodel: nn.Module, example: torch.Tensor, op: str) -> list[str]:
    """Names (and types) of the innermost modules whose forward calls ``op`` (e.g. ``aten::cummax``)."""
    from torch.overrides import TorchFunctionMode

    target = op.split("::")[-1].split(".")[0].lstrip("_")
    stack: list[str] = []
    found: dict[str, None] = {}
    names = {id(m): (n or "<root>") for n, m in emodel.named_modules()}

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            fname = getattr(func, "__name__", "").lstrip("_")
            if stack and fname and (fname == target or target.endswith("_" + fname) or fname.endswith(target)):
                found[stack[-1]] = None
            return func(*args, **(kwargs or {}))

    hooks = []
    for m in emodel.modules():
        desc = f"{names[id(m)]} ({type(m).__name__})"
        hooks.append(m.register_forward_pre_hook(lambda mod, a, d=desc: stack.append(d)))
        hooks.append(m.register_forward_hook(lambda mod, a, o: (stack.pop(), None)[1]))  # None: keep the output
    try:
        with torch.no_grad(), Spy():
            emodel(example)
    except Exception:  # noqa: BLE001 - best effort: the op name alone is still reported
        pass
    finally:
        for h in hooks:
            h.remove()
    return list(found)


def _materialize_identities(model) -> None:
    """The TorchScript exporter shares equal initializers (e.g. every zero point 0) through
    Identity nodes; give each consumer its own copy so Q/DQ nodes read initializers directly."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _prune_initializers(model) -> None:
    """Drop initializers and Constant nodes nothing reads any more (e.g. the bounds of folded Clips)."""
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for n in dead:
        graph.node.remove(n)
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _pack4(t: torch.Tensor) -> bytes:
    """Two 4-bit values per byte, first in the low nibble (ONNX's raw INT4/UINT4 layout); raw data,
    because ``int32_data`` would spend a varint on every byte."""
    v = (t.flatten().to(torch.int64) & 0xF).to(torch.uint8)
    if v.numel() % 2:
        v = torch.cat([v, v.new_zeros(1)])
    return (v[0::2] | (v[1::2] << 4)).numpy().tobytes()


def _to_int4(model, grids: dict[str, tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]]) -> dict[str, str]:
    """Store the weights of ``grids`` (initializer name -> the grid's integers q, per-channel
    zero points z, all within a 4-bit range, and the layer's multiplier m: its power of two, or
    one per channel from :func:`_int32_biases`) packed as INT4/UINT4.

    The graph keeps consuming the int8 ``m (q - z)`` (see :class:`_ExportLayer`): it is rebuilt
    from the packed initializers by ``Cast -> Sub -> Mul -> Cast`` on constants, which onnxruntime folds
    once at load, so the file holds 4 bits per weight while the runtime still sees the int8
    weight its integer kernels take. Returns initializer name -> type name of the packed q.
    """
    from onnx import TensorProto, helper

    used = {i for node in model.graph.node if node.op_type == "DequantizeLinear" for i in node.input[:1]}
    nodes, done = [], {}
    for name, (q, z, m) in grids.items():
        if name not in used:
            continue
        signed = bool(q.min() < 0 or z.min() < 0)
        ttype = TensorProto.INT4 if signed else TensorProto.UINT4
        zshape = [len(z)] + [1] * (q.dim() - 1)
        packed = {f"{name}_int4": (q, list(q.shape)), f"{name}_zero_point_int4": (z, zshape)}
        for init_name, (t, shape) in packed.items():
            model.graph.initializer.append(helper.make_tensor(init_name, ttype, shape, _pack4(t), raw=True))
        mult = torch.as_tensor(m, dtype=torch.int32)
        mshape = [len(mult)] + [1] * (q.dim() - 1) if mult.dim() else []
        model.graph.initializer.append(helper.make_tensor(f"{name}_multiplier", TensorProto.INT32, mshape,
                                                          mult.flatten().tolist()))
        nodes += [helper.make_node("Cast", [f"{name}_int4"], [f"{name}_q32"], to=TensorProto.INT32),
                  helper.make_node("Cast", [f"{name}_zero_point_int4"], [f"{name}_z32"], to=TensorProto.INT32),
                  helper.make_node("Sub", [f"{name}_q32", f"{name}_z32"], [f"{name}_d32"]),
                  helper.make_node("Mul", [f"{name}_d32", f"{name}_multiplier"], [f"{name}_md32"]),
                  helper.make_node("Cast", [f"{name}_md32"], [f"{name}_from_int4"], to=TensorProto.INT8)]
        done[f"{name}_int4"] = "INT4" if signed else "UINT4"
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in grids and f"{node.input[0]}_int4" in done:
            node.input[0] = f"{node.input[0]}_from_int4"
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + rest)  # their inputs are initializers only, so first is a valid place
    return done



# ----------------------------------------------------------------------------------------
# integer-kernel form: graph rewrites after tracing
# ----------------------------------------------------------------------------------------
def _consumers(graph, tensor: str) -> list:
    return [n for n in graph.node if tensor in n.input]


def _set_const(graph, name: str, value) -> None:
    """Replace initializer ``name`` (added if missing) by numpy ``value``."""
    from onnx import numpy_helper

    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    graph.initializer.append(numpy_helper.from_array(value, name))


def _act_pairs(graph) -> list[tuple[Any, Any | None, list]]:
    """Each activation QuantizeLinear (its input is not an initializer), the integer Clip between
    it and its DequantizeLinear nodes (None if absent), and those DequantizeLinear nodes."""
    inits = {t.name for t in graph.initializer}
    out = []
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        cons = _consumers(graph, q.output[0])
        clip = cons[0] if len(cons) == 1 and cons[0].op_type == "Clip" else None
        dqs = _consumers(graph, clip.output[0]) if clip is not None else cons
        if dqs and all(d.op_type == "DequantizeLinear" for d in dqs):
            out.append((q, clip, dqs))
    return out


def _uint8_activations(model) -> None:
    """Write every int8 activation grid as the same grid in uint8: zero point and integer clip
    bounds + 128. ``clamp(round(x/s) + z, lo, hi) - z`` does not change, so the values are
    exact; onnxruntime's integer kernels take one activation type for input and output, and
    uint8 (u8s8 kernels) is the one x86 runs natively, so a conv between a signed and an
    unsigned grid becomes fusable."""
    import numpy as np

    graph = model.graph
    changed: set[str] = set()
    for q, clip, dqs in _act_pairs(graph):
        zp = _const(graph, q.input[2]) if len(q.input) > 2 else None
        if zp is None or zp.dtype != np.int8 or any(_const(graph, d.input[2]) is None for d in dqs):
            continue
        changed |= {q.output[0]} | ({clip.output[0]} if clip is not None else set())
        new = (zp.astype(np.int16) + 128).astype(np.uint8)
        name = q.input[2] + "_uint8"
        _set_const(graph, name, new)
        for node in (q, *dqs):
            node.input[2] = name
        if clip is not None:
            for k in (1, 2):
                bound = _const(graph, clip.input[k])
                _set_const(graph, clip.input[k] + "_uint8", (bound.astype(np.int16) + 128).astype(np.uint8))
                clip.input[k] = clip.input[k] + "_uint8"
    kept = [v for v in graph.value_info if v.name not in changed]  # their element type was int8
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _fold_activation_clips(model) -> int:
    """Fold a float Relu/Clip that feeds only a QuantizeLinear into the integer clip after it.

    ``round`` is monotone, so ``clamp(round(clamp(x, a, b) / s) + z, qmin, qmax)`` equals
    ``clamp(round(x / s) + z, max(qmin, round(a / s) + z), min(qmax, round(b / s) + z))``: the
    same integers, computed with the Conv -> QuantizeLinear pattern onnxruntime fuses (a ReLU6
    in front of a grid reaching past 6 otherwise keeps the Conv in float). Returns how many
    were folded."""
    import numpy as np
    from onnx import helper

    graph = model.graph
    folded = 0
    for act in [n for n in graph.node if n.op_type in ("Relu", "Clip")]:
        cons = _consumers(graph, act.output[0])
        if len(cons) != 1 or cons[0].op_type != "QuantizeLinear" or act.output[0] in {o.name for o in graph.output}:
            continue
        q = cons[0]
        scale, zp = _const(graph, q.input[1]), _const(graph, q.input[2]) if len(q.input) > 2 else None
        if scale is None or zp is None or scale.size != 1:
            continue
        if act.op_type == "Clip":
            lo, hi = (_const(graph, act.input[k]) if len(act.input) > k and act.input[k] else np.float32(b)
                      for k, b in ((1, -np.inf), (2, np.inf)))
            if lo is None or hi is None:
                continue  # data-dependent bounds
        else:
            lo, hi = np.float32(0), np.float32(np.inf)
        info = np.iinfo(zp.dtype)
        s, z = np.float32(scale.item()), int(zp.item())
        clip = _q_clip(graph, q)
        cur_lo, cur_hi = _q_bounds(graph, q)
        new_lo = max(cur_lo, int(np.round(np.float32(lo) / s)) + z) if np.isfinite(lo) else cur_lo
        new_hi = min(cur_hi, int(np.round(np.float32(hi) / s)) + z) if np.isfinite(hi) else cur_hi
        if new_lo > new_hi:
            continue
        q.input[0] = act.input[0]
        graph.node.remove(act)
        folded += 1
        if (new_lo, new_hi) == (info.min, info.max):
            continue
        base = q.output[0] + "_clip"
        _set_const(graph, base + "_min", np.array(new_lo, dtype=zp.dtype))
        _set_const(graph, base + "_max", np.array(new_hi, dtype=zp.dtype))
        if clip is not None:
            clip.input[1], clip.input[2] = base + "_min", base + "_max"
        else:
            for d in _consumers(graph, q.output[0]):
                d.input[0] = base
            idx = list(graph.node).index(q)
            graph.node.insert(idx + 1, helper.make_node("Clip", [q.output[0], base + "_min", base + "_max"], [base],
                                                        name=q.name + "_clip"))
    return folded


def _float_activation_points(graph) -> list[str]:
    """Float tensors that keep a Conv/Gemm or a residual Add off integer kernels: the input of a
    Conv/Gemm that is not dequantized, the output of a Conv/Gemm (after its Relu/Clip) and of a
    residual Add with a convolution branch that is not quantized next. Model outputs stay float."""
    inits = {t.name for t in graph.initializer}
    prod = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    points: dict[str, None] = {}
    for node in graph.node:
        kernel = node.op_type in ("Conv", "Gemm")
        # a residual sum with a convolution branch (ResNet, MobileNetV2); a ViT's residual stream
        # feeds LayerNorm, where quantizing it would buy no integer kernel
        residual = (node.op_type == "Add" and not any(i in inits for i in node.input)
                    and any(i in prod and prod[i].op_type in ("Conv", "Gemm") for i in node.input))
        if not (kernel or residual):
            continue
        if kernel and (node.input[0] not in prod or prod[node.input[0]].op_type != "DequantizeLinear"):
            points[node.input[0]] = None
        chain, consumers = _activation_chain(graph, node)
        end = (chain[-1] if chain else node).output[0]
        if consumers and [c.op_type for c in consumers] != ["QuantizeLinear"] and end not in outputs:
            points[end] = None
    return list(points)


def _quantize_float_activations(model, calib: torch.Tensor, batch_size: int = 32) -> dict[str, Any]:
    """Put an 8-bit QuantizeLinear -> DequantizeLinear on every :func:`_float_activation_points`
    tensor (the integer-residual form). Each grid is uint8 with scale max|x| / 127 and zero point
    128, or max(x) / 255 and zero point 0 when x never went below 0 — max over ``calib`` run
    through the graph as it is. This changes the model's function (dfquant's simulation keeps
    these tensors in float): an approximation, verified against the simulation on test images."""
    import numpy as np
    from onnx import TensorProto, helper

    graph = model.graph
    points = _float_activation_points(graph)
    if not points:
        return {"points": 0, "calibration_images": len(calib)}
    probe = copy.deepcopy(model)
    for t in points:
        probe.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    sess = _ort_session(probe, "none")
    lo = {t: np.float32(np.inf) for t in points}
    hi = {t: np.float32(-np.inf) for t in points}
    for i in range(0, len(calib), batch_size):
        outs = sess.run(points, {graph.input[0].name: calib[i : i + batch_size].float().numpy()})
        for t, v in zip(points, outs):
            lo[t], hi[t] = min(lo[t], v.min()), max(hi[t], v.max())
    for t in points:
        signed = bool(lo[t] < 0)
        amax = float(max(abs(lo[t]), abs(hi[t]), 1e-8))
        scale, zp = np.float32(amax / (127.0 if signed else 255.0)), np.uint8(128 if signed else 0)
        base = t + "_int8"
        _set_const(graph, base + "_scale", np.array(scale))
        _set_const(graph, base + "_zero_point", np.array(zp))
        for c in _consumers(graph, t):
            for k, name in enumerate(c.input):
                if name == t:
                    c.input[k] = base + "_dq"
        nodes = [helper.make_node("QuantizeLinear", [t, base + "_scale", base + "_zero_point"], [base + "_q"],
                                  name=base + "_quantize"),
                 helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zero_point"], [base + "_dq"],
                                  name=base + "_dequantize")]
        prod = next((k for k, n in enumerate(graph.node) if t in n.output), -1)
        for k, n in enumerate(nodes):
            graph.node.insert(prod + 1 + k, n)
    return {"points": len(points), "calibration_images": len(calib),
            "calibration": "8-bit uint8 grids from max |x| over the calibration images"}


# ----------------------------------------------------------------------------------------
# int32 biases of integer kernels
# ----------------------------------------------------------------------------------------
def _accumulator_range(d, x_lo: int, x_hi: int):
    """Per output channel, the least and greatest integer accumulator ``sum (x_q - z_x) d`` over inputs
    ``x_q - z_x`` in ``[x_lo, x_hi]`` (zero included: padding), for integer weights ``d`` [C, ...]."""
    import numpy as np

    d = d.reshape(len(d), -1).astype(np.float64)
    lo, hi = min(x_lo, 0), max(x_hi, 0)
    return (np.minimum(d * lo, d * hi).sum(1), np.maximum(d * lo, d * hi).sum(1))


def _exact_bias_window(t, m, a_min, a_max, levels):
    """The offsets ``c`` that give the same output integers as the exact offset ``t``, per channel.

    An integer kernel computes the output integer ``clip(round((A + c) M) + z, lo, hi)`` from the
    integer accumulator ``A`` and a bias offset ``c`` (the int32 bias over the weight multiplier, in
    units of ``s_x s_w``); the simulation uses the exact ``t = b / (s_x s_w)``. The output reaches
    level ``j`` once ``A >= ceil(u_j - c)``, ``u_j = (j - 1/2 - z) / M``, so ``c`` changes no output
    on reachable accumulators ``[a_min, a_max]`` when every such threshold is unchanged (clipped to
    that range). Each threshold confines ``c`` to an interval; returns their intersection ``[L, R)``
    per channel (it contains ``t``). ``levels`` are ``j - 1/2 - z`` for the output levels above ``lo``.
    """
    import numpy as np

    u = levels[None, :] / m[:, None]
    thr = np.ceil(u - t[:, None])
    a_min, a_max = a_min[:, None], a_max[:, None]
    inside = (thr > a_min) & (thr <= a_max)
    lo = np.where(inside, u - thr, np.where(thr <= a_min, u - a_min, -np.inf))
    hi = np.where(inside, u - thr + 1, np.where(thr > a_max, u - a_max, np.inf))
    return lo.max(1), hi.min(1)


def _q_clip(graph, q):
    """The integer Clip that is QuantizeLinear ``q``'s only consumer (its b-bit grid, or a folded ReLU/ReLU6), or None."""
    cons = _consumers(graph, q.output[0])
    return cons[0] if len(cons) == 1 and cons[0].op_type == "Clip" else None


def _q_bounds(graph, q) -> tuple[int, int]:
    """The integer range of QuantizeLinear ``q``'s output: the bounds of its :func:`_q_clip`, else its container's."""
    import numpy as np

    clip = _q_clip(graph, q)
    if clip is not None:
        return int(_const(graph, clip.input[1])), int(_const(graph, clip.input[2]))
    info = np.iinfo(_const(graph, q.input[2]).dtype)
    return info.min, info.max


def _separate_bias(graph, node) -> None:
    """Move the bias input of Conv/Gemm ``node`` into a float Add after it (in place): no runtime
    rounds it, and the node no longer fits the integer-kernel pattern."""
    from onnx import helper

    bias = _const(graph, node.input[2])
    spatial = next((len(a.ints) for a in node.attribute if a.name == "kernel_shape"), 2)
    name, out = node.input[2] + "_separate", node.output[0]
    _set_const(graph, name, bias.reshape([-1] + [1] * spatial if node.op_type == "Conv" else [-1]))
    del node.input[2]
    node.output[0] = out + "_without_bias"
    graph.node.insert(list(graph.node).index(node) + 1, helper.make_node("Add", [node.output[0], name], [out]))


def _bias_plans(model, layers: dict[str, "_ExportLayer"]) -> list[dict[str, Any]]:
    """For each Conv/Gemm with a bias that onnxruntime runs as an integer kernel, the int32 bias (and
    weight multiplier) that reproduces the simulation's output integers best.

    QLinearConv/QGemm add the bias rounded to int32 on the step ``s_x s_w`` to the integer
    accumulator; the simulation adds the exact float bias. Where that step is not small against the
    output grid's (a BN-folded 4-bit depthwise channel of fmnist/mobilenetv2: 51 output steps) the rounding
    moves outputs by grid steps. The output integer depends on the bias only through the
    accumulator thresholds of the output levels (:func:`_exact_bias_window`), so per output channel
    this searches a weight multiplier ``k`` (weights ``k (q - z)`` in int8, scale ``s_w / k``: the
    same weight) and an int32 bias ``B`` for which ``B / k`` keeps every threshold within the
    reachable accumulator range: the same output integer for every input the kernel can get (up to
    float noise of 1e-4 output steps). Powers of two come first (``s_w / k`` is then exact in
    float32); grids stored with zero points keep ``k = 1``. A channel without such a pair takes the
    nearest ``B / k``.

    Each plan: ``node`` (name), ``exact`` (every channel), ``channels`` (exact ones, all), ``error`` (worst bias error of an inexact
    channel, ``|t - B/k| s_x s_w``, as a share of the output grid's range) and the rewrite
    (``weight``, ``scale``, ``bias``, ``multiplier``; ``weight`` None where the weight stays)."""
    import numpy as np

    graph = model.graph
    prod = {o: n for n in graph.node for o in n.output}
    by_init = {f"{n}.weight_int": m for n, m in layers.items() if m.quantized}
    integer = _runtime_integer_nodes(model)
    plans = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.name not in integer or len(node.input) < 3 or not node.input[2]:
            continue
        dq_x, dq_w = prod[node.input[0]], prod[node.input[1]]
        src = prod.get(dq_x.input[0])
        q_x = prod.get(src.input[0]) if src is not None and src.op_type == "Clip" else src
        _, consumers = _activation_chain(graph, node)
        if q_x is None or q_x.op_type != "QuantizeLinear" or len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear":
            continue
        q_y = consumers[0]
        s_x, z_x = float(_const(graph, dq_x.input[1])), int(_const(graph, dq_x.input[2]))
        s_y, z_y = float(_const(graph, q_y.input[1])), int(_const(graph, q_y.input[2]))
        (x_lo, x_hi), (y_lo, y_hi) = _q_bounds(graph, q_x), _q_bounds(graph, q_y)
        layer = by_init.get(dq_w.input[0])
        # (an 8-bit asymmetric grid whose zero points happen to be 0 is stored in uint8: not this form)
        own_grid = (layer is not None and layer.weight_int.dtype == torch.int8 and not layer.reround
                    and not layer.weight_zero_point.any())
        if own_grid:  # the zero-point-0 int8 form of _ExportLayer: its grid times any multiplier that fits
            d = (layer.q - layer.z.view([-1] + [1] * (layer.q.dim() - 1))).numpy().astype(np.float64)
            s_w = layer.s.numpy().astype(np.float32)
        else:  # stored as it is (zero points, or re-rounded): only the int32 bias is free
            w = _const(graph, dq_w.input[0]).astype(np.float64)
            zp = _const(graph, dq_w.input[2]).astype(np.float64) if len(dq_w.input) > 2 else np.zeros(1)
            d = w - np.broadcast_to(zp.reshape([-1] + [1] * (w.ndim - 1)), w.shape)
            s_w = np.broadcast_to(_const(graph, dq_w.input[1]).astype(np.float32).reshape(-1), (len(w),)).copy()
        span = np.abs(d.reshape(len(d), -1)).max(1)
        # the input's largest uint8 value (onnxruntime shifts int8 inputs by 128) bounds the exact weights
        w_max = _exact_int8_bound(x_hi + (128 if x_lo < 0 else 0))
        pow2 = [2 ** e for e in range(int(math.log2(w_max)), -1, -1)]
        t = _const(graph, node.input[2]).astype(np.float64) / (s_x * s_w.astype(np.float64))
        m = s_x * s_w.astype(np.float64) / s_y
        a_min, a_max = _accumulator_range(d, x_lo - z_x, x_hi - z_x)
        a_abs = np.maximum(np.abs(a_min), np.abs(a_max))  # the accumulator's bound at k = 1 (k scales it)
        lo, hi = _exact_bias_window(t, m, a_min, a_max, np.arange(y_lo + 1, y_hi + 1) - 0.5 - z_y)
        margin = 1e-4 / m
        k_best, b_best = np.ones(len(d)), np.round(t)
        residual, exact = np.abs(t - b_best), np.zeros(len(d), dtype=bool)
        for k in (pow2 + [k for k in range(1, w_max + 1) if k not in pow2]) if own_grid else [1]:
            allowed = k * span <= w_max if own_grid else np.ones(len(d), dtype=bool)
            near = np.round(k * t)
            b_lo, b_hi = np.ceil(k * (lo + margin)), np.ceil(k * (hi - margin)) - 1  # B / k inside the window
            # every B in the window is exact; the one nearest 0 keeps bias + accumulator furthest from int32's end
            b = np.clip(0.0, b_lo, b_hi)
            ok = allowed & ~exact & (b_lo <= b_hi) & (np.abs(b) + k * a_abs <= INT32_MAX)
            better = allowed & ~exact & ~ok & (np.abs(t - near / k) < residual) & (np.abs(near) + k * a_abs <= INT32_MAX)
            k_best, b_best = np.where(ok | better, k, k_best), np.where(ok, b, np.where(better, near, b_best))
            residual = np.where(ok, 0.0, np.where(better, np.abs(t - near / k), residual))
            exact |= ok
        scale = (s_w / k_best).astype(np.float32)
        # a channel whose bias cannot be held in int32 next to its accumulator at all: the node stays float
        fits = bool((np.abs(b_best) + k_best * a_abs <= INT32_MAX).all())
        plans.append({"node": node.name, "exact": bool(exact.all()), "fits": fits, "channels": (int(exact.sum()), len(d)),
                      "error": float((residual * m).max() / (y_hi - y_lo)),
                      "weight": (d * k_best.reshape([-1] + [1] * (d.ndim - 1))).astype(np.int8) if own_grid else None,
                      "scale": scale, "multiplier": torch.from_numpy(k_best.astype(np.int64)),
                      "bias": (b_best * (np.float32(s_x) * scale)).astype(np.float32)})
    return plans


def _apply_bias_plans(model, plans: list[dict[str, Any]], kept_float: set[str]) -> dict[str, torch.Tensor]:
    """Write ``plans`` (:func:`_bias_plans`) into ``model``; the nodes in ``kept_float`` get their bias
    as a float Add instead (:func:`_separate_bias`: onnxruntime runs them in float, exactly). Returns
    weight initializer name -> per-channel multiplier of the rewritten weights."""
    graph = model.graph
    prod = {o: n for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}
    multipliers = {}
    for plan in plans:
        node = nodes[plan["node"]]
        if plan["node"] in kept_float:
            _separate_bias(graph, node)
            continue
        dq_w = prod[node.input[1]]
        if plan["weight"] is not None:
            _set_const(graph, dq_w.input[0], plan["weight"])
            _set_const(graph, dq_w.input[1] + "_k", plan["scale"])
            dq_w.input[1] = dq_w.input[1] + "_k"
            multipliers[dq_w.input[0]] = plan["multiplier"]
        _set_const(graph, node.input[2], plan["bias"])
    return multipliers


def _run_graph(model, images: torch.Tensor, optimized: bool, batch_size: int = 32):
    """``model``'s first output on ``images`` in onnxruntime (CPU), with all graph optimizations (the
    integer kernels) or none (the graph as written)."""
    import numpy as np

    sess = _ort_session(model, "all" if optimized else "none")
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i : i + batch_size].float().numpy()})[0]
                           for i in range(0, len(images), batch_size)])


def _int32_biases(model, layers: dict[str, "_ExportLayer"], calib: torch.Tensor | None,
                  approximate: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Give every integer Conv/Gemm the int32 bias of :func:`_bias_plans`, keeping float the ones
    whose rounding moves the model's output.

    Exact plans always run as integer kernels, and so does every plan of an ``approximate`` export
    (--integer-residual / --int8-weights: integer kernels everywhere is its point, and its
    verification bounds top-1 only). Without ``calib`` every inexact one stays float, so
    the export computes the simulation. With ``calib`` (pre-normalized images) the inexact nodes are
    kept float in order of their bias error (share of the output range) until onnxruntime's output
    on those images agrees with the simulation's (the graph run as written) in every argmax and
    within ``BIAS_ROUNDING_LOGIT_TOLERANCE`` mean |logit difference| (bisection over that order:
    about log2(n) onnxruntime sessions). How much a moved output integer matters depends on the
    rest of the network (one step in an early 4-bit layer of a range-initialized MobileNetV2 changes
    the class of a third of the images), which only running it shows. Returns the multipliers for
    :func:`_to_int4` and a summary for the export report: ``integer_kernels`` (how many Convs/Gemms
    onnxruntime fuses), ``exact`` (their names where the int32 bias is exact in every channel),
    ``exact_channels`` ([exact, all] output channels of those Convs), ``rounded`` and
    ``kept_float`` (name -> bias error as a share of the output range), ``calibration_images`` and,
    when measured, ``mean_rel_logit_diff`` of the chosen form and its ``tolerance``."""
    import numpy as np

    plans = _bias_plans(model, layers)
    # a bias that int32 cannot hold beside its accumulator stays float in every form
    unfit = {p["node"] for p in plans if not p["fits"]}
    inexact = [p["node"] for p in sorted((p for p in plans if not p["exact"] and p["fits"]), key=lambda p: -p["error"])]
    summary: dict[str, Any] = {"integer_kernels": len(plans), "exact": [p["node"] for p in plans if p["exact"]],
                               "exact_channels": [sum(p["channels"][i] for p in plans) for i in (0, 1)],
                               "calibration_images": 0}
    n_float = 0 if approximate else len(inexact)
    if calib is not None and n_float:
        summary["calibration_images"] = len(calib)  # only when the logits were measured on them
        ref = _run_graph(model, calib, optimized=False)
        scale = max(float(np.abs(ref).max()), 1e-12)
        measured: dict[int, tuple[float, bool]] = {}  # nodes kept float -> (mean rel logit diff, all argmax equal)

        def passes(n: int) -> bool:
            variant = copy.deepcopy(model)
            _apply_bias_plans(variant, plans, set(inexact[:n]) | unfit)
            out = _run_graph(variant, calib, optimized=True)
            measured[n] = (float(np.abs(out - ref).mean()) / scale, bool((out.argmax(1) == ref.argmax(1)).all()))
            return measured[n][1] and measured[n][0] <= BIAS_ROUNDING_LOGIT_TOLERANCE

        # passes(lo) is false, passes(hi) true (all inexact nodes float compute the simulation)
        lo, hi = (-1, 0) if passes(0) else (0, len(inexact))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if passes(mid) else (mid, hi)
        n_float = hi
        summary["mean_rel_logit_diff"] = measured[n_float][0] if n_float in measured else None
        summary["tolerance"] = BIAS_ROUNDING_LOGIT_TOLERANCE
    by_name = {p["node"]: p for p in plans}
    kept = set(inexact[:n_float]) | unfit
    summary["kept_float"] = {n: by_name[n]["error"] for n in [*inexact[:n_float], *sorted(unfit)]}
    summary["rounded"] = {n: by_name[n]["error"] for n in inexact[n_float:]}
    return _apply_bias_plans(model, plans, kept), summary


def export_onnx(qmodel: nn.Module, input_size: tuple[int, ...], path: str | Path, opset: int = DEFAULT_OPSET,
                metadata: dict[str, str] | None = None, fuse_bias: bool = False, integer_residual: bool = False,
                calib: torch.Tensor | None = None, int8_weights: bool = False) -> dict[str, Any]:
    """Write ``qmodel`` as an ONNX QDQ graph to ``path`` (atomically) and return a summary.

    Input ``input`` is ``(batch, *input_size)`` float32 (normalized images, batch dynamic),
    output ``logits``. Weight grids of at most 4 bits are stored as INT4/UINT4 when
    ``opset >= 21`` and in INT8/UINT8 containers otherwise (the summary's ``weights`` says
    which per layer). Biases of quantized layers are float ``Add`` nodes after the
    Conv/MatMul; ``fuse_bias=True`` writes them as the Conv/Gemm bias input instead (the
    canonical QDQ form, which onnxruntime turns into QLinearConv and rounds to int32 — see
    :class:`_ExportLayer`). The summary's ``float_kernels`` maps each Conv/Gemm/MatMul the
    runtime will run in float to the reason (also stored in the file's metadata).

    The fused form also writes every activation grid in uint8 (int8 grids shifted by 128) and
    folds a Relu/ReLU6 in front of a QuantizeLinear into the integer clip after it (both exact,
    see :func:`_uint8_activations`, :func:`_fold_activation_clips`), so that a Conv between a
    signed and an unsigned grid, or behind a ReLU6, can run as QLinearConv. Integer kernels round
    biases to int32 on the step ``s_x * s_w``, which for 4-bit depthwise convolutions with large
    folded weights exceeds the output grid's step; the exporter gives each such Conv per-channel
    weight multipliers and int32 biases that reproduce the simulation's output integers, and keeps
    the Convs where some channel has none in float, unless ``calib`` (pre-normalized images) shows
    that they move the logits by less than ``BIAS_ROUNDING_LOGIT_TOLERANCE`` (:func:`_int32_biases`;
    the summary's ``int32_biases`` lists them).

    ``integer_residual=True`` (implies ``fuse_bias``) goes further than the simulated model: it
    adds 8-bit QuantizeLinear/DequantizeLinear on the activations dfquant keeps in float around
    convolutions — the residual branch outputs and residual sums, the float image input of the
    first Conv, outputs that feed pooling — with scales from ``calib`` (pre-normalized images;
    :func:`_quantize_float_activations`), so that every Conv can be an integer kernel. The
    exported function then differs from the simulation: an approximation, to be checked with
    :func:`verify_onnx` (``approximate=True``). ``int8_weights`` (another approximation) writes
    8-bit asymmetric weight grids as symmetric int8 (:class:`_ExportLayer`); the summary's
    ``reround_weights`` lists those layers.
    A module or operator ONNX cannot express raises :class:`DfqError` naming it.
    """
    _require_onnx()
    import onnx

    if integer_residual and (calib is None or len(calib) == 0):
        raise DfqError("--integer-residual needs calibration images for the scales of the added quantizers")
    if calib is not None and (calib.dim() != len(input_size) + 1 or len(calib) == 0
                              or tuple(calib.shape[1:]) != tuple(input_size)):
        raise DfqError(f"calibration images must be a non-empty batch of shape (N, {', '.join(map(str, input_size))}), "
                       f"got {tuple(calib.shape)}; pass images of the model's input size")
    fuse_bias = fuse_bias or integer_residual

    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise DfqError(f"--opset {opset} is not supported; use {MIN_OPSET}..{max_opset} "
                       f"({INT4_MIN_OPSET}+ stores 4-bit weights as INT4)")
    example = torch.zeros(2, *input_size)
    emodel = export_module(qmodel, fuse_bias, example, int8_weights)
    trace_opset = min(opset, TORCHSCRIPT_MAX_OPSET)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
            warnings.simplefilter("ignore")
            torch.onnx.export(emodel, (example,), buf, dynamo=False, opset_version=trace_opset,
                              input_names=["input"], output_names=["logits"], do_constant_folding=True,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except torch.onnx.errors.OnnxExporterError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        m = re.search(r"operator '([^']+)'", msg)
        if m:
            op = m.group(1)
            where = _locate_op(emodel, example, op)
            inside = f" (called by module {', '.join(where)})" if where else ""
            raise DfqError(f"cannot export to ONNX: operator {op}{inside} has no ONNX equivalent at opset {trace_opset}; "
                           "replace that module with supported ops, or use --format int-state") from None
        raise DfqError(f"cannot export to ONNX: {msg}") from None
    model = onnx.load_from_string(buf.getvalue())
    if opset > trace_opset:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, opset)
        except Exception as exc:  # noqa: BLE001 - converter errors are C++ exceptions of varying types
            raise DfqError(f"cannot convert the exported graph from opset {trace_opset} to {opset} ({exc}); "
                           f"pass --opset {trace_opset}") from None
    # which weights go into INT4/UINT4, and what each layer ended up as
    layers = {n: m for n, m in emodel.named_modules() if isinstance(m, _ExportLayer)}
    small = {f"{n}.weight_int": (m.q, m.z, m.multiplier) for n, m in layers.items()
             if m.quantized and opset >= INT4_MIN_OPSET and m.qrange[0] >= -8 and m.qrange[1] <= 15}
    _materialize_identities(model)
    added = _quantize_float_activations(model, calib) if integer_residual else None
    folded, biases = 0, None
    if fuse_bias:
        folded = _fold_activation_clips(model)
        _uint8_activations(model)
        multipliers, biases = _int32_biases(model, layers, calib, approximate=integer_residual or int8_weights)
        small = {k: (q, z, multipliers.get(k, m)) for k, (q, z, m) in small.items()}
    converted = _to_int4(model, small) if small else {}
    why = ("int32 bias rounding changes its output integers, "
           + ("and the logits on the calibration images" if biases and biases["calibration_images"]
              else "no calibration images to measure the logits"))
    float_kernels = _float_kernel_weights(model, dict.fromkeys((biases or {}).get("kept_float", {}), why))
    _prune_initializers(model)
    weights: dict[str, str] = {}
    for n, m in layers.items():
        if not m.quantized:
            weights[n] = "float32"
        elif f"{n}.weight_int_int4" in converted:
            weights[n] = converted[f"{n}.weight_int_int4"]
        else:
            weights[n] = str(m.weight_int.dtype).replace("torch.", "").upper()
            if m.weight_zero_point.any():
                weights[n] += " (zero points)"  # the grid's container: q - z did not fit int8
    missing = sorted(n for n in layers if f"{n}.weight_int" in small and f"{n}.weight_int_int4" not in converted)
    meta = {"producer": "dfquant", "dfquant.note": "QDQ export of a fake-quantized dfquant model",
            "dfquant.float_kernels": json.dumps(float_kernels), **(metadata or {})}
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    model.producer_name = "dfquant"
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"path": str(path), "opset": opset, "ops": ops, "weights": weights, "int4_fallback": missing,
            "fused_bias": fuse_bias, "integer_residual": added, "folded_activation_clips": folded, "int32_biases": biases,
            "reround_weights": sorted(n for n, m in layers.items() if m.quantized and m.reround),
            "float_kernels": float_kernels, "bytes": path.stat().st_size}


def _ort_session(model: Any, level: str = "all", optimized_path: str | Path | None = None):
    """The one way dfquant opens an onnxruntime session: CPU, this process's torch thread count, quiet.

    ``model`` is a path or an in-memory ModelProto; ``level`` the graph optimizations (``none``: the graph as
    written, ``extended``: the QDQ fusions that keep node names, ``all``: what deployment runs);
    ``optimized_path`` saves the graph the runtime will execute. A graph the runtime rejects is a one-line
    :class:`DfqError` that names the fix."""
    import onnxruntime as ort

    levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the "hardware specific optimizations" warning of saving NCHWc graphs
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    on_disk = isinstance(model, (str, Path))
    try:
        return ort.InferenceSession(str(model) if on_disk else model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        what = model if on_disk else "the exported graph"
        raise DfqError(f"onnxruntime {ort.__version__} cannot load {what} ({first}); export again with "
                       f"--opset {DEFAULT_OPSET} or check the runtime version") from None


@torch.no_grad()
def verify_onnx(qmodel: nn.Module, onnx_path: str | Path, images: torch.Tensor, labels: torch.Tensor,
                batch_size: int = 64, approximate: bool = False) -> dict[str, Any]:
    """Run ``onnx_path`` in a default onnxruntime CPU session (all graph optimizations) and the
    fake-quantized ``qmodel`` in PyTorch on the same pre-normalized ``images``.

    Returns ``n``, ``max_abs_diff``, ``mean_abs_diff``, ``max_abs_logit`` (scale of the
    logits), ``mean_rel_diff`` (mean |diff| / max |logit|), ``top1_torch`` / ``top1_onnx``
    (percent), ``top1_diff_points``, ``correct_torch`` / ``correct_onnx`` (images classified correctly),
    ``top1_diff_images`` (their difference), ``top1_tolerance_images`` (its bound,
    :func:`top1_tolerance_images`), ``argmax_agreement`` (percent of images with the same
    predicted class), ``disagreements`` (up to 20 images whose class differs, with the
    fake-quantized model's top-2 logit margin: near ties flip under float noise) and
    ``passed`` (:func:`verification_passed`; ``approximate`` for exports that change the function).
    """
    _require_onnx()
    sess = _ort_session(onnx_path)
    name = sess.get_inputs()[0].name
    qmodel = qmodel.eval()
    t_out, o_out = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float().contiguous()
        t_out.append(qmodel(x).float().cpu())
        o_out.append(torch.from_numpy(sess.run(None, {name: x.cpu().numpy()})[0]).float())
    t, o = torch.cat(t_out), torch.cat(o_out)
    labels = labels.cpu()
    diff = (t - o).abs()
    n = len(t)
    correct_t, correct_o = int((t.argmax(1) == labels).sum()), int((o.argmax(1) == labels).sum())
    max_logit = t.abs().max().item()
    report = {"n": n, "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
              "max_abs_logit": max_logit, "mean_rel_diff": diff.mean().item() / max(max_logit, 1e-12),
              "top1_torch": 100.0 * correct_t / n, "top1_onnx": 100.0 * correct_o / n,
              "top1_diff_points": 100.0 * abs(correct_t - correct_o) / n,
              "correct_torch": correct_t, "correct_onnx": correct_o, "top1_diff_images": abs(correct_t - correct_o),
              "top1_tolerance_images": top1_tolerance_images(n, approximate),
              "argmax_agreement": 100.0 * (t.argmax(1) == o.argmax(1)).float().mean().item()}
    top2 = t.topk(2, dim=1).values if t.shape[1] > 1 else torch.cat([t, t], 1)
    report["disagreements"] = [
        {"index": i, "label": int(labels[i]), "class_torch": int(t[i].argmax()), "class_onnx": int(o[i].argmax()),
         "torch_top2_margin": float(top2[i, 0] - top2[i, 1]), "max_abs_diff": float(diff[i].max())}
        for i in (t.argmax(1) != o.argmax(1)).nonzero().flatten().tolist()[:20]]
    report["approximate"] = approximate
    report["passed"] = verification_passed(report)
    return report


def top1_tolerance_images(n: int, approximate: bool = False) -> int:
    """How many images the numbers of correct top-1 predictions of onnxruntime and of the fake-quantized model may
    differ by on ``n`` images: ``max(1, floor(n * points / 100))``, ``points`` = ``TOP1_TOLERANCE_POINTS`` (exact
    exports) or ``APPROX_TOP1_TOLERANCE_POINTS`` (``approximate``). An integer rule: one image is allowed at any
    ``n``, two from 2,000 images at 0.1 points."""
    points = APPROX_TOP1_TOLERANCE_POINTS if approximate else TOP1_TOLERANCE_POINTS
    return max(1, math.floor(round(n * points / 100, 6)))  # round: 0.1 * 3000 / 100 is 2.9999999999999996


def verification_passed(report: dict[str, Any]) -> bool:
    """The acceptance rule of ``dfq export --verify``: the counts of correct top-1 predictions differ by at most
    :func:`top1_tolerance_images` images (``report["top1_diff_images"]``; a report without it, from before counts
    were recorded, is counted back from ``top1_diff_points``) and the mean |logit difference| is within
    ``LOGIT_MEAN_TOLERANCE`` of the largest |logit|. An approximate export (``--integer-residual`` /
    ``--int8-weights``) computes another function on purpose: only its top-1 is bounded, by
    ``APPROX_TOP1_TOLERANCE_POINTS`` in the same image count."""
    n = report["n"]
    diff = report.get("top1_diff_images")
    if diff is None:
        diff = round(report["top1_diff_points"] * n / 100)
    approximate = bool(report.get("approximate"))
    if diff > top1_tolerance_images(n, approximate):
        return False
    return approximate or report["mean_rel_diff"] <= LOGIT_MEAN_TOLERANCE


# ----------------------------------------------------------------------------------------
# what the runtime runs: optimized graph, latency, size
# ----------------------------------------------------------------------------------------
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul", "MatMulNBits")
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def _const(graph, name: str):
    """The value of ``name`` as a numpy array when it is an initializer or a Constant node's output,
    else None."""
    from onnx import numpy_helper

    init = next((t for t in graph.initializer if t.name == name), None)
    if init is not None:
        return numpy_helper.to_array(init)
    node = next((n for n in graph.node if n.op_type == "Constant" and n.output[0] == name), None)
    value = next((a.t for a in node.attribute if a.name == "value"), None) if node is not None else None
    return None if value is None else numpy_helper.to_array(value)


def _activation_chain(graph, node) -> tuple[list, list]:
    """The Relu/Clip nodes that follow ``node`` one consumer after another, and the consumers of
    the last of them (of ``node`` itself when there are none)."""
    chain: list = []
    consumers = [n for n in graph.node if node.output[0] in n.input]
    while len(consumers) == 1 and consumers[0].op_type in ("Relu", "Clip"):
        chain.append(consumers[0])
        consumers = [n for n in graph.node if consumers[0].output[0] in n.input]
    return chain, consumers


def _made_redundant_by_q(graph, act, q) -> bool:
    """Whether onnxruntime drops the Relu/Clip ``act`` in front of QuantizeLinear ``q``
    (ReluQuantFusion / ClipQuantFusion, in float32 with their epsilon): the float range of q's
    integer container, ``s (qmin - z) .. s (qmax - z)``, lies inside what ``act`` lets through."""
    import numpy as np

    scale, zp = _const(graph, q.input[1]), _const(graph, q.input[2]) if len(q.input) > 2 else None
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return False
    info = np.iinfo(zp.dtype)
    s, z = np.float32(scale.item()), int(zp.item())
    lower, upper = s * np.float32(info.min - z), s * np.float32(info.max - z)
    if act.op_type == "Relu":
        return bool(lower >= 0)
    lo, hi = (_const(graph, act.input[k]) if len(act.input) > k and act.input[k] else np.float32(b)
              for k, b in ((1, -np.inf), (2, np.inf)))
    if lo is None or hi is None:
        return False
    eps = np.finfo(np.float32).eps
    return bool(np.float32(lo) - lower <= eps and upper - np.float32(hi) <= eps)


def _float_reason(graph, node) -> str | None:
    """Why onnxruntime runs the exported Conv/Gemm/MatMul ``node`` in float, or None when it
    matches the QDQ pattern its CPU optimizer turns into an integer kernel: DequantizeLinear on
    input and weight, the bias as the node's input, and a QuantizeLinear of the input's integer
    type as the only consumer of the output, possibly behind one Relu/Clip that the
    QuantizeLinear makes redundant (:func:`_made_redundant_by_q`; onnxruntime removes it).
    The exporter asks onnxruntime which nodes it fuses (:func:`_runtime_integer_nodes`); this
    function only explains the ones it did not."""
    prod = {o: n for n in graph.node for o in n.output}
    kinds = [prod[i].op_type if i in prod else "initializer" for i in node.input[:2]]
    if kinds[0] == "Where":
        return "input on RepQ-ViT's log-sqrt2 softmax grid (not uniform: no QDQ form, no integer MatMul)"
    if kinds[0] != "DequantizeLinear":
        return "input not quantized (float activations)"
    if len(kinds) > 1 and kinds[1] != "DequantizeLinear":
        return f"weight not quantized, or not directly DequantizeLinear (comes from {kinds[1]})"
    chain, consumers = _activation_chain(graph, node)
    if not consumers:
        return "output is a model output (float logits)"
    if [c.op_type for c in consumers] != ["QuantizeLinear"]:
        if node.op_type in ("Conv", "Gemm") and len(node.input) < 3 and {c.op_type for c in consumers} == {"Add"}:
            return "bias is a separate float Add (export with fuse_bias)"
        return f"output not quantized (feeds {', '.join(sorted({c.op_type for c in consumers}))} in float)"
    kept = [a.op_type for a in chain if not _made_redundant_by_q(graph, a, consumers[0])]
    if kept:
        return (f"{'/'.join(kept)} before QuantizeLinear cuts the quantizer's range (e.g. ReLU6 in front of a grid "
                "reaching past 6), so onnxruntime keeps it")
    zps = [_const(graph, n.input[2]) if len(n.input) > 2 else None for n in (prod[node.input[0]], consumers[0])]
    if all(z is not None for z in zps) and zps[0].dtype != zps[1].dtype:
        return f"input {zps[0].dtype} and output {zps[1].dtype} activations (integer kernels take one type for both)"
    return None


def _runtime_requantizes_float_weight(graph, node) -> bool:
    """Whether onnxruntime's WeightBiasQuantization would re-quantize a float weight of ``node``.

    It gives a Conv/Gemm whose input is a per-tensor DequantizeLinear and whose output reaches a
    QuantizeLinear through Relu/Clip nodes only a weight quantized *per tensor* to int8 (and an
    int32 bias), whether or not an integer kernel results. For dfquant's per-channel grids that
    puts every channel on the largest channel's grid and erases small channels (BN-folded
    depthwise convolutions of MobileNetV2 lost all their signal), so such a node must keep
    dfquant's DequantizeLinear weight even when it runs in float.
    """
    prod = {o: n for n in graph.node for o in n.output}
    first = prod.get(node.input[0])
    if node.op_type not in ("Conv", "Gemm") or first is None or first.op_type != "DequantizeLinear":
        return False
    _, consumers = _activation_chain(graph, node)
    return [c.op_type for c in consumers] == ["QuantizeLinear"]


def _runtime_integer_nodes(model) -> set[str]:
    """Names of the Conv/Gemm/MatMul nodes of ``model`` that onnxruntime (CPU, this machine) turns
    into integer kernels. Its QDQ fusions keep the target node's name up to the extended
    optimization level (the layout passes of the full level rename nodes)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        _ort_session(model, "extended", Path(tmp) / "optimized.onnx")
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"))
    return {n.name for n in optimized.graph.node if n.op_type in INTEGER_KERNELS}


def _float_kernel_weights(model, kept_float: dict[str, str] | None = None) -> dict[str, str]:
    """Give every Conv/Gemm/MatMul that the runtime will run in float (:func:`_runtime_integer_nodes`)
    its weight dequantized by ``Cast -> (Sub) -> Mul`` instead of DequantizeLinear; returns node
    name -> reason (:func:`_float_reason`, or ``kept_float``'s for the nodes the exporter kept float on
    purpose: their bias is a separate float Add, handled as below).

    onnxruntime keeps a DequantizeLinear of a constant as it is (for its QDQ fusions), so a float
    Conv behind one re-dequantizes its weight on every run and cannot pre-pack it or use its
    blocked (NCHWc) float kernels. Plain Cast/Sub/Mul on constants are folded once at load into
    a float32 weight, identical to what DequantizeLinear computes, and the file keeps the integers.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    prod = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    integer = _runtime_integer_nodes(model)
    kept_float = kept_float or {}
    swap: dict[str, list] = {}
    reasons: dict[str, str] = {}
    for node in list(graph.node):  # _separate_bias inserts nodes
        if node.op_type not in ("Conv", "Gemm", "MatMul") or (node.name and node.name in integer):
            continue
        why = kept_float.get(node.name) or _float_reason(graph, node) or "onnxruntime does not fuse it into an integer kernel"
        reasons[node.name] = why
        if why.startswith("bias") or node.name in kept_float:
            # onnxruntime folds a constant bias Add into a Conv with a constant weight, which would
            # complete the QDQ pattern around a float weight; it then re-quantizes that weight on
            # a grid of its own choosing. Kept behind DequantizeLinear, the weight stays dfquant's.
            continue
        if _runtime_requantizes_float_weight(graph, node):
            # a float weight here would be re-quantized per tensor, and a bias input rounded to
            # int32 (step s_x s_w: coarser than the next activation grid for depthwise convs with
            # large folded weights) although the node runs in float: the weight stays behind
            # DequantizeLinear and the bias becomes a separate float Add, which is exact
            if len(node.input) > 2 and node.input[2]:
                _separate_bias(graph, node)
            continue
        dq = prod.get(node.input[1]) if len(node.input) > 1 else None
        weight = inits.get(dq.input[0]) or inits.get(dq.input[0].replace("_from_int4", "_int4")) if dq else None
        if dq is None or dq.op_type != "DequantizeLinear" or weight is None:
            continue  # not a constant weight (e.g. the key of an attention MatMul)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        zp = numpy_helper.to_array(inits[dq.input[2]]).astype("float32") if len(dq.input) > 2 else scale * 0
        shape = [-1] + [1] * (len(weight.dims) - 1) if scale.ndim == 1 else []
        out, base = dq.output[0], dq.output[0] + "_float"
        graph.initializer.append(numpy_helper.from_array(scale.reshape(shape), base + "_scale"))
        nodes = [helper.make_node("Cast", [dq.input[0]], [base + "_q"], to=TensorProto.FLOAT)]
        if zp.any():
            graph.initializer.append(numpy_helper.from_array(zp.reshape(shape), base + "_zero_point"))
            nodes.append(helper.make_node("Sub", [base + "_q", base + "_zero_point"], [base + "_d"]))
        nodes.append(helper.make_node("Mul", [nodes[-1].output[0], base + "_scale"], [out]))
        swap[dq.name or out] = nodes
    kept = []
    for n in graph.node:
        kept += swap.get(n.name or n.output[0], [n]) if n.op_type == "DequantizeLinear" else [n]
    del graph.node[:]
    graph.node.extend(kept)
    return reasons


def runtime_graph(onnx_path: str | Path) -> dict[str, Any]:
    """The graph onnxruntime actually runs (CPU, all optimizations), saved through
    ``SessionOptions.optimized_model_filepath``: ``ops`` (op type -> count), ``integer`` /
    ``float`` (counts of integer vs float Conv/Gemm/MatMul kernels, :data:`INTEGER_KERNELS` /
    :data:`FLOAT_KERNELS`; the runtime renames what it rewrites, e.g. into blocked NCHWc
    convolutions) and ``float_nodes`` (exported node name -> why it stays float, as the exporter
    recorded it in the metadata: :func:`_float_reason`)."""
    _require_onnx()
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        _ort_session(onnx_path, "all", Path(tmp) / "optimized.onnx")
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"))
    exported = onnx.load(str(onnx_path), load_external_data=False)
    reasons = json.loads({p.key: p.value for p in exported.metadata_props}.get("dfquant.float_kernels", "{}"))
    ops: dict[str, int] = {}
    for node in optimized.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    n_float = sum(ops.get(k, 0) for k in FLOAT_KERNELS)
    return {"ops": dict(sorted(ops.items())), "integer": sum(ops.get(k, 0) for k in INTEGER_KERNELS),
            "float": n_float, "float_nodes": reasons}


def measure_latency(paths: dict[str, str | Path], input_size: tuple[int, ...], batch_sizes: tuple[int, ...] = (1, 32),
                    runs: int = 20, warmup: int = 2) -> dict[int, dict[str, dict[str, float]]]:
    """onnxruntime CPU latency of each model in ``paths`` (label -> file), per batch size.

    The models run interleaved in one process (each round times every model once, in an order
    that rotates per round), so load from other processes on a shared machine hits all of them
    alike. Per batch and label: ``median_ms`` over ``runs`` rounds and ``ratio``, the first
    label's median divided by this label's (speed-up over the reference, measured in the same run).
    """
    import numpy as np

    if runs < 1:
        raise DfqError(f"runs {runs} must be at least 1")
    sessions = {k: _ort_session(p) for k, p in paths.items()}
    labels = list(sessions)
    rng = np.random.default_rng(0)
    out: dict[int, dict[str, dict[str, float]]] = {}
    for b in batch_sizes:
        x = rng.standard_normal((b, *input_size), dtype=np.float32)
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
        for k in labels:
            for _ in range(warmup):
                sessions[k].run(None, feeds[k])
        times: dict[str, list[float]] = {k: [] for k in labels}
        for r in range(runs):
            for k in labels[r % len(labels):] + labels[: r % len(labels)]:
                t0 = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times[k].append(1e3 * (time.perf_counter() - t0))
        med = {k: float(np.median(v)) for k, v in times.items()}
        out[b] = {k: {"median_ms": med[k], "ratio": med[labels[0]] / med[k]} for k in labels}
    return out


def deployment_gain(fp_model: nn.Module, onnx_path: str | Path, input_size: tuple[int, ...],
                    batch_sizes: tuple[int, ...] = (1, 32), runs: int = 10) -> dict[str, Any]:
    """What the export at ``onnx_path`` buys over running ``fp_model`` (same architecture, float32)
    in onnxruntime: ``size_ratio`` (FP32 file bytes / export bytes), ``latency``
    (:func:`measure_latency`, FP32 first, so ``ratio`` is the speed-up) and ``runtime_graph``
    (:func:`runtime_graph` of the export)."""
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = Path(tmp) / "fp32.onnx"
        export_onnx(fp_model, input_size, fp_path)
        fp_bytes = fp_path.stat().st_size
        latency = measure_latency({"fp32": fp_path, "quantized": onnx_path}, input_size, batch_sizes, runs)
    q_bytes = Path(onnx_path).stat().st_size
    return {"fp32_bytes": fp_bytes, "bytes": q_bytes, "size_ratio": fp_bytes / q_bytes, "runs": runs,
            "latency": {str(b): v for b, v in latency.items()}, "runtime_graph": runtime_graph(onnx_path)}


# ----------------------------------------------------------------------------------------
# integer state dict
# ----------------------------------------------------------------------------------------
def export_int_state(qmodel: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write integer weights, quantizer parameters and the remaining float tensors as safetensors.

    Keys use the module names of the original float model (dfquant's wrapper hops
    ``.layer``, ``.block`` and ``.attn`` removed; BN-folded models have no BN tensors and
    carry the folded bias):

    * quantized Conv2d/Linear ``P``:
      ``P.weight_int`` — the integer weight q, int8 for signed grids (symmetric, ternary)
      and uint8 for unsigned/asymmetric ones (b-bit grids sit in the 8-bit container);
      ``P.weight_scale`` float32 ``[C_out]`` (``[1]`` if per-tensor);
      ``P.weight_zero_point`` int32, same shape; ``P.weight_bits`` float32 scalar (1.58 =
      ternary); ``P.weight_qrange`` int32 ``[qmin, qmax]``. The float weight is
      ``(weight_int - weight_zero_point) * weight_scale`` along axis 0.
      ``P.bias`` float32 if the layer has one. A layer whose weight quantizer is disabled
      keeps ``P.weight`` in float32.
    * activation quantizer ``A`` (``P.aq`` = input of layer ``P``; ``B.aq`` = input of
      residual block ``B``, shared by its identity branch; ``...attn.q_q``/``k_q``/``v_q`` in
      ViTs): ``A.act_scale`` float32 ``[1]``, ``A.act_zero_point`` int32 ``[1]``,
      ``A.act_bits`` float32 scalar, ``A.act_qrange`` int32 ``[qmin, qmax]``; the quantized
      value is ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``. Disabled quantizers are absent.
    * log-sqrt2 softmax quantizer ``A``: ``A.logsqrt2_scale`` float32 ``[1]``, ``A.logsqrt2_bits``.
    * every other tensor of the model (BatchNorm affine and running stats, LayerNorm,
      embeddings, ...) under its original name, float32.

    The safetensors metadata holds ``format`` = ``dfquant-int-state/1``, ``layers`` and
    ``activations`` (JSON summaries) and whatever ``metadata`` adds.
    """
    _check_supported(qmodel)
    clean = clean_names(qmodel)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    acts: dict[str, dict] = {}
    skip_prefixes: list[str] = []   # qmodel module names whose tensors are exported in integer form
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer):
            P = clean[name]
            skip_prefixes += [f"{name}.wq.", f"{name}.soft."]
            if m.wq.enabled:
                iw = integer_weight(m, name)
                dtype = _container(*iw["qrange"])
                tensors[_key(P, "weight_int")] = iw["q"].to(dtype)
                tensors[_key(P, "weight_scale")] = iw["scale"]
                tensors[_key(P, "weight_zero_point")] = iw["zero_point"].to(torch.int32)
                tensors[_key(P, "weight_bits")] = torch.tensor(float(iw["bits"]))
                tensors[_key(P, "weight_qrange")] = torch.tensor(iw["qrange"], dtype=torch.int32)
                skip_prefixes.append(f"{name}.layer.weight")
                layers[P] = {"type": type(m.layer).__name__, "bits": iw["bits"], "qrange": list(iw["qrange"]),
                             "axis": iw["axis"], "dtype": str(dtype).replace("torch.", "")}
            else:
                layers[P] = {"type": type(m.layer).__name__, "bits": None}
        elif isinstance(m, UniformQuantizer) and not any(f"{name}.".startswith(p) for p in skip_prefixes):
            skip_prefixes.append(f"{name}.")
            if not m.enabled:
                continue
            p = _act_params(m, name)
            A = clean[name]
            tensors[_key(A, "act_scale")] = p["scale"]
            tensors[_key(A, "act_zero_point")] = p["zero_point"].to(torch.int32)
            tensors[_key(A, "act_bits")] = torch.tensor(float(p["bits"]))
            tensors[_key(A, "act_qrange")] = torch.tensor(p["qrange"], dtype=torch.int32)
            acts[A] = {"bits": p["bits"], "qrange": list(p["qrange"]), "zero_point": int(p["zero_point"].item())}
        elif isinstance(m, LogSqrt2Quantizer):
            skip_prefixes.append(f"{name}.")
            if not m.enabled:
                continue
            A = clean[name]
            tensors[_key(A, "logsqrt2_scale")] = m.scale.detach().float().flatten().clone()
            tensors[_key(A, "logsqrt2_bits")] = torch.tensor(float(m.bits))
            acts[A] = {"bits": m.bits, "kind": "log-sqrt2"}
    for key, value in qmodel.state_dict().items():
        if any(key.startswith(p) or key == p for p in skip_prefixes):
            continue
        mod, _, leaf = key.rpartition(".")
        out_key = _key(clean.get(mod, mod), leaf)
        if out_key in tensors:
            raise DfqError(f"int-state key clash on {out_key}; rename the module")
        tensors[out_key] = value.detach().clone()
    meta = {"format": "dfquant-int-state/1", "layers": json.dumps(layers), "activations": json.dumps(acts),
            **{str(k): str(v) for k, v in (metadata or {}).items()}}
    save_tensors(path, tensors, metadata=meta)
    return {"path": str(path), "layers": len(layers), "activation_quantizers": len(acts), "tensors": len(tensors),
            "bytes": Path(path).stat().st_size}


# ----------------------------------------------------------------------------------------
# dfq export
# ----------------------------------------------------------------------------------------
FORMATS = {"onnx": ".onnx", "int-state": ".safetensors"}


def more_images(n: int, set_size: int | None = None) -> int | None:
    """The image count to advise after a verification on ``n`` images failed: ``max(1000, 2 n)``, capped by
    ``set_size`` (the test set's size, when known); None when no larger count exists."""
    more = max(1000, 2 * n)
    if set_size is not None:
        more = min(more, set_size)
    return more if more > n else None


def verification_error(report: dict[str, Any], limit_name: str | None = None,
                       set_size: int | None = None) -> DfqError | None:
    """The error ``dfq export`` exits with when the verification in ``report`` failed, else None.

    Its advice to verify on more images names the knob that sets the image count as the caller calls it
    (``limit_name``: ``dfq export`` passes ``--eval-limit``) and a count larger than the one used
    (:func:`more_images`, capped by ``set_size`` when the test set's size is known). Either defaults to what the
    report's ``verify_limit`` (``{"name", "set_size"}``, written by the caller that made the report) says, else
    ``eval_limit`` and unknown. A report whose ``kept`` is false says the export was not kept."""
    v = report.get("verify")
    if v is None or v["passed"]:
        return None
    recorded = report.get("verify_limit") or {}
    limit_name = limit_name or recorded.get("name") or "eval_limit"
    set_size = set_size if set_size is not None else recorded.get("set_size")
    n = v["n"]
    not_kept = (f" The export was not kept ({report.get('output', 'the output')} was not written)."
                if report.get("kept") is False else "")
    tol = v.get("top1_tolerance_images", top1_tolerance_images(n, bool(v.get("approximate"))))
    counts = (f", {v['correct_onnx']} vs {v['correct_torch']} images correct" if "correct_onnx" in v else "")
    if v.get("approximate"):
        return DfqError(
            f"the approximate export (--integer-residual / --int8-weights) moves top-1 from {v['top1_torch']:.2f}% to "
            f"{v['top1_onnx']:.2f}% on {n} images{counts} (tolerance {tol} image(s): max(1, "
            f"{APPROX_TOP1_TOLERANCE_POINTS:g}% of {n}); argmax agreement {v['argmax_agreement']:.1f}%); "
            f"export without those options for the simulated model's accuracy.{not_kept}")
    flips = v["disagreements"]
    near_tie = (f"{len(flips)} image(s) changed class, with top-2 logit margins up to "
                f"{max(d['torch_top2_margin'] for d in flips):.3g} in the fake-quantized model. ") if flips else ""
    rounded = (report["export"].get("int32_biases") or {}).get("rounded") or {}
    bias = (f"{len(rounded)} integer kernel(s) round their int32 bias inexactly (measured harmless on calibration "
            "images); export without --fuse-bias. " if report["export"].get("fused_bias") and rounded else "")
    more = more_images(n, set_size)
    advice = (f"verify on more images ({limit_name} {more})" if more is not None
              else f"the {n} images are the whole test set")
    return DfqError(
        f"onnxruntime disagrees with the fake-quantized model on {n} images: top-1 {v['top1_onnx']:.2f}% vs "
        f"{v['top1_torch']:.2f}%{counts} (tolerance {tol} image(s): max(1, {TOP1_TOLERANCE_POINTS:g}% of {n})), "
        f"mean |logit diff| {100 * v['mean_rel_diff']:.3f}% of the largest logit (tolerance "
        f"{100 * LOGIT_MEAN_TOLERANCE:g}%). {near_tie}{bias}"
        f"One image is {100 / n:.2f} points at {limit_name} {n}: if near ties flipped, {advice}; otherwise report the "
        f"model with {report['report_path']}.{not_kept}")
