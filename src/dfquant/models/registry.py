"""Resolve model names to a model plus everything needed to feed and evaluate it.

Names:
  * ``fmnist/<arch>``       — the project's Fashion-MNIST zoo (weights committed under ``assets/zoo``);
  * ``fmnist/<arch>@<dir>`` — the same architecture with the weights ``dfq train-classifier --out <dir>``
    wrote there (e.g. a SymReg/SatNL-trained variant; a SatNL recorded in its card is rebuilt);
  * ``torchvision/<name>``  — torchvision classification models with their DEFAULT weights;
  * ``timm/<name>``         — timm models (pretrained tags allowed, e.g. ``deit_small_patch16_224.fb_in1k``).
Hub weights load through the libraries' own caches; nothing is downloaded when offline,
and a missing cache is reported with the command that fills it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Callable


from dfquant.data import fmnist
from dfquant.errors import DfqError
from dfquant.hub import download_hint, offline
from dfquant.io import check_finite, load_tensors, read_json
from dfquant.models import zoo
from dfquant.models.spec import FMNIST_MEAN, FMNIST_STD, ModelSpec

def zoo_dir() -> Path:
    return Path(str(resources.files("dfquant") / "assets" / "zoo"))


def zoo_card(arch: str, folder: Path | None = None) -> dict[str, Any]:
    path = (folder or zoo_dir()) / f"fmnist_{arch}.json"
    return read_json(path, fix=f"restore it or re-train with `dfq train-classifier fmnist/{arch}`") if path.exists() else {}


def _fmnist(arch: str, pretrained: bool) -> ModelSpec:
    name = f"fmnist/{arch}"
    arch, _, folder = arch.partition("@")
    if arch not in zoo.ARCHS:
        raise DfqError(f"unknown zoo model fmnist/{arch}; choose one of: " + ", ".join(f"fmnist/{a}" for a in zoo.ARCHS))
    wdir = Path(folder) if folder else None
    if wdir is not None and not (wdir / f"fmnist_{arch}.safetensors").exists():
        raise DfqError(f"no fmnist_{arch}.safetensors in {wdir}; train it with `dfq train-classifier fmnist/{arch} --out {wdir}`")
    card = zoo_card(arch, wdir)
    model = zoo.ARCHS[arch](num_classes=len(fmnist.CLASS_NAMES))
    if card.get("satnl"):  # a robust variant trained with --satnl: same parameters, saturating activations
        from dfquant.models.robust import apply_satnl

        apply_satnl(model, **card["satnl"])
    if pretrained:
        path = (wdir or zoo_dir()) / f"fmnist_{arch}.safetensors"
        if not path.exists():
            raise DfqError(f"no weights for fmnist/{arch} at {path}; train them with `dfq train-classifier fmnist/{arch}`")
        model.load_state_dict(load_tensors(path, fix=f"re-train it with `dfq train-classifier fmnist/{arch}`"))
    return ModelSpec(name, model.eval(), (3, fmnist.SIZE, fmnist.SIZE), FMNIST_MEAN, FMNIST_STD,
                     list(fmnist.CLASS_NAMES), interpolation="bilinear", crop_pct=1.0, card=card)


def _offline_hint(name: str, exc: Exception) -> DfqError:
    source, _, arch = name.partition("/")
    fix = (download_hint(f"timm/{arch}") if source == "timm" else
           f"`python -c \"import torchvision; torchvision.models.get_model('{arch}', weights='DEFAULT')\"` (fills the torch hub cache)")
    return DfqError(f"weights for {name} are not cached and cannot be downloaded ({type(exc).__name__}); "
                    f"on a machine with internet run {fix}, or pass --random-weights")


def _torchvision(arch: str, pretrained: bool) -> ModelSpec:
    import torchvision

    if arch not in torchvision.models.list_models():
        raise DfqError(f"unknown torchvision model {arch!r}; see torchvision.models.list_models()")
    weights = torchvision.models.get_model_weights(arch).DEFAULT if pretrained else None
    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except Exception as exc:  # noqa: BLE001 - hub/network failures all mean "not cached"
        raise _offline_hint(f"torchvision/{arch}", exc) from None
    from dfquant.data.imagenet import imagenet_class_names

    t = weights.transforms() if weights is not None else None
    crop = t.crop_size[0] if t is not None else 224
    resize = t.resize_size[0] if t is not None else 256
    mean = tuple(t.mean) if t is not None else (0.485, 0.456, 0.406)
    std = tuple(t.std) if t is not None else (0.229, 0.224, 0.225)
    interp = t.interpolation.value if t is not None else "bilinear"
    return ModelSpec(f"torchvision/{arch}", model.eval(), (3, crop, crop), mean, std, imagenet_class_names(),
                     interpolation=interp, crop_pct=crop / resize)


def _timm(arch: str, pretrained: bool) -> ModelSpec:
    import timm

    base = arch.split(".")[0]
    if not timm.list_models(base) and not timm.is_model(base):
        raise DfqError(f"unknown timm model {arch!r}; see timm.list_models()")
    if pretrained:
        offline()  # no network: answer from the cache at once instead of retrying for a minute
    try:
        model = timm.create_model(arch, pretrained=pretrained)
    except Exception as exc:  # noqa: BLE001
        raise _offline_hint(f"timm/{arch}", exc) from None
    cfg = timm.data.resolve_model_data_config(model)
    from dfquant.data.imagenet import imagenet_class_names

    names = imagenet_class_names() if model.num_classes == 1000 else [f"class {i}" for i in range(model.num_classes)]
    return ModelSpec(f"timm/{arch}", model.eval(), tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                     names, interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"])


_SOURCES: dict[str, Callable[[str, bool], ModelSpec]] = {"fmnist": _fmnist, "torchvision": _torchvision, "timm": _timm}


def list_models() -> list[str]:
    return [f"fmnist/{a}" for a in zoo.ARCHS] + ["fmnist/<arch>@<dir>", "torchvision/<name>", "timm/<name>[.<tag>]"]


def get_model(name: str, pretrained: bool = True) -> ModelSpec:
    """Resolve ``name`` (see module doc) into a :class:`ModelSpec` in eval mode."""
    source, _, arch = name.partition("/")
    if source not in _SOURCES or not arch:
        raise DfqError(f"unknown model name {name!r}; use one of: " + ", ".join(list_models()))
    spec = _SOURCES[source](arch, pretrained)
    if pretrained:
        check_finite(spec.model.state_dict().items(), f"model {name}", "restore or re-train its weights")
    spec.source = {"name": name}
    return spec
