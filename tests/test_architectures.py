"""The real architectures, built offline with random weights: published parameter counts on the
meta device (nothing allocated: FLUX.1 alone is 12B parameters), and SD v1.5 / SD-Turbo run
through the same generation code as the mini generator (one step at 64 px; their random weights are views into
one shared buffer, so the 1.07B parameters neither take 4.3 GB nor a draw of random numbers each)."""

from __future__ import annotations

import gc

import diffusers
import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from PIL import Image

from dfquant.data.fmnist import CLASS_NAMES
from dfquant.errors import DfqError
from architectures import ARCHITECTURES, _components, materialize_, random_pipeline
from dfquant.generate.pipeline import PRESETS, generate
from dfquant.prompts import make_manifest

CLIP_L, CLIP_L_PROJ, CLIP_G = 123_060_480, 123_650_304, 694_659_840  # OpenAI ViT-L/14, + its 768x768 projection, OpenCLIP bigG
T5_XXL, VAE_SD, VAE_16 = 4_762_310_656, 83_653_863, 83_819_683      # T5 v1.1 XXL encoder, SD VAE, 16-channel SD3/FLUX VAE
# Parameter counts of the published checkpoints, per component.
PUBLISHED = {
    "sd15": dict(unet=859_520_964, vae=VAE_SD, text_encoder=CLIP_L),
    "sd-turbo": dict(unet=865_910_724, vae=VAE_SD, text_encoder=340_387_840),
    "sdxl-turbo": dict(unet=2_567_463_684, vae=VAE_SD, text_encoder=CLIP_L, text_encoder_2=CLIP_G),
    # MMDiT-X, "2.5B" with its 384x384x1536 position table (a buffer in diffusers, 226,492,416 values).
    "sd35-medium": dict(transformer=2_243_171_520, vae=VAE_16, text_encoder=CLIP_L_PROJ, text_encoder_2=CLIP_G,
                        text_encoder_3=T5_XXL),
    # FLUX.1 [dev]'s 11,901,408,320 without the 10,229,760-parameter guidance embedder schnell lacks ("12B").
    "flux-schnell": dict(transformer=11_891_178_560, vae=VAE_16, text_encoder=CLIP_L, text_encoder_2=T5_XXL),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_published_parameter_counts_on_meta(name):
    pipe = random_pipeline(name, device="meta")
    modules = {k: m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()} == PUBLISHED[name]
    assert all(p.is_meta for m in modules.values() for p in m.parameters())  # nothing was allocated
    assert type(pipe).__name__ == PRESETS[name]["pipeline"]


def test_published_sizes_at_their_rounding():
    sd35 = random_pipeline("sd35-medium", device="meta").transformer
    with_pos = sum(p.numel() for p in sd35.parameters()) + sd35.pos_embed.pos_embed.numel()
    assert round(with_pos / 1e9, 1) == 2.5
    assert round(PUBLISHED["flux-schnell"]["transformer"] / 1e9) == 12


@pytest.mark.parametrize("family", ["sd15", "sd-turbo"])
def test_real_architecture_offline_at_tiny_resolution(family, tmp_path):
    pipe = random_pipeline(family, shared_weights=True)
    assert sum(p.numel() for p in pipe.unet.parameters()) == PUBLISHED[family]["unet"]  # the full-size UNet runs
    rows = make_manifest(list(CLASS_NAMES), 2, "mixup", seed=0)
    generate(rows, pipe, tmp_path, steps=1, guidance=PRESETS[family]["guidance"], height=64, width=64, batch_size=2,
             generator_id=family, progress=False)
    images = [np.asarray(Image.open(tmp_path / f"{r.index:06d}.png")) for r in rows]
    assert all(img.shape == (64, 64, 3) for img in images)
    assert (tmp_path / "manifest.jsonl").is_file()
    del pipe
    gc.collect()


def test_unknown_architecture_is_named():
    with pytest.raises(DfqError, match="sd15, sd-turbo, sdxl-turbo, sd35-medium, flux-schnell"):
        random_pipeline("pixart-sigma")


def test_materialize_fills_an_empty_pipeline_that_then_generates(tmp_path):
    """The path the GPU benchmark takes for SDXL/SD3.5/FLUX (weights allocated on the device only),
    exercised on the tiny FLUX: empty parameters, computed buffers kept, T5 embedding re-tied."""
    with init_empty_weights():
        cls, parts = _components("flux-schnell", full=False)
    pipe = getattr(diffusers, cls)(**(parts | {"scheduler": parts["scheduler"]()}))
    assert pipe.transformer.proj_out.weight.is_meta
    materialize_(pipe, "cpu", "float32")
    t5 = pipe.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    assert not any(p.is_meta for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    rows = make_manifest(list(CLASS_NAMES), 1, "mixup", seed=0)
    generate(rows, pipe, tmp_path, steps=1, guidance=0.0, height=32, width=32, generator_id="flux", progress=False)
    img = np.asarray(Image.open(tmp_path / "000000.png"))
    assert img.shape == (32, 32, 3) and img.std() > 0
