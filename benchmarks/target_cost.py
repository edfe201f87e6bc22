"""Issue 30, item 4: what the onnxruntime target costs in top-1 against the papers' conventions.

Under ``--target onnxruntime`` the simulation computes what onnxruntime's integer kernels compute (8-bit
output quantizers on residual sums and pooling inputs, BN folded, int32 biases, an 8-bit image input, a
uniform softmax grid for ViTs), so the exported model is the evaluated one; the papers' conventions (no
target, the default) keep those parts in float. Each (model, algo, bits, seed) is quantized both ways with
the same calibration images, iterations and seed, and evaluated on the same test images, so the difference
is the target's cost after reconstruction has learned what it can of it.

Models: the zoo's ``fmnist/resnet20``, ``fmnist/mobilenetv2`` (genie-m, brecq) and ``fmnist/vit``
(repq-vit), calibrated on real Fashion-MNIST split A (``--calib real:A``, a different sample per seed) and
evaluated on a class-balanced subset of the test set (``--eval-limit``); and ``realworld/resnet20``:
akamaster's pretrained CIFAR-10 ResNet-20 from ``../shared/realworld`` (loaded as ``benchmarks/realworld.py``
loads it), calibrated on the corpus's real train JPEGs (class-balanced ``--rw-n`` of 1,000), evaluated on its
2,000 test JPEGs.

Each row is one ``dfq quantize`` command in a subprocess (streamed as ``benchmarks/realworld.py`` runs its
commands), recorded in the CSV's ``command`` column (RepQ-ViT rows without reconstruction: see :func:`dfq`);
rows already in ``<out>.csv`` are skipped, so an interrupted run resumes row by row.
Writes ``<out>.csv``, ``<out>.md`` (paper vs target per model/algo/bits, mean ± std over seeds),
``<out>.png`` and appends the invocation to ``<out>.commands.txt``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/target_cost.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/target_cost.py --report-only
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from realworld import _num
from resumable_csv import append_row, log_command, notes_for, open_results

ROOT = Path(__file__).resolve().parent.parent
RW = "../shared/realworld"  # relative to ROOT (the commands run there), so the recorded commands are portable
FIELDS = ["model", "algo", "bits", "convention", "seed", "iters", "n_calib", "eval_limit", "top1", "fp_top1",
          "eval_images", "quant_seconds", "seconds", "warnings", "command"]
KEY = ("model", "algo", "bits", "convention", "seed", "iters", "n_calib", "eval_limit")
CONVENTIONS = {"paper": [], "target": ["--target", "onnxruntime"]}
VIT_ALGOS = {"repq-vit"}


def model_setup(model: str, args) -> dict:
    """How ``dfq quantize`` gets ``model``: its arguments, calibration source and count, test set options."""
    if model.startswith("realworld/"):
        arch = model.split("/", 1)[1]
        weights = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}[arch]
        return {"args": [f"{RW}/akamaster/resnet.py:{arch}", "--weights", f"{RW}/akamaster/pretrained_models/{weights}",
                         "--size", "32"],
                "calib": f"{RW}/cifar10/train", "n": args.rw_n, "eval": ["--val", f"{RW}/cifar10/test"]
                + (["--eval-limit", str(args.rw_eval_limit)] if args.rw_eval_limit else []),
                "eval_limit": args.rw_eval_limit or "", "vit": False}
    return {"args": [model], "calib": "real:A", "n": args.n,
            "eval": ["--eval-limit", str(args.eval_limit)] if args.eval_limit else [],
            "eval_limit": args.eval_limit or "",
            "vit": "vit" in model.split("/")[-1]}


def grid(args) -> list[dict]:
    """The rows in the order they run: seed by seed (``--seeds`` first, then ``--more-seeds`` on the cells of
    ``--more-seeds-for``), each (model, algo, bits) paper then target, so an interrupted run has whole pairs."""
    seeds = [(s, None) for s in args.seeds] + [(s, args.more_seeds_for) for s in args.more_seeds if s not in args.seeds]
    out = []
    for seed, cells in seeds:
        for model in args.models:
            setup = model_setup(model, args)
            algos = [a for a in args.algos if (a in VIT_ALGOS) == setup["vit"]]
            for algo in algos:
                for bits in args.bits:
                    if cells is not None and not any(fnmatch.fnmatch(f"{model}:{algo}:{bits}", c) for c in cells):
                        continue
                    iters = args.vit_iters if setup["vit"] else args.iters
                    for conv in args.conventions:
                        out.append({"model": model, "algo": algo, "bits": bits, "convention": conv, "seed": seed,
                                    "iters": iters, "n_calib": setup["n"], "eval_limit": setup["eval_limit"]})
    return out


class RowFailed(Exception):
    pass


def dfq(args: list[str]) -> tuple[str, str]:
    """Run ``dfq <args>`` (as ``benchmarks/realworld.py`` does: streamed, DFQ_PROGRESS=0); return (command, output).
    RepQ-ViT rows run with ``--iters 0`` (as published: calibration without block reconstruction)."""
    prefix = [str(Path(sys.executable).parent / "dfq")]
    shown = "dfq " + " ".join(shlex.quote(a) for a in args)
    print("  $ " + shown, flush=True)
    proc = subprocess.Popen([*prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "DFQ_PROGRESS": "0"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        print("    " + line.rstrip(), flush=True)
    proc.wait()
    if proc.returncode != 0:
        raise RowFailed(f"exit {proc.returncode}: {shown}: {lines[-1].strip() if lines else ''}")
    return shown, "".join(lines)


def run_row(r: dict, args) -> dict:
    setup = model_setup(r["model"], args)
    w, a = r["bits"][1:].split("A")
    qdir = args.work.resolve() / "_".join(str(r[k]).replace("/", "-") for k in KEY if str(r[k]))
    shown_dir = os.path.relpath(qdir, ROOT) if qdir.is_relative_to(ROOT) else str(qdir)  # the commands run in ROOT
    t0 = time.time()
    command, text = dfq(["quantize", *setup["args"], "--calib", setup["calib"], "--n", str(r["n_calib"]),
                         "--algo", r["algo"], "--wbits", w, "--abits", a, "--iters", str(r["iters"]),
                         "--seed", str(r["seed"]), *CONVENTIONS[r["convention"]], *setup["eval"],
                         "--out", shown_dir, "--threads", str(args.threads)])
    seconds = round(time.time() - t0, 1)
    results = json.loads((qdir / "results.json").read_text())
    warnings = dict.fromkeys(line.removeprefix("warning: ") for line in text.splitlines()
                             if line.startswith("warning:"))
    return {**r, "top1": _num(r"quantized top-1 ([\d.]+)%", text), "fp_top1": _num(r"FP top-1 ([\d.]+)%", text),
            "eval_images": _num(r"\(on (\d+) images\)", text), "quant_seconds": results.get("seconds", ""),
            "seconds": seconds, "warnings": " / ".join(warnings), "command": command}


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def _bits_key(bits: str) -> float:
    return -sum(float(x) for x in bits[1:].split("A"))


def cells(data: list[dict]) -> list[dict]:
    """Per (model, algo, bits, iters, n_calib, eval_limit): the paper and target top-1 of each seed, paired."""
    groups: dict[tuple, dict] = {}
    for d in data:
        if not d["top1"]:
            continue
        g = groups.setdefault((d["model"], d["algo"], d["bits"], d["iters"], d["n_calib"], d["eval_limit"]),
                              {"paper": {}, "target": {}, "fp": d["fp_top1"], "eval_images": d["eval_images"],
                               "seconds": {"paper": [], "target": []}})
        g[d["convention"]][d["seed"]] = float(d["top1"])
        g["seconds"][d["convention"]].append(float(d["seconds"]))
    order = {m: i for i, m in enumerate(dict.fromkeys(d["model"] for d in data))}
    out = []
    for (model, algo, bits, iters, n, limit), g in groups.items():
        paired = sorted(set(g["paper"]) & set(g["target"]))
        out.append({"model": model, "algo": algo, "bits": bits, "iters": iters, "n_calib": n, "fp": g["fp"],
                    "eval_images": g["eval_images"], "paper": list(g["paper"].values()),
                    "target": list(g["target"].values()), "diff": [g["target"][s] - g["paper"][s] for s in paired],
                    "seconds": {c: statistics.mean(v) if v else None for c, v in g["seconds"].items()}})
    return sorted(out, key=lambda c: (order[c["model"]], c["algo"], _bits_key(c["bits"]), int(c["iters"])))


def report(out: Path, commands: str) -> None:
    from dfquant.io import atomic_path, write_text

    with open(out.with_suffix(".csv")) as fh:
        data = list(csv.DictReader(fh))
    table = cells(data)
    lines = [
        "# The cost of the onnxruntime target in top-1 (issue 30, item 4)\n",
        "Each cell quantizes the same model twice with the same calibration images, iterations per block and seed: "
        "under the papers' conventions (`paper`: no `--target`, the default) and under `--target onnxruntime` "
        "(`target`: the simulation computes what onnxruntime's integer kernels compute: image input quantized to 8 "
        "bits, BN folded, int32 biases, 8-bit output quantizers on residual-branch outputs, sums and pooling inputs, "
        "symmetric weight grids (8-bit weights on 7 bits where the kernel is a matrix product), a uniform softmax grid for the ViT), and evaluates both on the same test images. "
        "`target − paper` is the mean ± std over seeds of the per-seed difference (negative: the target costs "
        "top-1).\n",
        "Zoo models (`fmnist/*`): calibration on real Fashion-MNIST split A (`--calib real:A`, a different sample per "
        "seed), a class-balanced fixed subset of the test set. `realworld/resnet20`: akamaster's pretrained CIFAR-10 "
        "ResNet-20 (`../shared/realworld`), calibration on the corpus's real train JPEGs (class-balanced), evaluation "
        "on its 2,000 test JPEGs (FP 80.45). RepQ-ViT as published calibrates without reconstruction (iters 0: its "
        "range search and LayerNorm reparameterization use the first 32 calibration images). Iterations per block are "
        "far below the papers' 20,000 (CPU budget: 2 shared cores, one thread per row).\n",
        "| model | algo | bits | it/block | calib images | eval images | FP top-1 | paper top-1 | target top-1 | "
        "target − paper | seeds | s/row paper / target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in table:
        secs = " / ".join("–" if c["seconds"][k] is None else f"{c['seconds'][k]:.0f}" for k in ("paper", "target"))
        diff = _mean_std(c["diff"])
        lines.append(f"| {c['model']} | {c['algo']} | {c['bits']} | {c['iters']} | {c['n_calib']} | "
                     f"{c['eval_images']} | "
                     f"{c['fp']} | {_mean_std(c['paper'])} | {_mean_std(c['target'])} | "
                     f"{'+' if c['diff'] and not diff.startswith('-') else ''}{diff} | "
                     f"{len(c['diff']) or max(len(c['paper']), len(c['target']))} | {secs} |")
    warned = dict.fromkeys(w for d in data for w in d["warnings"].split(" / ") if w)
    if warned:
        lines += ["", "Warnings printed by the commands (each once):", ""] + [f"- {w}" for w in warned]
    lines += ["", f"![paper vs target top-1]({out.with_suffix('.png').name})", "",
              "Each row's exact `dfq` command is in the CSV's `command` column; `seconds` is its wall time on the "
              "shared machine (process start, "
              "FP and quantized evaluation, quantization, checkpoint), `quant_seconds` the quantization alone.", "",
              *([notes_for(out).strip(), ""] if notes_for(out) else []), "Made with:", "", commands.rstrip()]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    if table:
        _plot(table, out.with_suffix(".png"), atomic_path)


def _plot(table: list[dict], png: Path, atomic_path) -> None:
    """Per model: top-1 under each convention (bars, ± std over seeds; FP dashed) and, below, target − paper."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c["model"] for c in table))
    fig, axes = plt.subplots(2, len(models), figsize=(3.4 * len(models) + 1, 6), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    for col, model in enumerate(models):
        top, bottom = axes[0][col], axes[1][col]
        cs = [c for c in table if c["model"] == model]
        for off, conv, color in ((-0.2, "paper", "tab:blue"), (0.2, "target", "tab:orange")):
            xs = [x + off for x, c in enumerate(cs) if c[conv]]
            vals = [statistics.mean(c[conv]) for c in cs if c[conv]]
            errs = [statistics.stdev(c[conv]) if len(c[conv]) > 1 else 0.0 for c in cs if c[conv]]
            top.bar(xs, vals, 0.4, yerr=errs, color=color, capsize=2,
                    label="papers' conventions" if conv == "paper" else "--target onnxruntime")
            for x, v in zip(xs, vals):
                top.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=6, rotation=90)
        top.axhline(float(cs[0]["fp"]), ls="--", color="gray", lw=0.8, label="FP")
        top.set_title(model, fontsize=9)
        top.set_ylim(0, 112)
        diffs = [(x, c["diff"]) for x, c in enumerate(cs) if c["diff"]]
        bottom.bar([x for x, _ in diffs], [statistics.mean(d) for _, d in diffs], 0.5,
                   yerr=[statistics.stdev(d) if len(d) > 1 else 0.0 for _, d in diffs], color="tab:red", capsize=2)
        bottom.axhline(0, color="black", lw=0.6)
        labels = [f"{c['algo']}\n{c['bits']}" + (f"\n{c['iters']} it" if len({d['iters'] for d in cs}) > 1 else "")
                  for c in cs]
        for ax in (top, bottom):
            ax.set_xticks(range(len(cs)))
            ax.set_xticklabels(labels if ax is bottom else [], fontsize=7)
            ax.set_xlim(-0.6, len(cs) - 0.4)
    axes[0][0].set_ylabel("top-1 (%)")
    axes[1][0].set_ylabel("target − paper (points)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+",
                    default=["fmnist/resnet20", "fmnist/mobilenetv2", "fmnist/vit", "realworld/resnet20"])
    ap.add_argument("--algos", nargs="+", default=["genie-m", "brecq", "repq-vit"],
                    help="each model takes those that fit it (repq-vit: ViTs; the others: CNNs)")
    ap.add_argument("--bits", nargs="+", default=["W8A8", "W4A4", "W2A4"])
    ap.add_argument("--conventions", nargs="+", default=list(CONVENTIONS), choices=list(CONVENTIONS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of every cell")
    ap.add_argument("--more-seeds", nargs="*", type=int, default=[1, 2],
                    help="further seeds, for the cells of --more-seeds-for only")
    ap.add_argument("--more-seeds-for", nargs="*",
                    default=["fmnist/resnet20:genie-m:W4A4", "fmnist/resnet20:genie-m:W2A4"],
                    help="model:algo:bits patterns (fnmatch) of the cells that get --more-seeds")
    ap.add_argument("--iters", type=int, default=60, help="reconstruction iterations per block (CNNs)")
    ap.add_argument("--vit-iters", type=int, default=0,
                    help="ViT iterations per block (0: RepQ-ViT as published, without reconstruction)")
    ap.add_argument("--n", type=int, default=256, help="calibration images of the zoo models (real split A)")
    ap.add_argument("--eval-limit", type=int, default=2000,
                    help="zoo test images (class-balanced, fixed); 0: all 10,000")
    ap.add_argument("--rw-n", type=int, default=500, help="calibration JPEGs of the real-world model (of 1,000)")
    ap.add_argument("--rw-eval-limit", type=int, default=0, help="real-world test JPEGs (0: all 2,000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "target_cost", help="the rows' checkpoint folders")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "target_cost")
    ap.add_argument("--report-only", action="store_true", help="re-make the .md and .png from the CSV")
    ap.add_argument("--dry-run", action="store_true", help="list the rows still to run and exit")
    args = ap.parse_args()
    out = args.out
    if args.report_only:
        report(out, log_command(out, record=False))
        return
    if any(m.startswith("realworld/") for m in args.models) and not (ROOT / RW).is_dir():
        raise SystemExit(f"{(ROOT / RW).resolve()} not found: realworld/* models need the real-world corpus; "
                         "drop them from --models")
    csv_path = out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    key = lambda d: tuple(str(d[k]) for k in KEY)  # noqa: E731
    done = open_results(csv_path, FIELDS, key) if csv_path.exists() or not args.dry_run else set()
    todo = [r for r in grid(args) if key(r) not in done]
    print(f"{len(todo)} rows to run ({len(grid(args)) - len(todo)} of the grid already in {csv_path})", flush=True)
    if args.dry_run:
        for r in todo:
            print("  " + " ".join(f"{k}={r[k]}" for k in KEY), flush=True)
        return
    commands = log_command(out)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    failed, t_start = [], time.time()
    for i, r in enumerate(todo):
        label = f"{r['model']} {r['algo']} {r['bits']} {r['convention']} seed {r['seed']}"
        elapsed = time.time() - t_start
        eta = f", ~{elapsed / i * (len(todo) - i) / 60:.0f} min left" if i else ""
        print(f"== [{i + 1}/{len(todo)}] {label} ({elapsed / 60:.1f} min so far{eta})", flush=True)
        try:
            row = run_row(r, args)
        except RowFailed as exc:  # its output was printed above; the row stays out of the CSV, a re-run retries it
            print(f"!! {label}: {exc}", flush=True)
            failed.append(f"{label}: {exc}")
            continue
        append_row(csv_path, FIELDS, row)
        print(f"-> {label}: top-1 {row['top1']} (FP {row['fp_top1']}, {row['eval_images']} images), "
              f"{row['seconds']:.0f}s", flush=True)
        report(out, commands)
    report(out, commands)
    if failed:
        raise SystemExit(f"{len(failed)} row(s) failed (re-run to retry them):\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
