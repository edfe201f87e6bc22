"""Contact sheets of a generated calibration folder, to eyeball what the generator drew.

Sheets are written next to the folder, never inside it: calibration loaders read every
image under the folder, and a sheet there would become a calibration sample.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dfquant.errors import DfqError
from dfquant.data.folders import open_rgb
from dfquant.io import atomic_path

_CELL_MIN, _CELL_MAX, _PAD, _LINES = 96, 256, 4, 3


def _entries(folder: Path) -> list[dict]:
    """Manifest rows (file, prompt, strategy); an unfinished folder falls back to its PNGs without captions."""
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        try:
            rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DfqError(f"{manifest} is not valid JSON lines ({exc}); re-run `dfq generate` to rewrite it") from None
        return [r | {"file": r.get("file", f"{r['index']:06d}.png")} for r in rows if (folder / r.get("file", f"{r['index']:06d}.png")).is_file()]
    files = sorted(p.name for p in folder.glob("*.png") if re.fullmatch(r"\d{6}\.png", p.name))
    return [{"file": f, "prompt": "", "strategy": ""} for f in files]


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    """Greedy word wrap into at most _LINES lines; the last one ends in '…' when text is cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > _LINES:
        lines = lines[:_LINES]
        lines[-1] += "…"
    return [ln if draw.textlength(ln, font=font) <= width else ln[: max(1, width // 6)] + "…" for ln in lines]


def _sheet(folder: Path, entries: list[dict], out: Path) -> None:
    w0, h0 = open_rgb(folder / entries[0]["file"]).size
    side = max(w0, h0)  # small images grow by an integer factor (crisp pixels), large ones shrink to _CELL_MAX
    scale = math.ceil(_CELL_MIN / side) if side < _CELL_MIN else min(1.0, _CELL_MAX / side)
    cw, ch = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    font = ImageFont.load_default(10)
    line_h = 12
    captions = any(e.get("prompt") for e in entries) and cw >= 64  # "where space allows"
    cap_h = _LINES * line_h if captions else 0
    cols = math.ceil(math.sqrt(len(entries)))
    rows = math.ceil(len(entries) / cols)
    sheet = Image.new("RGB", (cols * (cw + _PAD) + _PAD, rows * (ch + cap_h + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, e in enumerate(entries):
        x, y = _PAD + (i % cols) * (cw + _PAD), _PAD + (i // cols) * (ch + cap_h + _PAD)
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
        sheet.paste(open_rgb(folder / e["file"]).resize((cw, ch), resample), (x, y))
        if captions:
            for j, line in enumerate(_wrap(e.get("prompt", ""), draw, font, cw)):
                draw.text((x, y + ch + j * line_h), line, fill="black", font=font)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")


def contact_sheets(folder: str | Path, out: str | Path | None = None, n: int = 64) -> list[Path]:
    """Write a captioned sheet of the first ``n`` images; one per strategy when the folder mixes them.

    Default output is ``<folder>_grid.png`` beside the folder; with several strategies the
    strategy is appended to the stem (``<stem>_<strategy>.png``). Returns the written paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DfqError(f"{folder} is not a folder; pass the --out folder of `dfq generate`")
    if n < 1:
        raise DfqError("--n must be at least 1")
    out = Path(out) if out is not None else folder.parent / f"{folder.name}_grid.png"
    if out.resolve().is_relative_to(folder.resolve()):
        raise DfqError(f"--out {out} is inside {folder}, where it would be read as a calibration image; write it elsewhere")
    entries = _entries(folder)
    if not entries:
        raise DfqError(f"no generated images (NNNNNN.png) in {folder}; run `dfq generate` first")
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e.get("strategy", ""), []).append(e)
    written = []
    for strategy, group in groups.items():
        path = out if len(groups) == 1 else out.with_name(f"{out.stem}_{re.sub(r'[^A-Za-z0-9.-]+', '-', strategy)}{out.suffix or '.png'}")
        _sheet(folder, group[:n], path)
        written.append(path)
    return written
