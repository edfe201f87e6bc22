"""The real SD v1.5 / SD-Turbo architectures, built offline with random weights, run the
same generation code as the mini generator (one step at 64 px)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from PIL import Image

from dfquant.data.fmnist import CLASS_NAMES
from dfquant.errors import DfqError
from dfquant.generate.architectures import random_pipeline
from dfquant.generate.pipeline import generate, preset_for
from dfquant.prompts import make_manifest

# Parameter counts of the published checkpoints (unet, vae, text encoder).
PUBLISHED = {"sd15": (859_520_964, 83_653_863, 123_060_480), "sd-turbo": (865_910_724, 83_653_863, 340_387_840)}


@pytest.mark.parametrize("family", ["sd15", "sd-turbo"])
def test_real_architecture_offline_at_tiny_resolution(family, tmp_path):
    pipe = random_pipeline(family)
    counts = tuple(sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder"))
    assert counts == PUBLISHED[family]
    preset = preset_for(family)
    rows = make_manifest(list(CLASS_NAMES), 2, "mixup", seed=0)
    generate(rows, pipe, tmp_path, steps=1, guidance=preset["guidance"], height=64, width=64, batch_size=2,
             generator_id=family, progress=False)
    images = [np.asarray(Image.open(tmp_path / f"{r.index:06d}.png")) for r in rows]
    assert all(img.shape == (64, 64, 3) for img in images)
    assert (tmp_path / "manifest.jsonl").is_file()
    del pipe
    gc.collect()


def test_unknown_architecture_is_named():
    with pytest.raises(DfqError, match="sd15, sd-turbo"):
        random_pipeline("sdxl")
