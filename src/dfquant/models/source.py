"""Any ``nn.Module`` as a dfq model: ``path/to/file.py:factory`` or ``package.module:factory``
references, user weights, preprocessing and class names, and rebuilding the full-precision model
of a quantized folder from what it recorded (``model_source`` + ``preprocess``).

Registry names (``fmnist/...``, ``torchvision/...``, ``timm/...``) go to :mod:`dfquant.models.registry`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.models.registry import ModelSpec, get_model

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


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (``.pt``/``.pth``/``.safetensors``; nested under ``state_dict``/``model``,
    ``module.`` prefixes of DataParallel checkpoints removed) strictly into ``model``."""
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
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise DfqError(f"--weights {path} does not match the model: {len(missing)} missing keys (first: "
                       f"{missing[0] if missing else '-'}), {len(unexpected)} unexpected (first: "
                       f"{unexpected[0] if unexpected else '-'}); pass the weights of this architecture")
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


def custom_spec(ref: str, weights: str | Path | None = None, num_classes: int | None = None,
                class_names: str | Path | Sequence[str] | None = None, size: int | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ModelSpec:
    """A :class:`ModelSpec` for ``path/to/file.py:factory`` (or ``package.module:factory``), checked by
    one forward pass on an example input before anything is written."""
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
    s = size or (dc["input_size"][-1] if dc else 224)
    input_size = (3, s, s)
    mean = tuple(mean) if mean else dc.get("mean", IMAGENET_MEAN)
    std = tuple(std) if std else dc.get("std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        raise DfqError("--mean and --std take three values each (one per RGB channel)")
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_size))
    except Exception as exc:  # noqa: BLE001
        raise DfqError(f"{ref} fails on an input of shape (1, {', '.join(map(str, input_size))}): "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; pass --size for its input size") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DfqError(f"{ref} must return class logits of shape (batch, classes), got "
                       f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    n_out = out.shape[1]
    names = _class_names(class_names, n_out)
    source = {"factory": _absolute(ref), "num_classes": num_classes}
    return ModelSpec(ref, model, input_size, mean, std, names, interpolation=dc.get("interpolation", "bilinear"),
                     crop_pct=dc.get("crop_pct", 0.875), source=source)


def _absolute(ref: str) -> str:
    target, _, fn = ref.rpartition(":")
    return f"{Path(target).resolve()}:{fn}" if target.endswith(".py") else ref


def _class_names(names: str | Path | Sequence[str] | None, n_out: int) -> list[str]:
    if names is None:
        return [f"class {i}" for i in range(n_out)]
    if isinstance(names, (str, Path)):
        path = Path(names)
        if not path.is_file():
            raise DfqError(f"--class-names {path} not found; pass a text file with one class name per line")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != n_out:
        raise DfqError(f"--class-names lists {len(names)} classes but the model has {n_out} outputs; give one name per output")
    return list(names)


def resolve_model(ref: str, pretrained: bool = True, **custom: Any) -> ModelSpec:
    """A registry name or a factory reference (``custom``: :func:`custom_spec`'s options)."""
    if is_factory_ref(ref):
        return custom_spec(ref, **custom)
    given = [k for k, v in custom.items() if v is not None]
    if given:
        raise DfqError(f"--{given[0].replace('_', '-')} applies to --model path/to/file.py:factory, not to registry name {ref!r}")
    return get_model(ref, pretrained=pretrained)


def spec_from_record(record: dict) -> ModelSpec:
    """The full-precision model (architecture only; weights come from the checkpoint) and preprocessing
    a quantized folder recorded."""
    source = record.get("model_source") or {"name": record["model"]}
    pre = record.get("preprocess") or {}
    if "factory" in source:
        size = pre["input_size"][-1] if "input_size" in pre else None
        spec = custom_spec(source["factory"], num_classes=source.get("num_classes"), size=size)
    else:
        spec = get_model(source["name"], pretrained=False)
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "class_names"):
        if key in pre:
            setattr(spec, key, tuple(pre[key]) if key in ("input_size", "mean", "std") else pre[key])
    return spec


def load_quantized_spec(ckpt_dir: str | Path) -> tuple[ModelSpec, nn.Module]:
    """Reopen a quantized folder with no model at hand: (its FP model spec, the quantized model)."""
    from dfquant.quant.checkpoint import load_quantized, read_record

    spec = spec_from_record(read_record(Path(ckpt_dir)))
    return spec, load_quantized(Path(ckpt_dir), spec.model, example_input=torch.zeros(1, *spec.input_size))
