"""``dfq report``: a Markdown report (tables + PNGs) from one or more run folders."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dfquant.analysis.summary import analysis_table, has_results  # noqa: E402
from dfquant.errors import DfqError  # noqa: E402
from dfquant.io import atomic_path, read_json, write_text  # noqa: E402
from dfquant.run import results_table  # noqa: E402


def _rows(run_dirs: list[Path]) -> list[dict]:
    rows = []
    for d in run_dirs:
        f = d / "results.json"
        if not f.exists():
            raise DfqError(f"{d} has no results.json; pass folders written by `dfq run` (finished runs)")
        rows += [{**r, "run": str(d)} for r in read_json(f)]
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of quantized top-1 (and mean wall time), per (model, calibration, algo, bits)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["strategy"], r["algo"], r["bits"])].append(r)
    out = []
    for (model, strat, algo, bits), rs in groups.items():
        acc = np.array([r["q_top1"] for r in rs])
        secs = [float(r["quant_seconds"]) for r in rs if r.get("quant_seconds") not in (None, "")]
        out.append({"model": model, "calibration": strat, "algo": algo, "bits": bits, "fp_top1": rs[0]["fp_top1"],
                    "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, "seeds": len(acc),
                    "seconds": sum(secs) / len(secs) if secs else None})
    return sorted(out, key=lambda r: (r["model"], r["bits"], -r["mean"]))


def aggregate_table(agg: list[dict]) -> str:
    head = ("| model | calibration | algo | bits | FP top-1 | quantized top-1 (mean ± std) | seeds | time (s) |\n"
            "|---|---|---|---|---|---|---|---|\n")

    def secs(a: dict) -> str:
        return "–" if a.get("seconds") is None else f"{a['seconds']:.0f}"

    return head + "".join(f"| {a['model']} | {a['calibration']} | {a['algo']} | {a['bits']} | {a['fp_top1']:.2f} | "
                          f"{a['mean']:.2f} ± {a['std']:.2f} | {a['seeds']} | {secs(a)} |\n" for a in agg)


def _wider_first(bits: str) -> float:
    """Sort key putting wider settings first ("W8A8" before "W4A4" before "W2A4")."""
    return -sum(float(x) for x in bits[1:].split("A"))


def pivot_table(agg: list[dict], order: list[str] | None = None) -> str:
    """Markdown table with one row per calibration source and one column per (model, algo, bits).

    This is the paper-style layout (sources down, settings across) that a reader compares at a
    glance; each cell is "mean ± std (seeds)", or "mean (1)" for a single seed, and "–" where the
    grid has no row. ``order`` fixes the row order (sources not in it follow alphabetically).
    """
    if not agg:
        return ""
    cols = sorted({(a["model"], a["algo"], a["bits"]) for a in agg},
                  key=lambda c: (c[0], c[1], _wider_first(c[2])))
    order = order or []
    sources = sorted({a["calibration"] for a in agg}, key=lambda s: (order.index(s) if s in order else len(order), s))
    cell = {(a["calibration"], a["model"], a["algo"], a["bits"]): a for a in agg}

    def fmt(a: dict | None) -> str:
        if a is None:
            return "–"
        return f"{a['mean']:.2f} ({a['seeds']})" if a["seeds"] == 1 else f"{a['mean']:.2f} ± {a['std']:.2f} ({a['seeds']})"

    head = "| calibration | " + " | ".join(f"{m} {algo} {bits}" for m, algo, bits in cols) + " |\n"
    head += "|---" * (len(cols) + 1) + "|\n"
    return head + "".join(f"| {s} | " + " | ".join(fmt(cell.get((s, *c))) for c in cols) + " |\n" for s in sources)


def paired_comparison(rows: list[dict], a: str, b: str) -> str:
    """Markdown table of calibration ``a`` minus ``b``, paired by seed, per (model, algo, bits).

    Seeds pair the two sets' prompt sampling and the quantizer's randomness, so the per-seed
    difference removes the seed-to-seed spread both share; "wins" counts seeds where ``a`` is higher.
    Empty when no (model, algo, bits) has both.
    """
    acc = {(r["model"], r["algo"], r["bits"], r["strategy"], str(r["seed"])): float(r["q_top1"]) for r in rows}
    lines = []
    for model, algo, bits in sorted({k[:3] for k in acc}):
        seeds = sorted({k[4] for k in acc if k[:3] == (model, algo, bits)})
        diff = np.array([acc[(model, algo, bits, a, s)] - acc[(model, algo, bits, b, s)] for s in seeds
                         if (model, algo, bits, a, s) in acc and (model, algo, bits, b, s) in acc])
        if len(diff):
            std = f"{diff.std(ddof=1):.2f}" if len(diff) > 1 else "–"
            lines.append(f"| {model} | {algo} | {bits} | {diff.mean():+.2f} ± {std} | {int((diff > 0).sum())}/{len(diff)} |\n")
    if not lines:
        return ""
    return (f"| model | algo | bits | {a} − {b} (points, mean ± std over seeds) | seeds {a} wins |\n"
            "|---|---|---|---|---|\n" + "".join(lines))


def accuracy_vs_bits(agg: list[dict], path: Path) -> None:
    models = sorted({a["model"] for a in agg})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [a for a in agg if a["model"] == model]
        bits = sorted({a["bits"] for a in sub}, key=_wider_first)
        several_algos = len({a["algo"] for a in sub}) > 1
        for i, (cal, algo) in enumerate(sorted({(a["calibration"], a["algo"]) for a in sub})):
            pts = {a["bits"]: a for a in sub if (a["calibration"], a["algo"]) == (cal, algo)}
            xs = [j for j, b in enumerate(bits) if b in pts]
            ax.errorbar(xs, [pts[bits[j]]["mean"] for j in xs], yerr=[pts[bits[j]]["std"] for j in xs], marker="o",
                        capsize=3, label=f"{cal} / {algo}" if several_algos else cal, color=f"C{i % 10}",
                        ls="-" if i < 10 else "--")
        ax.axhline(sub[0]["fp_top1"], color="k", ls="--", lw=1, label="full precision")
        ax.set_xticks(range(len(bits)), bits)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write ``out/report.md`` with the accuracy table, accuracy-vs-bits plot, sample grids and analyses."""
    rows = _rows(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    accuracy_vs_bits(agg, out / "accuracy_vs_bits.png")
    parts = ["# dfquant report\n", "## Accuracy\n", aggregate_table(agg), "\n![accuracy vs bits](accuracy_vs_bits.png)\n",
             "\n## Runs\n", results_table(rows)]
    grids, analyses = [], []
    for d in run_dirs:
        images = d / "images"
        if (images / "manifest.jsonl").exists():
            from dfquant.generate.grid import contact_sheets

            for sheet in contact_sheets(images, out / f"grid_{d.name}.png", n=32):
                grids.append(f"### {d.name}\n\n![samples]({sheet.name})\n")
        if has_results(d / "analysis"):
            analyses.append(f"### {d.name}\n\n" + analysis_table([d / "analysis"]))
        for png in sorted((d / "analysis").glob("*.png")) if (d / "analysis").exists() else []:
            shutil.copy(png, out / f"{d.name}_{png.name}")
            analyses.append(f"### {d.name}: {png.stem}\n\n![{png.stem}]({d.name}_{png.name})\n")
    if grids:
        parts += ["\n## Calibration samples\n", *grids]
    if analyses:
        parts += ["\n## Analyses\n", *analyses]
    write_text(out / "report.md", "\n".join(parts))
    return out / "report.md"
