"""Loading text-to-image pipelines (hub id, local folder, or the embedded mini generator) and
generating a calibration image folder from a prompt manifest.

The output folder is the unit of reproducibility: ``settings.json`` (written first) pins
everything that changes pixels, each image is ``{index:06d}.png`` drawn from its own seeded
latents (so batch size and process count do not matter), every file lands atomically, and
``manifest.jsonl`` (written last) marks the folder complete. A killed run is resumed by
re-running the same command.
"""

from __future__ import annotations

import inspect
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
    from diffusers import DiffusionPipeline

    from dfquant.prompts import PromptRow

# One row per generator family: where it lives, the pipeline class its model_index.json names,
# sampling steps (default and the range it is meant for), guidance, native resolution, the
# dtype it runs in on a GPU (float32 on CPU), whether the hub repository is gated, and extra
# pipeline arguments that change pixels (caption cleaning is off: it would make the prompt, and so
# the pixels, depend on whether beautifulsoup4/ftfy happen to be installed). Steps and guidance
# follow each model card.
PRESETS: dict[str, dict[str, Any]] = {
    "mini": dict(id="mini", pipeline="StableDiffusionPipeline", steps=25, steps_range=(1, 1000), guidance=3.5,
                 size=32, gpu_dtype="float32", gated=False, call={}),
    "sd15": dict(id="stable-diffusion-v1-5/stable-diffusion-v1-5", pipeline="StableDiffusionPipeline", steps=50,
                 steps_range=(1, 1000), guidance=3.5, size=512, gpu_dtype="float16", gated=False, call={}),
    "sd-turbo": dict(id="stabilityai/sd-turbo", pipeline="StableDiffusionPipeline", steps=1, steps_range=(1, 4),
                     guidance=0.0, size=512, gpu_dtype="float16", gated=False, call={}),
    "sdxl-turbo": dict(id="stabilityai/sdxl-turbo", pipeline="StableDiffusionXLPipeline", steps=1, steps_range=(1, 4),
                       guidance=0.0, size=512, gpu_dtype="float16", gated=False, call={}),
    "sd35-medium": dict(id="stabilityai/stable-diffusion-3.5-medium", pipeline="StableDiffusion3Pipeline", steps=40,
                        steps_range=(10, 100), guidance=4.5, size=1024, gpu_dtype="bfloat16", gated=True, call={}),
    "pixart-sigma": dict(id="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", pipeline="PixArtSigmaPipeline", steps=20,
                         steps_range=(10, 100), guidance=4.5, size=1024, gpu_dtype="float16", gated=False,
                         call={"clean_caption": False}),
    "sana": dict(id="Efficient-Large-Model/Sana_1600M_1024px_diffusers", pipeline="SanaPipeline", steps=20,
                 steps_range=(10, 100), guidance=4.5, size=1024, gpu_dtype="bfloat16", gated=False,
                 call={"clean_caption": False}),
    "flux-schnell": dict(id="black-forest-labs/FLUX.1-schnell", pipeline="FluxPipeline", steps=4, steps_range=(1, 8),
                         guidance=0.0, size=1024, gpu_dtype="bfloat16", gated=False,
                         call={"max_sequence_length": 256}),
    "flux2-klein": dict(id="black-forest-labs/FLUX.2-klein-4B", pipeline="Flux2KleinPipeline", steps=4,
                        steps_range=(1, 8), guidance=1.0, size=1024, gpu_dtype="bfloat16", gated=False, call={}),
}
# Short names accepted wherever a generator id is.
ALIASES = {name: p["id"] for name, p in PRESETS.items() if name != "mini"}
SCHEDULERS = {
    "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "lcm": "LCMScheduler",
}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
# Pipelines whose weights fill more than this share of the free GPU memory are offloaded model by model.
_OFFLOAD_SHARE = 0.8


# The generators this package ships (trained here by `dfq train-generator`), by name -> assets folder.
EMBEDDED = {"mini": "generator", "mini-compose": "generator-compose"}


