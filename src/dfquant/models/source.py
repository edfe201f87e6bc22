"""Any ``nn.Module`` as a dfq model: ``path/to/file.py:factory`` or ``package.module:factory``
references, user weights, preprocessing and class names, and rebuilding the full-precision model
of a quantized folder from what it recorded (``model_source`` + ``preprocess``).

Registry names (``fmnist/...``, ``torchvision/...``, ``timm/...``) go to :mod:`dfquant.models.registry`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.models.registry import get_model
from dfquant.models.spec import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_factory_ref(ref: str) -> bool:
    return ":" in ref and not Path(ref).is_dir()


def _load_factory(ref: str):
    target, _, fn = ref.rpartition(":")
    if not fn:
        raise DfqError(f"--model {ref!r} names no factory; write it as path/to/file.py:factory or package.module:factory")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise DfqError(f"model file {path} not found; pass an existing path/to/file.py:factory")
        spec = importlib.util.spec_from_file_location(f"dfq_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's file failed to import
            raise DfqError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise DfqError(f"cannot import {target!r} ({exc}); pass path/to/file.py:factory or an importable module") from None
    factory = getattr(module, fn, None)
    if not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise DfqError(f"{target} has no factory {fn!r}; define it there (callables found: {', '.join(names) or 'none'})")
    return factory


# Buffers a checkpoint may lack without changing the model: BatchNorm's step counter did not exist
# before PyTorch 1.0 (and is unused with a fixed momentum), so checkpoints of that time omit it.
_OPTIONAL_KEYS = ("num_batches_tracked",)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (``.pt``/``.pth``/``.th``/``.safetensors``; nested under ``state_dict``/``model``,
    ``module.`` prefixes of DataParallel checkpoints removed) into ``model``, as strictly as
    ``load_state_dict(strict=True)`` would, except that BN ``num_batches_tracked`` may be absent."""
    path = Path(path)
    if not path.is_file():
        raise DfqError(f"--weights {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise DfqError(f"--weights {path} is not a torch state dict ({type(exc).__name__}); save one with "
                           "torch.save(model.state_dict(), PATH)") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DfqError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and k.rpartition(".")[2] not in _OPTIONAL_KEYS]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise DfqError(f"--weights {path} does not match the model: {len(missing)} missing keys (first: "
                       f"{', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected (first: "
                       f"{', '.join(unexpected[:3]) or '-'}); pass the weights of this architecture")
    for k in own:  # the absent counters keep their fresh value, as torch leaves them
        if k not in state:
            state[k] = own[k]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DfqError(f"--weights {path} does not fit the model: {str(exc).splitlines()[-1].strip()}") from None


def _data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config when the model carries one (size, mean, std, interpolation, crop)."""
    if getattr(model, "pretrained_cfg", None) is None:
        return {}
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    return {"input_size": tuple(cfg["input_size"]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
            "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"]}


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass
class ModelArgs:
    """How a model is described, the same in every command, run config and Python call: a registry
    name or ``file.py:factory``, its weights and label space, and its preprocessing. ``None`` keeps
    what the model carries (a registry model's card, timm's data config); a custom model without one
    is fed without a crop (resize the short side to ``size``, centre-crop ``size``), and without
    ``size`` the images' own size decides (:func:`ensure_input_size`)."""

    model: str
    weights: str | Path | None = None
    num_classes: int | None = None
    class_names: str | Path | Sequence[str] | None = None
    size: int | None = None
    resize: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    pretrained: bool = True

    def preprocess_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("size", "resize", "crop_pct", "interpolation", "mean", "std", "class_names")
                if getattr(self, k) is not None}


