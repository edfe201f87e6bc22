"""ONNX export, what the runtime runs: integer or float kernels.

Reads onnxruntime's optimized graph to tell which Conv/Gemm/MatMul become integer kernels, gives
the ones it will run in float their weights dequantized by constant ops (with the reason), and
reports the runtime's graph (:func:`runtime_graph`). Used by the export passes and by
verification, above :mod:`~dfquant.quant.export.onnx_graph` only.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from dfquant.quant.export.onnx_graph import (FLOAT_KERNELS, INTEGER_KERNELS, _activation_chain, _const, _ort_session,
                                             _q_bounds, _require_onnx, _separate_bias)


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


def _saturating_kernels(model, float_nodes) -> dict[str, str]:
    """The integer Conv/Gemm/MatMul (not in ``float_nodes``) whose int8 weights times uint8 input codes can
    overflow an int16 pair sum, ``2 x_max max|w| > 2^15 - 1``: onnxruntime's u8s8 matrix kernels on AVX2 CPUs
    without VNNI (VPMADDUBSW) saturate there and return another integer than the simulation. Depthwise
    convolutions (16/32-bit products), uint8 weights (uint8 x uint8 kernels widen to 16 bits) and weights computed
    at load (4-bit grids, kept within the bound by their multiplier) cannot. Returns node name -> why."""
    import numpy as np

    graph = model.graph
    prod = {o: n for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.name in float_nodes or len(node.input) < 2:
            continue
        dq_x, dq_w = prod.get(node.input[0]), prod.get(node.input[1])
        if dq_x is None or dq_w is None or "DequantizeLinear" != dq_x.op_type or "DequantizeLinear" != dq_w.op_type:
            continue
        w, src = _const(graph, dq_w.input[0]), prod.get(dq_x.input[0])
        q_x = prod.get(src.input[0]) if src is not None and src.op_type == "Clip" else src
        if w is None or w.dtype != np.int8 or q_x is None or q_x.op_type != "QuantizeLinear":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1 and group == w.shape[0] and w.shape[1] == 1:
            continue
        x_max, w_max = _q_bounds(graph, q_x)[1], int(np.abs(w.astype(np.int32)).max())
        if 2 * x_max * w_max > 2**15 - 1:
            out[node.name] = (f"int8 weights up to {w_max} times uint8 inputs up to {x_max}: int16 pair sums saturate on "
                              "AVX2 CPUs without VNNI (quantize again with target='onnxruntime': 7-bit matrix weights)")
    return out


# ops that move or select integers exactly (onnxruntime drops the Q/DQ around them or runs them on the grid)
_EXACT_MOVES = ("MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Relu", "Clip", "Identity")


def _float_requantizations(model) -> dict[str, str]:
    """The QuantizeLinear nodes left in onnxruntime's optimized graph that round a value it computed in float
    (LayerNorm, Softmax, GELU, a float kernel's output...): float arithmetic in another order than PyTorch's, so
    a value near half-way between two integers may round the other way. Quantizing the model input or
    re-quantizing a dequantized grid (through MaxPool, reshapes, ReLU) is the same float division in both.
    Returns node name -> why."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        _ort_session(model, "extended", Path(tmp) / "optimized.onnx")
        graph = onnx.load(str(Path(tmp) / "optimized.onnx")).graph
    prod = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    out = {}
    for q in graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        v = q.input[0]
        while v in prod and prod[v].op_type in _EXACT_MOVES:
            v = prod[v].input[0]
        if v in inputs or v in {t.name for t in graph.initializer} or (v in prod and prod[v].op_type == "DequantizeLinear"):
            continue
        out[q.name] = (f"quantizes the output of a float {prod[v].op_type if v in prod else v} (onnxruntime's float "
                       "arithmetic, another summation order than PyTorch's: a value half-way between two integers may "
                       "round the other way)")
    return out


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
