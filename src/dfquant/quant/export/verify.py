"""ONNX export, verification and deployment gain: the exported file next to the simulation.

:func:`verify_onnx` runs the ONNX file in onnxruntime next to the fake-quantized PyTorch model;
the acceptance bounds of ``dfq export --verify`` (:func:`verification_passed`,
:func:`verification_error`) and what the file buys over float32 (:func:`measure_latency`,
:func:`deployment_gain`) live here, at the top, since they export and run whole graphs.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.export.kernels import runtime_graph
from dfquant.quant.export.onnx import export_onnx
from dfquant.quant.export.onnx_graph import _ort_session, _require_onnx


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


def cpu_flags(cpuinfo: str | None = None) -> list[str] | None:
    """The x86 ``flags`` of ``/proc/cpuinfo`` (or of ``cpuinfo``, its text); None where there is no such line
    (another OS, or an ARM CPU, whose line is ``Features``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    return next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), None)


def cpu_integer_support(cpuinfo: str | None = None) -> dict[str, bool]:
    """What decides onnxruntime's int8 speed on this CPU, from ``/proc/cpuinfo`` (or ``cpuinfo``, its text):
    ``{"x86", "vnni", "amx"}`` flags, or ``{}`` where unknown.

    Why: without VNNI or AMX (x86 with AVX2 only) onnxruntime's u8s8 kernels add products in 16-bit pairs, and its
    integer convolutions run only 1.5-2x its float ones (measured on an AMD EPYC, AVX2:
    benchmarks/results/kernel_ceiling.md); on a Xeon with VNNI and AMX the same kernels ran ResNet-18/50 at 2.1-2.8x
    FP32. A user who sees 1.6x should learn that it is the CPU, not the export."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return {}
    return {"x86": "sse2" in flags, "vnni": any("vnni" in f for f in flags),
            "amx": any(f.startswith("amx") for f in flags)}


def deployment_gain(fp_model: nn.Module, onnx_path: str | Path, input_size: tuple[int, ...],
                    batch_sizes: tuple[int, ...] = (1, 32), runs: int = 10) -> dict[str, Any]:
    """What the export at ``onnx_path`` buys over running ``fp_model`` (same architecture, float32)
    in onnxruntime: ``size_ratio`` (FP32 file bytes / export bytes), ``latency``
    (:func:`measure_latency`, FP32 first, so ``ratio`` is the speed-up), ``runtime_graph``
    (:func:`runtime_graph` of the export) and ``cpu`` (:func:`cpu_integer_support`)."""
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = Path(tmp) / "fp32.onnx"
        export_onnx(fp_model, input_size, fp_path)
        fp_bytes = fp_path.stat().st_size
        latency = measure_latency({"fp32": fp_path, "quantized": onnx_path}, input_size, batch_sizes, runs)
    q_bytes = Path(onnx_path).stat().st_size
    return {"fp32_bytes": fp_bytes, "bytes": q_bytes, "size_ratio": fp_bytes / q_bytes, "runs": runs,
            "latency": {str(b): v for b, v in latency.items()}, "runtime_graph": runtime_graph(onnx_path),
            "cpu": cpu_integer_support()}


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
            f"the approximate export (integer_residual=True / int8_weights=True) moves top-1 from {v['top1_torch']:.2f}% to "
            f"{v['top1_onnx']:.2f}% on {n} images{counts} (tolerance {tol} image(s): max(1, "
            f"{APPROX_TOP1_TOLERANCE_POINTS:g}% of {n}); argmax agreement {v['argmax_agreement']:.1f}%); "
            f"export without those options for the simulated model's accuracy.{not_kept}",
            params=("integer_residual", "int8_weights"))
    flips = v["disagreements"]
    near_tie = (f"{len(flips)} image(s) changed class, with top-2 logit margins up to "
                f"{max(d['torch_top2_margin'] for d in flips):.3g} in the fake-quantized model. ") if flips else ""
    rounded = (report["export"].get("int32_biases") or {}).get("rounded") or {}
    bias = (f"{len(rounded)} integer kernel(s) round their int32 bias inexactly (measured harmless on calibration "
            "images); export without fuse_bias=True. " if report["export"].get("fused_bias") and rounded else "")
    more = more_images(n, set_size)
    advice = (f"verify on more images ({limit_name} {more})" if more is not None
              else f"the {n} images are the whole test set")
    return DfqError(
        f"onnxruntime disagrees with the fake-quantized model on {n} images: top-1 {v['top1_onnx']:.2f}% vs "
        f"{v['top1_torch']:.2f}%{counts} (tolerance {tol} image(s): max(1, {TOP1_TOLERANCE_POINTS:g}% of {n})), "
        f"mean |logit diff| {100 * v['mean_rel_diff']:.3f}% of the largest logit (tolerance "
        f"{100 * LOGIT_MEAN_TOLERANCE:g}%). {near_tie}{bias}"
        f"One image is {100 / n:.2f} points at {limit_name} {n}: if near ties flipped, {advice}; otherwise report the "
        f"model with {report['report_path']}.{not_kept}", params=("fuse_bias",))
