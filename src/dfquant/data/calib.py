"""Resolve a calibration source into a tensor of model-ready (normalized) images.

Sources:
  * ``real`` / ``real:A``  — N random images of Fashion-MNIST split A (zoo models only;
    the real-data upper bound);
  * a ``.safetensors`` file with an ``images`` tensor (e.g. ``dfq distill`` output), or a ``.pt``
    file saved with ``torch.save`` (a tensor, or a dict with ``images``), already in the model's
    normalized input space;
  * a folder of images (``dfq generate`` output or any image folder), passed through
    the model's own preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dfquant.errors import DfqError
from dfquant.models.spec import ModelSpec


def load_calibration(source: str | Path, spec: ModelSpec, n: int = 1024, seed: int = 0, augment: str = "none",
                     augment_alpha: float = 1.0) -> torch.Tensor:
    """``n`` calibration images from ``source``; fewer than ``n`` available is an error, not a silent shortfall.

    ``augment`` (``mixup`` | ``cutmix``) mixes the ``n`` images pairwise at pixel level, deterministically per
    image index and ``seed`` (:mod:`dfquant.data.augment`): the mixup-class paper's pixel-level baselines.
    """
    images = _load(str(source), spec, n, seed)
    if len(images) < n:
        raise DfqError(f"calibration source {source} holds {len(images)} images but --n {n} asks for {n}; "
                       f"pass --n {len(images)} or add images")
    if augment != "none":
        from dfquant.data.augment import augment as mix

        images = mix(images, augment, augment_alpha, seed)
    return images


def _load(src: str, spec: ModelSpec, n: int, seed: int) -> torch.Tensor:
    if src.startswith("real"):
        split = src.partition(":")[2] or "A"
        if not spec.embedded:
            raise DfqError("`real` calibration is the embedded Fashion-MNIST split; for other models pass a folder of images")
        if split not in ("A", "B"):
            raise DfqError(f"real:{split} is not a calibration split; use real:A")
        from dfquant.data import fmnist

        x, _ = fmnist.load_split(split, limit=n, seed=seed)
        return spec.normalize(x)
    path = Path(src)
    if path.suffix in (".safetensors", ".pt", ".pth"):
        if not path.is_file():
            raise DfqError(f"{path} not found; pass an existing file (or create one with `dfq distill`)")
        images = _tensor_file(path)
        if tuple(images.shape[1:]) != tuple(spec.input_size):
            raise DfqError(f"{path} holds images of shape {tuple(images.shape[1:])} but {spec.name} takes {spec.input_size}; "
                           "save images at the model's input size")
        return images[:n].float()
    if path.is_dir():
        from dfquant.data.folders import load_folder_images

        return load_folder_images(path, spec.transform(), limit=n, size=spec.input_size[-1])
    raise DfqError(f"calibration source {src!r} not found; pass real:A, a folder of images, or a .pt/.safetensors image tensor")


def _tensor_file(path: Path) -> torch.Tensor:
    """The image tensor of a ``.safetensors`` / ``torch.save`` file: the ``images`` entry, or its only tensor."""
    if path.suffix == ".safetensors":
        from dfquant.io import load_tensors

        content = load_tensors(path, fix="save the images again (or re-create them with `dfq distill`)")
    else:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise DfqError(f"{path} is not a tensor file saved with torch.save ({type(exc).__name__})") from None
    if isinstance(content, dict):
        tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}
        content = tensors.get("images", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if not isinstance(content, torch.Tensor) or content.dim() != 4:
        raise DfqError(f"{path} must hold one (N, C, H, W) image tensor (or an 'images' entry); save it with torch.save(images, PATH)")
    return content


PROMPT_AGREEMENT_WARN = 30.0  # percent: below it the generator does not draw the classes the model knows


def prompt_agreement(spec: ModelSpec, folder: str | Path, sample: int = 256) -> dict | None:
    """Score ``sample`` generated images of ``folder`` (those its ``manifest.jsonl`` names, spread evenly)
    with the FP model: the share classified as (one of) their prompt's classes. A generator that does not
    know the model's classes (the mini world's clothes drawn for "a photo of a deer") calibrates on
    images the model cannot place; this says so before a long reconstruction. None for folders without
    a manifest or whose class names are not the model's."""
    from dfquant.data.folders import open_rgb
    from dfquant.prompts import read_manifest

    manifest = Path(folder) / "manifest.jsonl"
    if not manifest.is_file():
        return None
    rows = read_manifest(manifest)
    index = {name: i for i, name in enumerate(spec.class_names)}
    if not rows or any(name not in index for r in rows for name in r.class_names):
        return None
    pick = (list(range(len(rows))) if len(rows) <= sample
            else sorted({round(i * (len(rows) - 1) / (sample - 1)) for i in range(sample)}))
    transform = spec.transform()
    x = torch.stack([transform(open_rgb(Path(folder) / f"{rows[i].index:06d}.png")) for i in pick])
    with torch.no_grad():
        pred = torch.cat([spec.model(x[b : b + 128]).argmax(1) for b in range(0, len(x), 128)]).tolist()
    hits = sum(p in {index[c] for c in rows[i].class_names} for p, i in zip(pred, pick))
    per_image = sum(len(set(rows[i].class_names)) for i in pick) / len(pick)
    return {"images": len(pick), "share": 100.0 * hits / len(pick), "chance": 100.0 * per_image / len(spec.class_names)}


def check_generated(spec: ModelSpec, folder: str | Path, log=print) -> dict | None:
    """:func:`prompt_agreement`, logged in one line, with one warning line naming better sources when low."""
    import warnings

    res = prompt_agreement(spec, folder)
    if res is None:
        return None
    log(f"calibration check: the FP model classifies {res['share']:.1f}% of {res['images']} generated images as "
        f"their prompt's class (chance {res['chance']:.1f}%)")
    if res["share"] < PROMPT_AGREEMENT_WARN:
        warnings.warn(f"the generator does not know these classes ({res['share']:.1f}% of its images are classified as "
                      f"their prompt's class, below {PROMPT_AGREEMENT_WARN:g}%); calibrate on a folder of real images, "
                      "on BN inversion (`dfq distill`), or with a generator that knows them (e.g. --generator sd15)",
                      stacklevel=2)
    return res