def mini_generator_dir(name: str = "mini") -> Path:
    """The assets folder of an embedded generator (``mini`` or ``mini-compose``)."""
    return Path(str(resources.files("dfquant") / "assets" / EMBEDDED[name]))


def _is_mini(generator: str) -> bool:
    """An embedded generator, by name or by its folder: all share the ``mini`` sampling preset."""
    return generator in EMBEDDED or any(Path(generator).resolve() == mini_generator_dir(n).resolve() for n in EMBEDDED)


def preset_for(generator: str, pipeline_class: str | None = None) -> dict[str, Any]:
    """Sampling defaults for ``generator``: its own row for a short name or a known hub id, else
    the row of its pipeline class (``model_index.json``), with ``size=None`` (= the pipeline's
    native resolution, :func:`native_size`) since a folder can hold any size of that family.

    Among rows sharing a class (sd15 / sd-turbo) an id naming "turbo" picks the turbo row. A
    class no row knows falls back to the pipeline's own ``__call__`` defaults (``steps=None``).
    """
    if _is_mini(generator):
        return PRESETS["mini"]
    if generator in PRESETS:
        return PRESETS[generator]
    known = next((p for p in PRESETS.values() if p["id"] == generator), None)
    if known is not None:
        return known
    cls = pipeline_class or _model_index_class(generator)
    rows = [p for name, p in PRESETS.items() if name != "mini" and p["pipeline"] == cls]
    if not rows:
        return dict(id=generator, pipeline=cls, steps=None, steps_range=(1, 1000), guidance=None, size=None,
                    gpu_dtype="bfloat16", gated=False, call={})
    turbo = [p for p in rows if "turbo" in p["id"]]
    row = (turbo or rows)[0] if "turbo" in generator.lower() else rows[0]
    return row | {"id": generator, "size": None}


def sampling(generator: str, pipe: "DiffusionPipeline", steps: int | None = None, guidance: float | None = None,
             height: int | None = None, width: int | None = None) -> dict[str, Any]:
    """The ``generate`` arguments for ``generator``: the given values, else its preset, else (a family
    no preset row knows) the pipeline's own ``__call__`` defaults; size defaults to the native one."""
    preset = preset_for(generator, type(pipe).__name__)
    defaults = {k: p.default for k, p in _params(type(pipe).__call__).items()}
    size = preset["size"] or native_size(pipe)
    return dict(steps=int(steps if steps is not None else preset["steps"] or defaults.get("num_inference_steps", 50)),
                guidance=float(guidance if guidance is not None else
                               preset["guidance"] if preset["guidance"] is not None else defaults.get("guidance_scale", 1.0)),
                height=height or size, width=width or size, call=dict(preset["call"]))


def denoiser(pipe: "DiffusionPipeline") -> "torch.nn.Module":
    """The network that is run at every sampling step: a UNet (SD 1.x/2.x, SDXL) or a transformer (DiT families)."""
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise DfqError(f"{type(pipe).__name__} has neither a unet nor a transformer; pass a text-to-image pipeline")
    return net


def native_size(pipe: "DiffusionPipeline") -> int:
    """The resolution the model was trained at (what diffusers itself uses when no size is given)."""
    latent = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size
    return int(latent) * int(pipe.vae_scale_factor)


def size_multiple(pipe: "DiffusionPipeline") -> int:
    """Height and width must be multiples of this: the VAE's downsampling times the denoiser's patch
    (Flux packs 2x2 latents, which its image processor's scale factor already includes)."""
    processor = getattr(pipe, "image_processor", None)
    vsf = int(processor.config.vae_scale_factor) if processor is not None else int(pipe.vae_scale_factor)
    return vsf * int(getattr(denoiser(pipe).config, "patch_size", None) or 1)