def custom_spec(ref: str, weights: str | Path | None = None, num_classes: int | None = None) -> ModelSpec:
    """A :class:`ModelSpec` for ``path/to/file.py:factory`` (or ``package.module:factory``); its preprocessing
    is the timm data config it carries, else none yet (:func:`apply_preprocess` fills it in)."""
    factory = _load_factory(ref)
    kwargs = {}
    if num_classes is not None:
        if "num_classes" not in inspect.signature(factory).parameters and not any(
                p.kind == p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()):
            raise DfqError(f"{ref} takes no num_classes argument; drop --num-classes or add the parameter")
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise DfqError(f"{ref}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise DfqError(f"{ref} returned a {type(model).__name__}, not a torch nn.Module")
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    dc = _data_config(model)
    spec = ModelSpec(ref, model, dc.get("input_size"), dc.get("mean", IMAGENET_MEAN), dc.get("std", IMAGENET_STD), [],
                     interpolation=dc.get("interpolation", "bilinear"), crop_pct=dc.get("crop_pct", 1.0),
                     source={"factory": _absolute(ref), "num_classes": num_classes})
    spec.card["data_config"] = bool(dc)
    return spec


def apply_preprocess(spec: ModelSpec, size: int | None = None, resize: int | None = None, crop_pct: float | None = None,
                     interpolation: str | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, class_names: str | Path | Sequence[str] | None = None) -> ModelSpec:
    """Override ``spec``'s preprocessing and class names with what the user gave, checked; then, when the
    input size is known, check the model on it (one forward pass) before anything is written."""
    channels = spec.input_size[0] if spec.input_size else 3
    if size is not None:
        if size < 1:
            raise DfqError(f"--size {size} must be a positive number of pixels")
        spec.input_size = (channels, size, size)
    for what, values in (("mean", mean), ("std", std)):
        if values is not None:
            values = tuple(float(v) for v in values)
            if len(values) != channels:
                raise DfqError(f"--{what} has {len(values)} values but the model takes {channels} channels; give one per channel")
            if what == "std" and min(values) <= 0:
                raise DfqError(f"--std {','.join(f'{v:g}' for v in values)} must be positive")
            setattr(spec, what, values)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise DfqError(f"--interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        spec.interpolation = interpolation
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise DfqError(f"--crop-pct {crop_pct:g} must be in (0, 1]; 1 means no crop")
        spec.crop_pct, spec.resize = float(crop_pct), None
    if resize is not None:
        if crop_pct is not None:
            raise DfqError("--resize and --crop-pct both set the resize before the crop; pass one of them")
        spec.resize = int(resize)
    if spec.resize is not None and spec.input_size and spec.resize < spec.input_size[-1]:
        raise DfqError(f"--resize {spec.resize} is smaller than the input size {spec.input_size[-1]}; "
                       "the short side is resized before the centre crop, so pass --resize >= --size")
    if class_names is not None or not spec.class_names:
        spec.class_names = class_names  # checked against the outputs in check_forward (or below)
    if spec.input_size is not None:
        check_forward(spec)
    elif not isinstance(spec.class_names, list):
        spec.class_names = _class_names(spec.class_names, None)
    return spec


def check_forward(spec: ModelSpec) -> None:
    """One forward pass at the input size: the model must return (batch, classes) logits, and the class
    names (given, or ``class i``) must match the outputs."""
    try:
        with torch.no_grad():
            out = spec.model(torch.zeros(1, *spec.input_size))
    except Exception as exc:  # noqa: BLE001
        raise DfqError(f"{spec.name} fails on an input of shape (1, {', '.join(map(str, spec.input_size))}): "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; pass --size for its input size") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DfqError(f"{spec.name} must return class logits of shape (batch, classes), got "
                       f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    spec.class_names = _class_names(spec.class_names or None, out.shape[1])


def ensure_input_size(spec: ModelSpec, folder: str | Path | None) -> ModelSpec:
    """Give a model without a known input size the size of the images in ``folder`` (said in one line);
    with neither, ask for ``--size`` instead of guessing 224."""
    if spec.input_size is not None:
        return spec
    if folder is None or not Path(folder).is_dir():
        raise DfqError(f"{spec.name} carries no input size; pass --size (its training resolution, e.g. 32 or 224)")
    from dfquant.data.folders import image_size, list_images

    first = list_images(folder)[0]
    h, w = image_size(first)
    warnings.warn(f"--size not given and {spec.name} carries no data config: using the images' size {min(h, w)} "
                  f"(from {first}); pass --size to choose", stacklevel=2)
    spec.input_size = (3, min(h, w), min(h, w))
    check_forward(spec)
    return spec


def _absolute(ref: str) -> str:
    target, _, fn = ref.rpartition(":")
    return f"{Path(target).resolve()}:{fn}" if target.endswith(".py") else ref


def _class_names(names: str | Path | Sequence[str] | None, n_out: int | None) -> list[str]:
    if names is None:
        return [f"class {i}" for i in range(n_out or 0)]
    if isinstance(names, (str, Path)):
        path = Path(names)
        if not path.is_file():
            raise DfqError(f"--class-names {path} not found; pass a text file with one class name per line")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if n_out is not None and len(names) != n_out:
        raise DfqError(f"--class-names lists {len(names)} classes but the model has {n_out} outputs; give one name per output")
    return list(names)


def resolve_model(ref: str | ModelArgs, pretrained: bool = True, **args: Any) -> ModelSpec:
    """The :class:`ModelSpec` of a registry name or a factory reference, with ``args`` (the fields of
    :class:`ModelArgs`) applied: weights and ``num_classes`` for factories, preprocessing and class names
    for any model."""
    margs = ref if isinstance(ref, ModelArgs) else ModelArgs(ref, pretrained=pretrained, **args)
    if is_factory_ref(margs.model):
        spec = custom_spec(margs.model, margs.weights, margs.num_classes)
    else:
        for key in ("weights", "num_classes"):
            if getattr(margs, key) is not None:
                raise DfqError(f"--{key.replace('_', '-')} applies to path/to/file.py:factory models, not to registry "
                               f"name {margs.model!r}")
        spec = get_model(margs.model, pretrained=margs.pretrained)
    overrides = margs.preprocess_overrides()
    spec = apply_preprocess(spec, **overrides) if overrides or spec.input_size is None or not spec.class_names else spec
    spec.source["weights"] = str(Path(margs.weights).resolve()) if margs.weights is not None else None
    return spec


def spec_from_record(record: dict) -> ModelSpec:
    """The full-precision model (architecture only; weights come from the checkpoint) and preprocessing
    a quantized folder recorded."""
    source = record.get("model_source") or {"name": record["model"]}
    pre = record.get("preprocess") or {}
    if "factory" in source:
        spec = custom_spec(source["factory"], num_classes=source.get("num_classes"))
    elif "name" in source:
        spec = get_model(source["name"], pretrained=False)
    else:
        raise DfqError("the folder was saved from Python without a model reference, so no command can rebuild its "
                       "architecture; save it with dfquant.save(..., model='path/to/file.py:factory'), or reopen it "
                       "with dfquant.load(dir, model)")
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "resize", "class_names"):
        if pre.get(key) is not None:
            setattr(spec, key, tuple(pre[key]) if key in ("input_size", "mean", "std") else pre[key])
    if spec.input_size is None:
        raise DfqError("the quantized folder records no input size; re-create it with --size")
    check_forward(spec)
    return spec


def load_quantized_spec(ckpt_dir: str | Path, **overrides: Any) -> tuple[ModelSpec, nn.Module]:
    """Reopen a quantized folder with no model at hand: (its FP model spec, the quantized model).
    ``overrides``: preprocessing or class names that replace what the folder recorded."""
    from dfquant.quant.checkpoint import load_quantized, read_record

    for key in ("weights", "num_classes"):
        if overrides.pop(key, None) is not None:
            raise DfqError(f"--{key.replace('_', '-')} does not apply to a quantized folder: it holds its own weights")
    spec = spec_from_record(read_record(Path(ckpt_dir)))
    if overrides:
        apply_preprocess(spec, **overrides)
    return spec, load_quantized(Path(ckpt_dir), spec.model, example_input=torch.zeros(1, *spec.input_size))
