"""ONNX export, the orchestrator: :func:`export_onnx` as an ordered list of passes.

:data:`PASSES` lists the stages in order (check options, lower the torch modules, trace, convert
the opset, the graph rewrites of :mod:`~dfquant.quant.export.onnx_passes`, int32 biases, INT4
packing, float kernels, metadata, check, save); each pass is a small function of the shared
:class:`OnnxExport` that reads its options, so a new backend or target can add, drop or reorder
passes without touching the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.io import atomic_path
from dfquant.quant.export.int32_bias import _int32_biases
from dfquant.quant.export.kernels import _float_kernel_weights, _float_requantizations, _saturating_kernels
from dfquant.quant.export.onnx_graph import (DEFAULT_OPSET, INT4_MIN_OPSET, MIN_OPSET, TORCHSCRIPT_MAX_OPSET,
                                             _require_onnx)
from dfquant.quant.export.onnx_passes import (_fold_activation_clips, _materialize_identities, _prune_initializers,
                                              _quantize_before_reshapes, _quantize_float_activations, _to_int4,
                                              _uint8_activations)
from dfquant.quant.export.qdq import _ExportLayer, export_module


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


@dataclasses.dataclass
class OnnxExport:
    """What the passes of :func:`export_onnx` share: its options (``fuse_bias`` is turned on by
    ``integer_residual`` in :func:`check_options`) and what each pass has produced so far."""

    qmodel: nn.Module
    input_size: tuple[int, ...]
    path: str | Path
    opset: int
    metadata: dict[str, str] | None
    fuse_bias: bool
    integer_residual: bool
    calib: torch.Tensor | None
    int8_weights: bool
    example: torch.Tensor | None = None
    target: str | None = None  # the deployment target the model was quantized for (its plan's)
    emodel: nn.Module | None = None  # the export-friendly copy of qmodel (export_module)
    trace_opset: int = 0
    model: Any = None  # the onnx ModelProto the graph passes rewrite
    layers: dict[str, _ExportLayer] = dataclasses.field(default_factory=dict)
    small: dict[str, tuple] = dataclasses.field(default_factory=dict)  # weights that go into INT4/UINT4
    added: dict[str, Any] | None = None
    folded: int = 0
    biases: dict[str, Any] | None = None
    converted: dict[str, str] = dataclasses.field(default_factory=dict)
    float_kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    weights: dict[str, str] = dataclasses.field(default_factory=dict)
    missing: list[str] = dataclasses.field(default_factory=list)
    inexact: dict[str, str] | None = None  # a target's model: kernels that do not compute the simulation (check_exact)

    def summary(self) -> dict[str, Any]:
        """The dictionary :func:`export_onnx` returns."""
        ops: dict[str, int] = {}
        for node in self.model.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        layers = self.layers
        exact = {} if self.inexact is None else {"exact": not self.inexact, "inexact": self.inexact}
        return {"path": str(self.path), "target": self.target, **exact, "opset": self.opset, "ops": ops, "weights": self.weights,
                "int4_fallback": self.missing, "fused_bias": self.fuse_bias, "integer_residual": self.added,
                "folded_activation_clips": self.folded, "int32_biases": self.biases,
                "reround_weights": sorted(n for n, m in layers.items() if m.quantized and m.reround),
                "float_kernels": self.float_kernels, "bytes": Path(self.path).stat().st_size}


def require_onnx(ctx: OnnxExport) -> None:
    _require_onnx()


def check_options(ctx: OnnxExport) -> None:
    """Refuse inconsistent calibration images and opsets; ``integer_residual`` implies ``fuse_bias``."""
    import onnx

    calib, input_size, opset = ctx.calib, ctx.input_size, ctx.opset
    if ctx.integer_residual and (calib is None or len(calib) == 0):
        raise DfqError("integer_residual=True needs calibration images (calib=) for the scales of the added quantizers",
                       params=("integer_residual",))
    if calib is not None and (calib.dim() != len(input_size) + 1 or len(calib) == 0
                              or tuple(calib.shape[1:]) != tuple(input_size)):
        raise DfqError(f"calibration images must be a non-empty batch of shape (N, {', '.join(map(str, input_size))}), "
                       f"got {tuple(calib.shape)}; pass images of the model's input size")
    ctx.target = getattr(getattr(ctx.qmodel, "dfq_plan", None), "target", None)
    if ctx.target is not None and ctx.integer_residual:
        raise DfqError(f"the model was quantized for target {ctx.target!r}: its export is already integer where the "
                       "runtime can be; drop integer_residual", params=("integer_residual",))
    # a target's model is simulated as the integer kernels compute it: its export fuses every bias
    ctx.fuse_bias = ctx.fuse_bias or ctx.integer_residual or ctx.target is not None

    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise DfqError(f"opset={opset} is not supported; use {MIN_OPSET}..{max_opset} "
                       f"({INT4_MIN_OPSET}+ stores 4-bit weights as INT4)", params=("opset",))


def lower_modules(ctx: OnnxExport) -> None:
    """The export-friendly copy of the model (:func:`export_module`)."""
    ctx.example = torch.zeros(2, *ctx.input_size)
    ctx.emodel = export_module(ctx.qmodel, ctx.fuse_bias, ctx.example, ctx.int8_weights)


def trace(ctx: OnnxExport) -> None:
    """Trace with torch's TorchScript exporter at ``min(opset, 20)``; an operator without ONNX form is named."""
    import onnx

    emodel, example = ctx.emodel, ctx.example
    trace_opset = ctx.trace_opset = min(ctx.opset, TORCHSCRIPT_MAX_OPSET)
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
                           "replace that module with supported ops, or use format=int-state", params=("format",)) from None
        raise DfqError(f"cannot export to ONNX: {msg}") from None
    ctx.model = onnx.load_from_string(buf.getvalue())


