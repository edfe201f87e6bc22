"""Loading text-to-image pipelines (hub id, local folder, or the embedded mini generator)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def mini_generator_dir() -> Path:
    return Path(str(resources.files("dfquant") / "assets" / "generator"))
