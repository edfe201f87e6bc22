"""Where the integer speed-up stops on this CPU (issue 30): onnxruntime's own per-kernel profile of the FP32 model,
dfquant's target export and onnxruntime's ``quantize_static`` files.

``deploy.py`` measures whole-model speed-ups; this asks which part of the model limits them. For each model it
exports FP32 and the W8A8 ``target`` form (range initialization, as ``deploy.py``), quantizes the FP32 file with
``quantize_static`` twice (uint8 activations with ``reduce_range``, the u8s8 kernels ``deploy.py`` compares with,
and int8 activations, the s8s8 kernels), and runs each with onnxruntime's profiler (``enable_profiling``, one
intra-op thread unless OMP_NUM_THREADS says otherwise) at batch 1 and 32, the four forms interleaved. Per (model,
batch, form) it writes the wall median and the kernel time per run of each operator type; the report compares the
convolution kernels alone (``Conv`` / ``QLinearConv``: over 95% of these models' time), which bounds what any
graph built from them can gain over FP32.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/kernel_ceiling.py
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy  # noqa: E402
from resumable_csv import append_row, open_results  # noqa: E402

FIELDS = ["model", "batch", "form", "op_type", "ms", "nodes", "wall_ms", "runs", "commit"]
FORMS = ["fp32", "target", "ort-u8s8", "ort-s8s8"]
CONV = {"Conv", "QLinearConv", "FusedConv"}
GROUPED = " group>1"  # appended to the op type of grouped (depthwise) convolutions


def _grouped_convs(optimized: Path) -> set[str]:
    """Names of the convolutions with group > 1 (depthwise in these models) in the graph onnxruntime ran."""
    import onnx

    model = onnx.load(str(optimized), load_external_data=False)
    return {n.name for n in model.graph.node if n.op_type in CONV
            and any(a.name == "group" and a.i > 1 for a in n.attribute)}


def profile(paths: dict[str, Path], input_size: tuple[int, ...], batch: int, runs: int,
            tmp: Path) -> dict[str, tuple[float, dict]]:
    """Per form: the wall median (ms) of ``runs`` timed runs and, per operator type, the kernel ms per run and node
    count from onnxruntime's profile of the same runs. The forms run interleaved (each round runs every form once,
    in a rotating order), so load from other processes hits them alike; kernel times are medians over the timed
    runs of each run's sum (two untimed warm-up runs each are left out)."""
    import numpy as np
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32)
    sessions = {}
    for form, path in paths.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp / f"{form}_b{batch}")
        opts.optimized_model_filepath = str(tmp / f"{form}_b{batch}_optimized.onnx")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        sessions[form] = (sess, {sess.get_inputs()[0].name: x})
    for sess, feed in sessions.values():
        for _ in range(2):
            sess.run(None, feed)
    forms = list(sessions)
    walls: dict[str, list[float]] = {f: [] for f in forms}
    for r in range(runs):
        for form in forms[r % len(forms):] + forms[: r % len(forms)]:
            sess, feed = sessions[form]
            t = time.perf_counter()
            sess.run(None, feed)
            walls[form].append(1e3 * (time.perf_counter() - t))
    out = {}
    for form, (sess, _) in sessions.items():
        grouped = _grouped_convs(tmp / f"{form}_b{batch}_optimized.onnx")
        events = json.loads(Path(sess.end_profiling()).read_text())
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[2:]
        per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(spans))
        nodes: dict[str, set] = defaultdict(set)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                i = next((i for i, (a, b) in enumerate(spans) if a <= e["ts"] <= b), None)
                if i is None:  # a warm-up run
                    continue
                op = e["args"].get("op_name", "?")
                op += GROUPED if e["name"][: -len("_kernel_time")] in grouped else ""
                per_run[op][i] += e["dur"] / 1e3
                nodes[op].add(e["name"])
        out[form] = (float(np.median(walls[form])),
                     {op: (float(np.median(v)), len(nodes[op])) for op, v in per_run.items()})
    return out