def convert_opset(ctx: OnnxExport) -> None:
    """Opsets above what the tracer writes are reached with ``onnx.version_converter``."""
    opset, trace_opset = ctx.opset, ctx.trace_opset
    if opset > trace_opset:
        from onnx import version_converter

        try:
            ctx.model = version_converter.convert_version(ctx.model, opset)
        except Exception as exc:  # noqa: BLE001 - converter errors are C++ exceptions of varying types
            raise DfqError(f"cannot convert the exported graph from opset {trace_opset} to {opset} ({exc}); "
                           f"pass opset={trace_opset}", params=("opset",)) from None


def plan_int4(ctx: OnnxExport) -> None:
    """Which weights go into INT4/UINT4, and what each layer ended up as."""
    opset = ctx.opset
    ctx.layers = layers = {n: m for n, m in ctx.emodel.named_modules() if isinstance(m, _ExportLayer)}
    ctx.small = {f"{n}.weight_int": (m.q, m.z, m.multiplier) for n, m in layers.items()
                 if m.quantized and opset >= INT4_MIN_OPSET and m.qrange[0] >= -8 and m.qrange[1] <= 15}


def materialize_identities(ctx: OnnxExport) -> None:
    _materialize_identities(ctx.model)


def quantize_before_reshapes(ctx: OnnxExport) -> None:
    """A target's model: QuantizeLinear before Flatten, so a global average pooling runs as the integer kernel the
    simulation computes (:func:`_quantize_before_reshapes`)."""
    if ctx.target is not None:
        _quantize_before_reshapes(ctx.model)


def quantize_float_activations(ctx: OnnxExport) -> None:
    """``integer_residual``: 8-bit Q/DQ on the float activations around convolutions."""
    ctx.added = _quantize_float_activations(ctx.model, ctx.calib) if ctx.integer_residual else None


def fold_activation_clips(ctx: OnnxExport) -> None:
    if ctx.fuse_bias:
        ctx.folded = _fold_activation_clips(ctx.model)


def uint8_activations(ctx: OnnxExport) -> None:
    if ctx.fuse_bias:
        _uint8_activations(ctx.model)


def int32_biases(ctx: OnnxExport) -> None:
    """``fuse_bias``: int32 biases and per-channel weight multipliers of the integer kernels."""
    if ctx.fuse_bias:
        multipliers, ctx.biases = _int32_biases(ctx.model, ctx.layers, ctx.calib,
                                                approximate=ctx.integer_residual or ctx.int8_weights,
                                                on_grid=ctx.target is not None)
        ctx.small = {k: (q, z, multipliers.get(k, m)) for k, (q, z, m) in ctx.small.items()}


