"""Append-only result CSVs that let a long benchmark resume where it stopped."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable


def open_results(csv_path: Path, fields: list[str], key: Callable[[dict], tuple]) -> set:
    """Create ``csv_path`` with a header if missing; return the keys of the rows it already holds."""
    if not csv_path.exists():
        with open(csv_path, "w", newline="") as fh:
            csv.DictWriter(fh, fields).writeheader()
        return set()
    with open(csv_path) as fh:
        return {key(r) for r in csv.DictReader(fh)}