def _source(generator: str) -> str:
    """``generator`` as diffusers loads it: the mini folder, a local folder, or a hub id (short names resolved)."""
    if generator in EMBEDDED:
        folder = mini_generator_dir(generator)
        if not (folder / "model_index.json").is_file():
            how = "dfq train-generator" + (" --compose 0.33" if generator == "mini-compose" else "")
            raise DfqError(f"the {generator} generator is not trained yet ({folder} missing); run `{how}`")
        return str(folder)
    source = ALIASES.get(generator, generator)
    if Path(source).is_dir():
        if not (Path(source) / "model_index.json").is_file():
            raise DfqError(f"{source} is not a diffusers pipeline folder (no model_index.json); save one with save_pretrained")
        return source
    if not _HUB_ID.match(source):
        raise DfqError(f"generator {generator!r} is neither `mini`, a pipeline folder, a short name "
                       f"({', '.join(ALIASES)}), nor a hub id like stabilityai/sdxl-turbo")
    return source


def _model_index(source: str) -> dict[str, Any]:
    """The ``model_index.json`` of a folder or hub id (the cache first, then the hub unless
    ``HF_HUB_OFFLINE``); when it cannot be had, one line naming the download (and, for a gated
    repository, the licence and login) command."""
    if Path(source).is_dir():
        return read_json(Path(source) / "model_index.json")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    gated = any(p["id"] == source and p["gated"] for p in PRESETS.values())
    try:  # the cache first: a cached model never waits on the network
        return read_json(hf_hub_download(source, "model_index.json", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or a broken cache entry): download unless offline
        pass
    if not offline():
        try:
            return read_json(hf_hub_download(source, "model_index.json"))
        except GatedRepoError:
            gated = True
        except Exception:  # noqa: BLE001 - no network comes in many exception types
            pass
    fix = (f"accept its licence at https://huggingface.co/{source}, run `hf auth login`, then {download_hint(source)}"
           if gated else f"run {download_hint(source)}")
    raise DfqError(f"{source} {'is gated and not' if gated else 'is not'} in the Hugging Face cache; "
                   f"{fix} on a machine with internet")


def _model_index_class(generator: str) -> str:
    return str(_model_index(_source(generator)).get("_class_name", ""))


def _check_text_to_image(source: str, cls: str) -> None:
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    if cls not in {c.__name__ for c in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()}:
        raise DfqError(f"{source} holds a {cls or 'pipeline without _class_name'}, not a text-to-image pipeline; "
                       f"pass a text-to-image model ({', '.join(ALIASES)}, or its folder)")


def resolve_dtype(dtype: str | None, preset: dict[str, Any], device: str | None) -> str:
    """``None``/``auto``: the family's GPU dtype (bf16/fp16) on CUDA, float32 elsewhere."""
    if dtype in (None, "auto"):
        return preset["gpu_dtype"] if str(device or "").startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise DfqError(f"unknown dtype {dtype!r}; use one of auto, float32, float16, bfloat16")
    return DTYPES[dtype]


def load_pipeline(generator: str, dtype: str | None = "auto", device: str | None = None,
                  scheduler: str | None = None) -> "DiffusionPipeline":
    """Load any diffusers text-to-image pipeline from ``mini``, a short name, a local folder or a (cached) hub id.

    The class comes from the folder's ``model_index.json`` through ``AutoPipelineForText2Image``
    (never from the name), so SD 1.x/2.x, SDXL, SD3, PixArt, Sana, Flux and Flux.2 load alike.
    ``dtype='auto'`` is the family's preset dtype on a GPU and float32 on the CPU. The safety
    checker is dropped where there is one: calibration images are never shown to anyone, and
    it would blacken some of them, biasing activation statistics.
    """
    import torch
    import diffusers
    from diffusers import AutoPipelineForText2Image

    if scheduler is not None and scheduler not in SCHEDULERS:
        raise DfqError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    source = _source(generator)
    index = _model_index(source)
    cls = str(index.get("_class_name", ""))
    _check_text_to_image(source, cls)
    kw: dict[str, Any] = dict(dtype=getattr(torch, resolve_dtype(dtype, preset_for(generator, cls), device)))
    if "safety_checker" in index:
        kw |= dict(safety_checker=None, requires_safety_checker=False)
    if Path(source).is_dir():
        pipe = AutoPipelineForText2Image.from_pretrained(source, **kw)
    else:
        pipe = None
        for local in (True,) if offline() else (True, False):  # the cache first, then download what is missing
            try:
                pipe = AutoPipelineForText2Image.from_pretrained(source, local_files_only=local, **kw)
                break
            except Exception:  # noqa: BLE001 - missing files and no network come in many exception types
                continue
        if pipe is None:
            raise DfqError(f"{source} is only partly in the Hugging Face cache; run {download_hint(source)} "
                           "on a machine with internet")
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    if device:
        place(pipe, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def place(pipe: "DiffusionPipeline", device: str) -> None:
    """Move to ``device``. On CUDA, VAE slicing is on (one image decoded at a time, so a batch never
    decodes differently from single images, and large batches fit) and a pipeline whose weights
    do not fit the free memory is offloaded to the CPU model by model (slower, same pixels)."""
    import torch

    if not device.startswith("cuda"):
        pipe.to(device)
        return
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    weights = sum(p.numel() * p.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                  for p in m.parameters())
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if weights > _OFFLOAD_SHARE * free:
        pipe.enable_model_cpu_offload(device=device)
        if vae is not None and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()  # changes pixels slightly, so settings.json records it
    else:
        pipe.to(device)


# What each family's encode_prompt returns, in order; only the names that __call__ takes are passed on.
ENCODE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "StableDiffusionPipeline": ("prompt_embeds", "negative_prompt_embeds"),
    "StableDiffusionXLPipeline": ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                  "negative_pooled_prompt_embeds"),
    "StableDiffusion3Pipeline": ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                 "negative_pooled_prompt_embeds"),
    "PixArtSigmaPipeline": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                            "negative_prompt_attention_mask"),
    "PixArtAlphaPipeline": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                            "negative_prompt_attention_mask"),
    "SanaPipeline": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                     "negative_prompt_attention_mask"),
    "FluxPipeline": ("prompt_embeds", "pooled_prompt_embeds", "text_ids"),
    "Flux2KleinPipeline": ("prompt_embeds", "text_ids"),
}
# encode_prompt arguments that are not taken from __call__'s defaults.
_PROMPT_ARGS = {"self", "prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3",
                "device", "num_images_per_prompt", "do_classifier_free_guidance", "prompt_embeds",
                "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                "prompt_attention_mask", "negative_prompt_attention_mask", "kwargs"}


def _params(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def call_kwargs(pipe: "DiffusionPipeline", call: dict[str, Any] | None = None) -> dict[str, Any]:
    """Family-specific ``__call__`` arguments: the preset's (``call``), and resolution binning off, so
    PixArt and Sana render exactly the requested size instead of the nearest aspect-ratio bin."""
    params = _params(type(pipe).__call__)
    kw = {k: v for k, v in (call or {}).items() if k in params}
    if "use_resolution_binning" in params:
        kw["use_resolution_binning"] = False
    return kw


def encode(pipe: "DiffusionPipeline", prompts: list[str], call: dict[str, Any] | None = None,
           generator_id: str = "") -> dict[str, "torch.Tensor"]:
    """The family's own ``encode_prompt`` of ``prompts`` (no guidance), as the keyword arguments that
    ``__call__`` takes instead of ``prompt``: ``prompt_embeds`` plus pooled embeddings (SDXL, SD3,
    Flux) or attention masks (PixArt, Sana). The hook that learned prompts plug into."""
    cls = type(pipe).__name__
    name = generator_id or cls
    if "prompt_embeds" not in _params(type(pipe).__call__):
        raise DfqError(f"{name} ({cls}) takes no prompt_embeds, so learned prompts cannot drive it; "
                       "use --strategy single, template or mixup")
    if cls not in ENCODE_OUTPUTS or not hasattr(pipe, "encode_prompt"):
        raise DfqError(f"learned prompts are not wired for {cls} ({name}); use one of "
                       f"{', '.join(k for k in PRESETS if k != 'mini')} or --strategy single, template or mixup")
    enc_params = _params(pipe.encode_prompt)
    defaults = {k: p.default for k, p in _params(type(pipe).__call__).items() if p.default is not inspect.Parameter.empty}
    kw: dict[str, Any] = {k: v for k, v in (defaults | (call or {})).items() if k in enc_params and k not in _PROMPT_ARGS}
    kw |= {k: v for k, v in dict(prompt_2=None, prompt_3=None, device=pipe._execution_device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False).items() if k in enc_params}
    out = pipe.encode_prompt(prompts, **kw)
    out = out if isinstance(out, tuple) else (out,)
    call_params = _params(type(pipe).__call__)
    return {k: v for k, v in zip(ENCODE_OUTPUTS[cls], out)
            if v is not None and k in call_params and not k.startswith("negative")}


CLASS_TOKEN_WARN = 3  # a class name split into more pieces than this is likely unknown to the text encoder


def warn_split_class_names(pipe: "DiffusionPipeline", class_names: Sequence[str]) -> list[str]:
    """Warn (one line) about class names with a word the generator's tokenizer splits into more than
    :data:`CLASS_TOKEN_WARN` pieces: a text encoder that never saw a word as a whole rarely draws it
    (the mini generator reads "airplane" as 5 pieces). Returns those names."""
    import warnings

    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None or not hasattr(tokenizer, "tokenize"):
        return []
    import re

    # pieces of the worst word: punctuation ("T-shirt/top") is not what a text encoder fails to know
    split = {c: max((len(tokenizer.tokenize(w)) for w in re.findall(r"[^\W\d_]+", c)), default=0)
             for c in dict.fromkeys(class_names)}
    long = [c for c, k in split.items() if k > CLASS_TOKEN_WARN]
    if long:
        shown = ", ".join(f"{c!r} ({split[c]} pieces)" for c in long[:5]) + (f" and {len(long) - 5} more" if len(long) > 5 else "")
        warnings.warn(f"the generator's tokenizer splits a word of {len(long)} class name(s) into more than {CLASS_TOKEN_WARN} "
                      f"pieces: {shown}; it probably does not know them, so check a contact sheet (`dfq grid`) or use "
                      "a generator trained on such words", stacklevel=2)
    return long


def check_prompt_length(pipe: "DiffusionPipeline", prompts: Sequence[str], call: dict[str, Any] | None = None,
                        generator_id: str = "") -> None:
    """Refuse prompts longer than the text encoder that carries the sequence (CLIP: 77 tokens;
    T5/Gemma/Qwen: the pipeline's ``max_sequence_length``): it would silently cut mixup labels off."""
    tokenizer = next((getattr(pipe, n) for n in ("tokenizer_3", "tokenizer_2", "tokenizer")
                      if getattr(pipe, n, None) is not None), None)
    if tokenizer is None:
        return
    params = _params(type(pipe).__call__)
    limit = (call or {}).get("max_sequence_length") or (
        params["max_sequence_length"].default if "max_sequence_length" in params else tokenizer.model_max_length)
    for i, prompt in enumerate(prompts):
        n = len(tokenizer(prompt).input_ids)
        if n > limit:
            raise DfqError(f"prompt {i} is {n} tokens but {generator_id or type(pipe).__name__}'s text encoder takes "
                           f"{limit}; use fewer labels (--k), shorter class names, or a T5 family "
                           "(sd35-medium, pixart-sigma, flux-schnell)")


def _settings(pipe, generator_id: str, steps: int, guidance: float, height: int, width: int,
              prompt_embeds: bool, call: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the pixels of an image (not batch size, process count or device),
    so a resume into the same folder can be refused when it would mix two different runs.
    The rows themselves are not pinned: a partial manifest resumed with the full one is fine."""
    settings = {"generator": generator_id, "steps": int(steps), "guidance": float(guidance), "height": height,
                "width": width, "scheduler": type(pipe.scheduler).__name__,
                "dtype": str(denoiser(pipe).dtype).removeprefix("torch."), "prompt_embeds": prompt_embeds}
    if call:
        settings["call"] = call
    if getattr(getattr(pipe, "vae", None), "use_tiling", False):
        settings["vae_tiling"] = True
    return settings


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


def generate(rows: Sequence["PromptRow"], pipe: "DiffusionPipeline", out_dir: str | os.PathLike, *,
             steps: int, guidance: float, height: int, width: int, batch_size: int = 32, generator_id: str = "",
             prompt_embeds: "torch.Tensor | None" = None, call: dict[str, Any] | None = None,
             state: "PartialState | None" = None, progress: bool = True) -> Path:
    """Write one PNG per manifest row into ``out_dir`` (resumable, atomic) and then ``manifest.jsonl``.

    ``prompt_embeds`` (optional, ``[len(rows), seq, dim]``) replaces the text encoder's sequence
    output for each row, the hook for learned prompts; the family's other text inputs (pooled
    embeddings, masks) come from the row's own prompt. ``call`` holds the preset's extra pipeline
    arguments (e.g. Flux's ``max_sequence_length``). With an accelerate ``state`` each process
    renders its share of the missing images; the main process writes the manifest once all are
    done. Returns the manifest path.
    """
    import torch
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    call = dict(call or {})
    if batch_size < 1:
        raise DfqError("--batch-size must be at least 1")
    mult = size_multiple(pipe)
    if height % mult or width % mult:
        raise DfqError(f"--height and --width must be multiples of {mult} for this generator")
    if prompt_embeds is not None and len(prompt_embeds) != len(rows):
        raise DfqError(f"prompt_embeds has {len(prompt_embeds)} rows but the manifest has {len(rows)}")
    if len({r.index for r in rows}) != len(rows):
        raise DfqError("the manifest repeats image indices; recreate it with `dfq prompts`")
    if prompt_embeds is not None:
        encode(pipe, [rows[0].prompt], call, generator_id)  # refuses a family without prompt_embeds before any file
    check_prompt_length(pipe, [r.prompt for r in rows], call, generator_id)
    if prompt_embeds is None and (state is None or state.is_main_process):
        warn_split_class_names(pipe, [c for r in rows for c in r.class_names])
    is_main = state is None or state.is_main_process
    settings = _settings(pipe, generator_id, steps, guidance, height, width, prompt_embeds is not None, call)
    _prepare_folder(out_dir, settings, is_main)
    if state is not None:
        state.wait_for_everyone()  # every process sees the same finished PNGs before splitting the rest

    todo = [i for i, r in enumerate(rows) if not _decodes(out_dir / f"{r.index:06d}.png")]
    if state is not None and state.num_processes > 1:
        with state.split_between_processes(todo) as mine:
            todo = list(mine)
    extra = call_kwargs(pipe, call)
    dtype = denoiser(pipe).dtype
    rank = f"[{state.process_index}/{state.num_processes}]" if state is not None and state.num_processes > 1 else ""
    bar = tqdm(total=len(todo), desc="generate" + rank, unit="img", disable=not progress,
               position=state.process_index if state is not None else 0)
    for b in range(0, len(todo), batch_size):
        chunk = todo[b : b + batch_size]
        prompts = [rows[i].prompt for i in chunk]
        # One CPU generator per image: diffusers draws each image's latents (and any later sampler
        # noise: euler-a, lcm) from its own generator, so pixels depend on the row's seed only,
        # never on its batch neighbours, the process or the family.
        gens = [torch.Generator().manual_seed(rows[i].seed) for i in chunk]
        with torch.inference_mode():
            if prompt_embeds is None:
                text: dict[str, Any] = dict(prompt=prompts)
            else:
                text = encode(pipe, prompts, call, generator_id)
                text["prompt_embeds"] = prompt_embeds[chunk].to(pipe._execution_device, dtype)
            images = pipe(**text, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                          height=height, width=width, output_type="np", **extra).images
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
