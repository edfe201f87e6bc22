"""Loading text-to-image pipelines (hub id, local folder, or the embedded mini generator) and
generating a calibration image folder from a prompt manifest.

The output folder is the unit of reproducibility: ``settings.json`` (written first) pins
everything that changes pixels, each image is ``{index:06d}.png`` drawn from its own seeded
latents (so batch size and process count do not matter), every file lands atomically, and
``manifest.jsonl`` (written last) marks the folder complete. A killed run is resumed by
re-running the same command.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from dfquant.errors import DfqError
from dfquant.hub import download_hint, offline
from dfquant.io import atomic_path, read_json, write_json, write_text

if TYPE_CHECKING:  # heavy imports stay out of module import time (the CLI imports lazily)
    import torch
    from accelerate import PartialState
    from diffusers import StableDiffusionPipeline

    from dfquant.prompts import PromptRow

# Sampling defaults per generator family: guidance, steps (and the range that makes sense), size.
PRESETS: dict[str, dict[str, Any]] = {
    "sd15": {"guidance": 3.5, "steps": 50, "steps_range": (1, 1000), "size": 512},
    "sd-turbo": {"guidance": 0.0, "steps": 1, "steps_range": (1, 4), "size": 512},
    "mini": {"guidance": 3.5, "steps": 25, "steps_range": (1, 1000), "size": 32},
}
# Short names accepted wherever a generator id is.
ALIASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd-turbo": "stabilityai/sd-turbo"}
SCHEDULERS = {
    "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "lcm": "LCMScheduler",
}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"


def mini_generator_dir() -> Path:
    return Path(str(resources.files("dfquant") / "assets" / "generator"))


def preset_for(generator: str) -> dict[str, Any]:
    """Sampling defaults for ``generator`` (turbo models need 1-4 steps and no guidance).

    A local folder other than the mini generator gets ``size=None``: use the pipeline's
    native resolution (:func:`native_size`), since a folder can hold any architecture.
    """
    g = generator.lower()
    if g == "mini" or Path(generator).resolve() == mini_generator_dir().resolve():
        return PRESETS["mini"]
    preset = PRESETS["sd-turbo" if "turbo" in g else "sd15"]
    return preset | {"size": None} if Path(generator).is_dir() else preset


def native_size(pipe) -> int:
    """The resolution the UNet was trained at (what diffusers uses when no size is given)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def load_pipeline(generator: str, dtype: str = "float32", device: str | None = None,
                  scheduler: str | None = None) -> "StableDiffusionPipeline":
    """Load a Stable Diffusion pipeline from ``mini``, a local folder or a (cached) hub id.

    The safety checker is dropped: calibration images are never shown to anyone, and it
    would blacken some of them, biasing activation statistics.
    """
    import torch
    import diffusers
    from diffusers import StableDiffusionPipeline

    if dtype not in DTYPES:
        raise DfqError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise DfqError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    kw = dict(dtype=getattr(torch, DTYPES[dtype]), safety_checker=None, requires_safety_checker=False)
    source = ALIASES.get(generator, generator)
    if generator == "mini":
        folder = mini_generator_dir()
        if not (folder / "model_index.json").is_file():
            raise DfqError(f"the mini generator is not trained yet ({folder} missing); run `dfq train-generator`")
        pipe = StableDiffusionPipeline.from_pretrained(folder, **kw)
    elif Path(source).is_dir():
        if not (Path(source) / "model_index.json").is_file():
            raise DfqError(f"{source} is not a diffusers pipeline folder (no model_index.json); save one with save_pretrained")
        pipe = StableDiffusionPipeline.from_pretrained(source, **kw)
    elif _HUB_ID.match(source):
        hint = f"{source} is not in the Hugging Face cache; run {download_hint(source)} on a machine with internet"
        try:
            pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=offline(), **kw)
        except Exception:  # noqa: BLE001 - no network comes in many exception types; retry from the cache
            try:
                pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=True, **kw)
            except (OSError, ValueError):
                raise DfqError(hint) from None
    else:
        raise DfqError(f"generator {generator!r} is neither `mini`, a pipeline folder, nor a hub id like stabilityai/sd-turbo")
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _settings(pipe, generator_id: str, steps: int, guidance: float, height: int, width: int,
              prompt_embeds: bool) -> dict[str, Any]:
    """Everything that changes the pixels of an image (not batch size, process count or device),
    so a resume into the same folder can be refused when it would mix two different runs.
    The rows themselves are not pinned: a partial manifest resumed with the full one is fine."""
    return {"generator": generator_id, "steps": int(steps), "guidance": float(guidance), "height": height, "width": width,
            "scheduler": type(pipe.scheduler).__name__, "dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "prompt_embeds": prompt_embeds}


def _prepare_folder(out_dir: Path, settings: dict[str, Any], is_main: bool) -> None:
    """Refuse a folder made with other settings; on the main process, pin settings and sweep stray temp files."""
    path = out_dir / SETTINGS
    if path.is_file():
        old = read_json(path)
        if old != settings:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                             if old.get(k) != settings.get(k))
            raise DfqError(f"{out_dir} was generated with other settings ({diff}); use a new --out")
    elif any(out_dir.glob("*.png")):
        raise DfqError(f"{out_dir} holds images but no {SETTINGS}, so they cannot be resumed; use a new --out")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for tmp in out_dir.glob(".*.tmp"):  # left by a killed run; atomic_path names them .NAME.XXXX.tmp
            tmp.unlink(missing_ok=True)
        if not path.is_file():
            write_json(path, settings)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    img = Image.fromarray((np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _decodes(path: Path) -> bool:
    """True if ``path`` is a complete image. Files land atomically, but a copy, a full disk or another
    tool can still leave a truncated PNG under its final name; resume re-renders those."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError):  # missing, truncated or not an image
        return False


def generate(rows: Sequence["PromptRow"], pipe: "StableDiffusionPipeline", out_dir: str | os.PathLike, *,
             steps: int, guidance: float, height: int, width: int, batch_size: int = 32, generator_id: str = "",
             prompt_embeds: "torch.Tensor | None" = None, state: "PartialState | None" = None,
             progress: bool = True) -> Path:
    """Write one PNG per manifest row into ``out_dir`` (resumable, atomic) and then ``manifest.jsonl``.

    ``prompt_embeds`` (optional, ``[len(rows), seq, dim]``) replaces the text of each row, the
    hook for learned prompts. With an accelerate ``state`` each process renders its share of
    the missing images; the main process writes the manifest once all are done.
    Returns the manifest path.
    """
    import torch
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if batch_size < 1:
        raise DfqError("--batch-size must be at least 1")
    vsf = pipe.vae_scale_factor
    if height % vsf or width % vsf:
        raise DfqError(f"--height and --width must be multiples of {vsf} for this generator")
    if prompt_embeds is not None and len(prompt_embeds) != len(rows):
        raise DfqError(f"prompt_embeds has {len(prompt_embeds)} rows but the manifest has {len(rows)}")
    if len({r.index for r in rows}) != len(rows):
        raise DfqError("the manifest repeats image indices; recreate it with `dfq prompts`")
    is_main = state is None or state.is_main_process
    settings = _settings(pipe, generator_id, steps, guidance, height, width, prompt_embeds is not None)
    _prepare_folder(out_dir, settings, is_main)
    if state is not None:
        state.wait_for_everyone()  # every process sees the same finished PNGs before splitting the rest

    todo = [i for i, r in enumerate(rows) if not _decodes(out_dir / f"{r.index:06d}.png")]
    if state is not None and state.num_processes > 1:
        with state.split_between_processes(todo) as mine:
            todo = list(mine)
    device, dtype = pipe._execution_device, pipe.unet.dtype
    shape = (pipe.unet.config.in_channels, height // vsf, width // vsf)
    rank = f"[{state.process_index}/{state.num_processes}]" if state is not None and state.num_processes > 1 else ""
    bar = tqdm(total=len(todo), desc="generate" + rank, unit="img", disable=not progress,
               position=state.process_index if state is not None else 0)
    for b in range(0, len(todo), batch_size):
        chunk = todo[b : b + batch_size]
        # One CPU generator per image: the latents and any later sampler noise (euler-a, lcm)
        # depend on the row's seed only, never on its batch neighbours or the process.
        gens = [torch.Generator().manual_seed(rows[i].seed) for i in chunk]
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
        text = dict(prompt=[rows[i].prompt for i in chunk]) if prompt_embeds is None else \
            dict(prompt_embeds=prompt_embeds[chunk].to(device, dtype))
        with torch.inference_mode():
            images = pipe(**text, latents=latents, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                          height=height, width=width, output_type="np").images
        for i, img in zip(chunk, images):
            _save_png(img, out_dir / f"{rows[i].index:06d}.png")
        bar.update(len(chunk))
    bar.close()

    manifest = out_dir / MANIFEST
    if state is not None:
        state.wait_for_everyone()
    if is_main:
        missing = [r.index for r in rows if not (out_dir / f"{r.index:06d}.png").exists()]
        if missing:
            raise DfqError(f"{len(missing)} images are missing in {out_dir} (first {missing[0]:06d}.png); re-run to resume")
        lines = (json.dumps({"index": r.index, "file": f"{r.index:06d}.png", "prompt": r.prompt, "classes": r.classes,
                             "class_names": r.class_names, "seed": r.seed, "strategy": r.strategy,
                             "generator": generator_id, "settings": settings}) for r in rows)
        write_text(manifest, "".join(line + "\n" for line in lines))
    return manifest