def to_int4(ctx: OnnxExport) -> None:
    ctx.converted = _to_int4(ctx.model, ctx.small) if ctx.small else {}


def float_kernels(ctx: OnnxExport) -> None:
    """Dequantize the weights of the kernels the runtime runs in float, and say why each is float."""
    biases = ctx.biases
    why = ("int32 bias rounding changes its output integers, "
           + ("and the logits on the calibration images" if biases and biases["calibration_images"]
              else "no calibration images to measure the logits"))
    ctx.float_kernels = _float_kernel_weights(ctx.model, dict.fromkeys((biases or {}).get("kept_float", {}), why))


def check_exact(ctx: OnnxExport) -> None:
    """A target's model: which nodes keep onnxruntime from computing the simulation bit for bit (``inexact``):
    a Conv/Gemm/MatMul in float other than the classifier (float sums in another order), an int32 bias off the
    simulation's grid, int8 weights that saturate on AVX2 (:func:`_saturating_kernels`), a quantizer of a value
    computed by float ops (a ViT's LayerNorm, softmax, GELU: :func:`_float_requantizations`)."""
    if ctx.target is None:
        return
    inexact = {n: f"runs in float ({why})" for n, why in ctx.float_kernels.items() if "model output" not in why}
    for n in (ctx.biases or {}).get("rounded", {}):
        inexact[n] = "int32 bias off the simulation's grid"
    inexact.update(_saturating_kernels(ctx.model, ctx.float_kernels))
    inexact.update(_float_requantizations(ctx.model))
    ctx.inexact = inexact


def prune_initializers(ctx: OnnxExport) -> None:
    _prune_initializers(ctx.model)


def describe_weights(ctx: OnnxExport) -> None:
    """The storage of each layer's weight for the summary, and the 4-bit grids left in 8-bit containers."""
    layers, converted = ctx.layers, ctx.converted
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
    ctx.weights = weights
    ctx.missing = sorted(n for n in layers if f"{n}.weight_int" in ctx.small and f"{n}.weight_int_int4" not in converted)


def add_metadata(ctx: OnnxExport) -> None:
    model = ctx.model
    meta = {"producer": "dfquant", "dfquant.note": "QDQ export of a fake-quantized dfquant model",
            "dfquant.float_kernels": json.dumps(ctx.float_kernels), **(ctx.metadata or {})}
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    model.producer_name = "dfquant"


def check_model(ctx: OnnxExport) -> None:
    import onnx

    onnx.checker.check_model(ctx.model, full_check=True)


def save(ctx: OnnxExport) -> None:
    import onnx

    ctx.path = Path(ctx.path)
    with atomic_path(ctx.path) as tmp:
        onnx.save(ctx.model, str(tmp))


# The stages of export_onnx, in order: each takes the shared OnnxExport and reads its options.
# A backend or target with other needs builds its own list from these (inserting, dropping or
# reordering passes) and runs it the way export_onnx does.
PASSES: tuple[Callable[[OnnxExport], None], ...] = (
    require_onnx, check_options, lower_modules, trace, convert_opset, plan_int4, materialize_identities,
    quantize_before_reshapes, quantize_float_activations, fold_activation_clips, uint8_activations, int32_biases,
    to_int4, float_kernels, check_exact, prune_initializers, describe_weights, add_metadata, check_model, save)


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
    A model quantized for a deployment target (``quantize(..., quant={"target": "onnxruntime"})``) takes no
    options: its export is the integer form, and its simulation computes what those kernels compute. Its summary
    adds ``exact`` (True when onnxruntime's logits equal the simulation's up to the classifier's float Gemm) and
    ``inexact`` (node -> why not: a kernel left in float, an int32 bias off the grid, int8 weights that saturate
    on AVX2, e.g. in a checkpoint quantized before the target limited them; :func:`check_exact`).
    A module or operator ONNX cannot express raises :class:`DfqError` naming it.
    """
    ctx = OnnxExport(qmodel, input_size, path, opset, metadata, fuse_bias, integer_residual, calib,
                     int8_weights)
    for step in PASSES:
        step(ctx)
    return ctx.summary()
