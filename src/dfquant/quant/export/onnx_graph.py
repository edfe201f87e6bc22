"""ONNX export, bottom layer: opset limits and the graph helpers every stage uses.

Finding consumers, reading and replacing constants, the integer range of a QuantizeLinear (with
the Clip after it), splitting a fused bias off a Conv/Gemm, and the one way dfquant opens an
onnxruntime session. Every other module of :mod:`dfquant.quant.export` may import this one and
it imports none of them, so the package has no import circle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfquant.errors import DfqError


DEFAULT_OPSET = 21          # first opset with INT4/UINT4 (4-bit weights stored packed)
MIN_OPSET = 13              # per-axis QuantizeLinear/DequantizeLinear
TORCHSCRIPT_MAX_OPSET = 20  # highest opset torch's TorchScript exporter writes
INT4_MIN_OPSET = 21


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise DfqError("ONNX export needs onnx and onnxruntime; install them with `pip install 'dfquant[export]'`") from None


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
                       f"opset={DEFAULT_OPSET} or check the runtime version", params=("opset",)) from None


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
