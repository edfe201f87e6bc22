"""Benchmark bookkeeping: append-only result CSVs that resume where a run stopped, and the log of commands."""

from __future__ import annotations

import csv
import shlex
import sys
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


def append_row(csv_path: Path, fields: list[str], row: dict) -> None:
    """Append one result row: one short write, so parallel lanes may share the file."""
    with open(csv_path, "a", newline="") as fh:
        csv.DictWriter(fh, fields).writerow(row)


def log_command(out: Path, record: bool = True) -> str:
    """Append this invocation to ``<out>.commands.txt`` (when ``record``); return the whole log as a Markdown list.

    Logged before the work starts, so an interrupted invocation whose rows the CSV keeps is listed too.
    """
    log = Path(out).with_suffix(".commands.txt")
    if record:
        with open(log, "a") as fh:
            fh.write("python " + " ".join(shlex.quote(a) for a in sys.argv) + "\n")
    return "".join(f"- `{c}`\n" for c in log.read_text().splitlines()) if log.exists() else ""


def notes_for(out: Path) -> str:
    """The hand-written provenance kept beside a results table in ``<out>.notes.md`` (what the CSV cannot hold, e.g.
    which rows an older engine made), as a Markdown paragraph for the table's report; ``""`` when there is none."""
    notes = Path(out).with_suffix(".notes.md")
    return f"Notes ({notes.name}):\n\n{notes.read_text().strip()}\n\n" if notes.exists() else ""
