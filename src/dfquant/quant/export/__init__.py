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
  elementwise ops (Div, Clip, Log, Round, Pow, Where). A model quantized for a deployment target
  (:mod:`dfquant.quant.target`) keeps none of that in float around its convolutions: its export
  is the integer form without options, onnxruntime computes the simulation bit for bit, and the
  summary's ``exact`` / ``inexact`` say so, or what keeps it from it.
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


The package is split by stage, lowest first (no module imports one listed after it):

* ``onnx_graph`` — opset limits and the ONNX graph helpers every stage uses (consumers, constants,
  Q/DQ clip ranges, the onnxruntime session);
* ``qdq`` — the torch side: the integer view of the quantizers and the export-friendly modules
  that torch's TorchScript exporter traces into Q/DQ nodes (:func:`export_module`);
* ``onnx_passes`` — graph rewrites after tracing (shared initializers, INT4 packing, uint8
  activations, folded clips, added activation quantizers);
* ``kernels`` — what onnxruntime runs as integer or float kernels (:func:`runtime_graph`);
* ``int32_bias`` — int32 biases of integer kernels that reproduce the simulation's integers;
* ``onnx`` — :func:`export_onnx`, the trace followed by an ordered list of passes (``PASSES``);
* ``verify`` — onnxruntime next to the fake-quantized model, acceptance bounds, latency and size;
* ``int_state`` — the integer safetensors state dict.
"""

from __future__ import annotations

from dfquant.quant.export.int32_bias import BIAS_ROUNDING_LOGIT_TOLERANCE
from dfquant.quant.export.int_state import export_int_state
from dfquant.quant.export.kernels import runtime_graph
from dfquant.quant.export.onnx import PASSES, export_onnx
from dfquant.quant.export.onnx_graph import (DEFAULT_OPSET, FLOAT_KERNELS, INT4_MIN_OPSET, INTEGER_KERNELS, MIN_OPSET,
                                             TORCHSCRIPT_MAX_OPSET)
from dfquant.quant.export.qdq import INT32_MAX, clean_names, export_module, integer_weight
from dfquant.quant.export.verify import (APPROX_TOP1_TOLERANCE_POINTS, LOGIT_MEAN_TOLERANCE, TOP1_TOLERANCE_POINTS,
                                         cpu_flags, cpu_integer_support, deployment_gain, measure_latency, more_images,
                                         top1_tolerance_images, verification_error, verification_passed, verify_onnx)

__all__ = ["APPROX_TOP1_TOLERANCE_POINTS", "BIAS_ROUNDING_LOGIT_TOLERANCE", "DEFAULT_OPSET", "FLOAT_KERNELS", "FORMATS",
           "INT32_MAX", "INT4_MIN_OPSET", "INTEGER_KERNELS", "LOGIT_MEAN_TOLERANCE", "MIN_OPSET", "PASSES",
           "TOP1_TOLERANCE_POINTS", "TORCHSCRIPT_MAX_OPSET", "clean_names", "cpu_flags", "cpu_integer_support",
           "deployment_gain", "export_int_state", "export_module", "export_onnx", "integer_weight", "measure_latency",
           "more_images", "runtime_graph", "top1_tolerance_images", "verification_error", "verification_passed",
           "verify_onnx"]


# ----------------------------------------------------------------------------------------
# dfq export
# ----------------------------------------------------------------------------------------
FORMATS = {"onnx": ".onnx", "int-state": ".safetensors"}
