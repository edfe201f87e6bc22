"""One Markdown table of what `dfq analyze` measured, for one folder or across seeds.

The studies write JSON per study (``gradnorm.json``, ``generalization_gap.json``,
``tsne.json``); a reader wants them side by side per calibration set, and, when the
analysis was repeated with other seeds, as mean ± std so a single-seed difference is not
read as a finding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dfquant.errors import DfqError
from dfquant.io import read_json

# (column header, study file, key inside a calibration set's entry)
COLUMNS = (
    ("mean grad norm", "gradnorm.json", "mean_grad_norm"),
    ("median grad norm", "gradnorm.json", "median_grad_norm"),
    ("recon. loss calib", "generalization_gap.json", "loss_calib"),
    ("recon. loss held-out real", "generalization_gap.json", "loss_heldout_real"),
    ("gap", "generalization_gap.json", "gap"),
    ("class-centroid distance", "tsne.json", "mean_class_centroid_distance"),
)
STUDY_FILES = tuple(dict.fromkeys(f for _, f, _ in COLUMNS))


def has_results(d: Path) -> bool:
    """Whether ``d`` holds the output of at least one `dfq analyze` study."""
    return any((d / f).exists() for f in STUDY_FILES)


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} ± {float(np.std(values, ddof=1)):.2g} ({len(values)})"


def analysis_table(dirs: list[Path]) -> str:
    """Markdown table, one row per calibration label, of every study found in ``dirs``
    (each a `dfq analyze --out` folder); several folders give mean ± std (n) per cell."""
    studies: list[dict[str, dict]] = []
    for d in dirs:
        found = {f: read_json(d / f) for f in STUDY_FILES if (d / f).exists()}
        if not found:
            raise DfqError(f"{d} holds no dfq analyze results ({', '.join(STUDY_FILES)}); "
                           "pass folders written by `dfq analyze --out`")
        studies.append(found)
    labels = list(dict.fromkeys(label for s in studies for data in s.values() for label in data))
    cols = [c for c in COLUMNS if any(c[1] in s for s in studies)]
    lines = ["| calibration | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label in labels:
        cells = [_fmt([s[f][label][key] for s in studies if label in s.get(f, {})]) for _, f, key in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
