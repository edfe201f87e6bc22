"""ONNX export, graph rewrites after tracing: the passes that reshape the traced QDQ graph.

Giving each consumer its own initializer copy, pruning unused initializers, packing 4-bit weights
as INT4/UINT4, writing activation grids in uint8, folding a Relu/ReLU6 into the integer clip after
it, and (``integer_residual``) adding 8-bit quantizers on the activations dfquant keeps in float.
Each rewrite is exact unless its docstring says otherwise; :mod:`~dfquant.quant.export.onnx`
runs them in order.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from dfquant.quant.export.onnx_graph import (_activation_chain, _const, _consumers, _ort_session, _q_bounds, _q_clip,
                                             _set_const)


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


RESHAPES = ("Flatten", "Reshape", "Squeeze")


def _quantize_before_reshapes(model) -> int:
    """Move an activation QuantizeLinear (with the integer Clip after it) above the Flatten/Reshape/Squeeze that
    feeds only it and reads a GlobalAveragePool: a per-tensor grid commutes with moving values, so the integers are
    the same, and DequantizeLinear -> GlobalAveragePool -> QuantizeLinear is the pattern onnxruntime fuses into
    QLinearGlobalAveragePool, the integer kernel a deployment target's simulation computes. Returns how many
    were moved."""
    graph = model.graph
    prod = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    moves: dict[str, str] = {}  # output of a moved reshape -> output of the node it now follows
    for q, clip, dqs in _act_pairs(graph):
        r = prod.get(q.input[0])
        src = prod.get(r.input[0]) if r is not None else None
        scale = _const(graph, q.input[1])
        if (r is None or r.op_type not in RESHAPES or src is None or src.op_type != "GlobalAveragePool"
                or len(_consumers(graph, r.output[0])) != 1 or scale is None or scale.size != 1 or r.output[0] in outputs):
            continue
        end = (clip or q).output[0]
        q.input[0], r.input[0] = r.input[0], end
        r.output[0] = end + "_reshaped"
        for d in dqs:
            d.input[0] = r.output[0]
        moves[r.output[0]] = end
    if moves:  # each moved reshape goes right after the QuantizeLinear (or its Clip) it now reads
        nodes = list(graph.node)
        moved = {n.output[0]: n for n in nodes if n.output[0] in moves}
        order = []
        for n in nodes:
            if n.output[0] in moved:
                continue
            order.append(n)
            order += [m for out, m in moved.items() if moves[out] == n.output[0]]
        changed = set(moves) | set(moves.values()) | {prod[e].input[0] for e in moves.values() if e in prod}
        kept = [v for v in graph.value_info if v.name not in changed]  # their shapes and types changed
        del graph.node[:]
        graph.node.extend(order)
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return len(moves)


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
