"""Mean ± std over seeds of `dfq analyze` folders, as one Markdown table.

The paper's analyses are single runs; repeating them with other calibration sets and
seeds shows which of their differences survive. Usage:

    python benchmarks/analysis_seeds.py DIR_SEED0 DIR_SEED1 DIR_SEED2 --out results/x/seeds.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfquant.analysis.summary import analysis_table
from dfquant.errors import DfqError
from dfquant.io import write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="`dfq analyze --out` folders, one per seed")
    ap.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    args = ap.parse_args()
    try:
        table = analysis_table(args.dirs)
    except DfqError as e:
        sys.exit(f"error: {e}")
    folders = ", ".join(f"`{d}`" for d in args.dirs)
    write_text(args.out, f"# dfq analyze over {len(args.dirs)} folders\n\nFolders: {folders}\n\n"
               "Each cell: mean ± sample std (number of folders).\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