def measure(name: str, args, csv_path: Path, commit: str) -> None:
    import dfquant.quant.export as E

    d = deploy.load(name, 1, 1)
    spec = d.spec
    w, a = int(args.bits[1]), int(args.bits[3])
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        paths = {f: tmp / f"{f}.onnx" for f in FORMS}
        t = time.time()
        E.export_onnx(spec.model, spec.input_size, paths["fp32"])
        recipe = argparse.Namespace(algo="minmax", vit_algo="repq-vit", iters=None)  # deploy.py's default
        q = deploy.quantized(spec, d.calib, w, a, True, recipe)
        E.export_onnx(q, spec.input_size, paths["target"])
        deploy.ort_static(paths["fp32"], paths["ort-u8s8"], d.calib, "MinMax", tmp, True, True, "uint8")
        deploy.ort_static(paths["fp32"], paths["ort-s8s8"], d.calib, "MinMax", tmp, True, False, "int8")
        deploy.log(f"{name}: four files ready ({time.time() - t:.0f}s)")
        rows = []  # appended once the model is complete, so a resumed run measures a model whole or not at all
        for batch, runs in ((1, args.runs), (32, max(2, args.runs // 5))):
            for form, (wall, ops) in profile(paths, spec.input_size, batch, runs, tmp).items():
                rows += [{"model": name, "batch": batch, "form": form, "op_type": op, "ms": round(ms, 4),
                          "nodes": n, "wall_ms": round(wall, 3), "runs": runs, "commit": commit}
                         for op, (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])]
                conv = sum(ms for op, (ms, _) in ops.items() if op.removesuffix(GROUPED) in CONV)
                deploy.log(f"{name} b{batch} {form}: wall {wall:.1f} ms, conv kernels {conv:.1f} ms")
        for row in rows:
            append_row(csv_path, FIELDS, row)


def summary(rows: list[dict]) -> list[dict]:
    """Per (model, batch, form): wall, conv kernel ms, other kernel ms and both speed-ups over fp32."""
    agg: dict[tuple, dict] = {}
    for r in rows:
        k = (r["model"], int(r["batch"]), r["form"])
        s = agg.setdefault(k, {"model": k[0], "batch": k[1], "form": k[2], "wall_ms": float(r["wall_ms"]),
                               "conv_ms": 0.0, "other_ms": 0.0, "conv_nodes": 0, "grouped_ms": 0.0,
                               "grouped_nodes": 0})
        if r["op_type"].removesuffix(GROUPED) in CONV:
            s["conv_ms"] += float(r["ms"])
            s["conv_nodes"] += int(r["nodes"])
            if r["op_type"].endswith(GROUPED):
                s["grouped_ms"] += float(r["ms"])
                s["grouped_nodes"] += int(r["nodes"])
        else:
            s["other_ms"] += float(r["ms"])
    for s in agg.values():
        fp = agg.get((s["model"], s["batch"], "fp32"))
        s["speedup"] = fp["wall_ms"] / s["wall_ms"] if fp else float("nan")
        s["conv_speedup"] = fp["conv_ms"] / s["conv_ms"] if fp and s["conv_ms"] else float("nan")
        s["grouped_speedup"] = fp["grouped_ms"] / s["grouped_ms"] if fp and s["grouped_ms"] else float("nan")
    order = {f: i for i, f in enumerate(FORMS)}
    return sorted(agg.values(), key=lambda s: (s["model"], s["batch"], order.get(s["form"], 9)))


def report(csv_path: Path, out: Path, commands: list[str]) -> None:
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    summ = summary(rows)
    lines = ["# Where the integer speed-up stops: onnxruntime's kernel profile (issue 30)", "",
             f"CPU: {deploy.cpu_sentence(deploy.cpu_info())}", "",
             "Each model in four forms: **fp32**; dfquant's W8A8 **target** export (range initialization); "
             "onnxruntime's `quantize_static` (QDQ, per channel, MinMax) with uint8 activations and reduce_range "
             "(**ort-u8s8**, the anchor of `deploy.md`) and with int8 activations (**ort-s8s8**). "
             "*wall* = median of the timed runs (one process, profiler on, the four forms interleaved); "
             "*conv* = `Conv` / `QLinearConv` kernel time per run (median over the runs) from onnxruntime's "
             "profiler (*depthwise*: those with group > 1), *other* = every other kernel. *conv speed-up* = "
             "FP32 conv ms / this form's conv ms: no "
             "graph built from these convolution kernels can be faster than it by more than its other kernels' "
             "share.", "",
             "| model | batch | form | wall ms | speed-up | conv ms (nodes) | conv speed-up | of which depthwise ms "
             "(nodes) | depthwise speed-up | other ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summ:
        dw = (f"{s['grouped_ms']:.1f} ({s['grouped_nodes']}) | {s['grouped_speedup']:.2f}x" if s["grouped_nodes"]
              else "- | -")
        lines.append(f"| {s['model']} | {s['batch']} | {s['form']} | {s['wall_ms']:.1f} | {s['speedup']:.2f}x | "
                     f"{s['conv_ms']:.1f} ({s['conv_nodes']}) | {s['conv_speedup']:.2f}x | {dw} | "
                     f"{s['other_ms']:.2f} |")
    target = [s for s in summ if s["form"] == "target"]
    if target:
        lo = min(target, key=lambda s: s["conv_speedup"])
        hi = max(target, key=lambda s: s["conv_speedup"])
        lines += ["", f"Target form: the integer convolution kernels alone run {lo['conv_speedup']:.2f}x "
                  f"({lo['model']}, batch {lo['batch']}) to {hi['conv_speedup']:.2f}x ({hi['model']}, batch "
                  f"{hi['batch']}) faster than onnxruntime's FP32 convolutions on this CPU; every other kernel "
                  "together takes "
                  f"{max(100 * s['other_ms'] / max(s['conv_ms'] + s['other_ms'], 1e-9) for s in target):.1f}% "
                  "of the target form's kernel time at most."]
    lines += ["", "Commands:", ""] + [f"    {c}" for c in commands]
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out.with_suffix(".md"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=deploy.SPEED_GOAL_MODELS)
    ap.add_argument("--bits", default="W8A8", choices=["W8A8", "W4A4"])
    ap.add_argument("--runs", type=int, default=20, help="timed runs at batch 1 (batch 32: a fifth, at least 2)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernel_ceiling")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    csv_path = args.out.with_suffix(".csv")
    commands = deploy.log_command(args.out, not args.report_only)
    if not args.report_only:
        done = {m for m, *_ in open_results(csv_path, FIELDS, lambda r: (r["model"],))}
        commit = deploy.git_commit()
        for name in args.models:
            if name in done:
                deploy.log(f"{name}: in {csv_path.name} already (delete its rows to measure again)")
                continue
            measure(name, args, csv_path, commit)
            report(csv_path, args.out, commands)
    report(csv_path, args.out, commands)


if __name__ == "__main__":
    main()
