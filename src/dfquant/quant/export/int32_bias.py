"""ONNX export, int32 biases of integer kernels (``fuse_bias``).

onnxruntime's QLinearConv rounds the bias to int32 on the step ``s_x * s_w``; this stage finds,
per Conv/Gemm, per-channel weight multipliers and int32 biases that reproduce the simulation's
output integers, keeps in float the kernels where some channel has none, and measures on
calibration images which of those may still run as integer kernels.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from dfquant.quant.export.kernels import _runtime_integer_nodes
from dfquant.quant.export.onnx_graph import (_activation_chain, _const, _ort_session, _q_bounds, _separate_bias,
                                             _set_const)
from dfquant.quant.export.qdq import INT32_MAX, _ExportLayer, _exact_int8_bound


# Integer kernels whose int32 bias cannot reproduce the simulation's output integers run in float
# unless, measured on calibration images, they move the logits by at most this mean |difference| /
# max |logit| and change no argmax (_int32_biases): a tenth of LOGIT_MEAN_TOLERANCE, since a moved
# output integer can change classes well below that bound (benchmarks/results/int32_bias.md).
BIAS_ROUNDING_LOGIT_TOLERANCE = 0.001


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


def _bias_plans(model, layers: dict[str, "_ExportLayer"], on_grid: bool = False) -> list[dict[str, Any]]:
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

    ``on_grid``: the simulation already rounds every bias to int32 on ``s_x s_w`` (a deployment target's model):
    the int32 bias is that integer, with the stored weights (exact by construction; no search).

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
        if on_grid:  # t is an integer up to the float32 error of the stored bias (large int32 biases: |t| 2^-24 each)
            exact = residual < 0.25
        for k in [] if on_grid else (pow2 + [k for k in range(1, w_max + 1) if k not in pow2]) if own_grid else [1]:
            # k = 1 keeps the weights as the grid stores them (an 8-bit symmetric grid beyond w_max relies on
            # int8 dot products without int16 saturation: VNNI, AMX, ARM; see _exact_int8_bound)
            allowed = (k * span <= w_max) | (k == 1) if own_grid else np.ones(len(d), dtype=bool)
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
                  approximate: bool = False, on_grid: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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

    plans = _bias_plans(model, layers, on_grid)
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
