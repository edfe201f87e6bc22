"""The public Python API: ``dfquant.quantize``, ``plan``, ``save``, ``load``, ``evaluate`` and ``export``.

They take any ``nn.Module`` classifier. ``calib`` may be a tensor of normalized images, an
iterable of batches (a ``DataLoader``; ``(images, labels)`` pairs are fine, labels are ignored),
or an image folder together with the model's preprocessing ``transform``. A quantized folder
(:func:`save`) records the model reference and its preprocessing, so ``evaluate``/``export`` and
every ``dfq`` command reopen it without the model at hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.plan import QuantPlan


def _calibration(calib: Any, transform: Callable | None, limit: int | None) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        x = calib
    elif isinstance(calib, (str, Path)):
        if transform is None:
            raise DfqError(f"calib={str(calib)!r} is an image folder: pass transform= (the model's preprocessing, PIL image -> tensor)")
        from dfquant.data.folders import load_folder_images

        x = load_folder_images(calib, transform, limit=limit)
    elif isinstance(calib, Iterable):
        batches = []
        for b in calib:
            b = b[0] if isinstance(b, (list, tuple)) else b
            if not isinstance(b, torch.Tensor):
                raise DfqError(f"calib yielded a {type(b).__name__}; yield image tensors or (images, labels) pairs")
            batches.append(b)
            if limit is not None and sum(len(t) for t in batches) >= limit:
                break
        if not batches:
            raise DfqError("calib yielded no batches")
        x = torch.cat(batches)
    else:
        raise DfqError(f"calib is a {type(calib).__name__}; pass a tensor, a DataLoader of images, or an image folder with transform=")
    if x.dim() != 4:
        raise DfqError(f"calibration images must be a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    return (x[:limit] if limit is not None else x).float()


def plan(model: nn.Module, example_input: torch.Tensor, *, wbits: float = 4, abits: float = 4, algo: str = "genie-m",
         keep_fp: tuple[str, ...] | list[str] = (), units: list[str] | None = None, target: str | None = None) -> QuantPlan:
    """The quantization plan ``quantize`` would follow: units in execution order, each layer's role,
    bits and where its input is quantized, BN folds, what stays float (``print`` it for a table).
    ``target`` (e.g. ``"onnxruntime"``, :data:`~dfquant.quant.target.TARGETS`): also what the deployment
    target adds (the quantizers its integer kernels need)."""
    from dfquant.quant.api import vit_options
    from dfquant.quant.plan import make_plan
    from dfquant.quant.transform import make_quant_config

    qcfg = make_quant_config(algo, wbits, abits, keep_fp=list(keep_fp), **({"target": target} if target else {}))
    vit = vit_options(model, algo)
    if vit is not None:
        from dfquant.quant.vit import prepare_vit

        model = prepare_vit(model, qcfg, vit)
    return make_plan(model, qcfg, example_input, units)


def quantize(model: nn.Module, calib: Any, *, wbits: float, abits: float, algo: str = "genie-m", iters: int = 20000,
             batch_size: int = 32, bn_recalib: str = "none", keep_fp: tuple[str, ...] | list[str] = (),
             units: list[str] | None = None, seed: int = 0, device: str = "cpu", progress: bool = True,
             transform: Callable | None = None, n: int | None = None,
             recon: dict[str, Any] | None = None, quant: dict[str, Any] | None = None,
             target: str | None = None) -> tuple[nn.Module, dict]:
    """Quantize ``model`` (left untouched) with ``algo`` at W``wbits``A``abits`` on ``calib``; returns the
    fake-quantized model and a report (``report["plan"]`` is the :class:`QuantPlan` it followed).
    ``n`` caps the number of calibration images; ``transform`` is needed when ``calib`` is a folder.
    ``recon`` overrides fields of the algorithm's :class:`~dfquant.quant.reconstruct.ReconConfig`, e.g.
    ``{"loss_reduction": "sample", "round_weight": 0.01}`` for dfquant's maths before it matched the
    reference code (docs/reconstruction.md). ``quant`` overrides its
    :class:`~dfquant.quant.modules.QuantConfig` conventions, e.g. ``{"act_signed_step": "qmax"}``.
    ``target="onnxruntime"`` simulates what onnxruntime's integer kernels compute (docs/deployment.md), so that
    :func:`export` writes the evaluated model and it runs as integer kernels; None keeps the papers' conventions."""
    from dfquant.quant.api import quantize as quantize_tensor

    x = _calibration(calib, transform, n)
    return quantize_tensor(model.eval(), x, algo, wbits, abits, iters=iters, batch_size=batch_size, seed=seed,
                           device=device, progress=progress, bn_recalib=bn_recalib, keep_fp=tuple(keep_fp), units=units,
                           recon=recon, quant={**(quant or {}), **({"target": target} if target else {})})


def save(quant_dir: str | Path, qmodel: nn.Module, report: dict, model: str | None = None, *, weights: str | Path | None = None,
         num_classes: int | None = None, class_names: Sequence[str] | str | Path | None = None, size: int | None = None,
         resize: int | None = None, crop_pct: float | None = None, interpolation: str | None = None,
         mean: Sequence[float] | None = None, std: Sequence[float] | None = None, name: str | None = None) -> None:
    """Write ``qmodel`` (from :func:`quantize`) as a quantized folder that :func:`load` reopens.

    ``model``: the reference the ``dfq`` commands take (``path/to/file.py:factory`` or a registry name)
    with its preprocessing (``size``, ``resize``/``crop_pct``, ``interpolation``, ``mean``, ``std``) and
    ``class_names``, recorded so that ``dfq eval DIR`` / ``dfq export DIR`` / :func:`evaluate` rebuild and
    feed it as the CLI would. Without ``model`` the folder reopens only with ``load(dir, model)``."""
    from dfquant.quant.checkpoint import ModelRecord, save_quantized

    meta = {k: report[k] for k in ("units",) if k in report}
    if model is None:
        record = ModelRecord(name or "custom", {"python": name or "custom"})
    else:
        from dfquant.models.source import ModelArgs, resolve_model

        spec = resolve_model(ModelArgs(model, weights=weights, num_classes=num_classes, class_names=class_names,
                                       size=size, resize=resize, crop_pct=crop_pct, interpolation=interpolation,
                                       mean=mean, std=std, pretrained=False))
        if spec.input_size is None:
            raise DfqError(f"save(model={model!r}) needs size= (the input size it was quantized at)")
        if name is not None:
            spec.name = name
        record = spec.record()
    save_quantized(Path(quant_dir), record, qmodel, report["quant"], meta)


def _reopen(model_or_dir: nn.Module | str | Path):
    """(spec or None, module) of a module or a quantized folder."""
    if isinstance(model_or_dir, nn.Module):
        return None, model_or_dir.eval()
    from dfquant.models.source import load_quantized_spec

    return load_quantized_spec(Path(model_or_dir))


def evaluate(model_or_dir: nn.Module | str | Path, images: Any, labels: torch.Tensor | None = None, *,
             transform: Callable | None = None, limit: int | None = None, batch_size: int = 256,
             progress: bool = False):
    """Top-1 of a model (FP or quantized) or of a quantized folder, as every ``dfq`` command measures it.

    ``images``: an ImageNet-style folder (one sub-folder per class, sorted names are the labels) read
    with ``transform`` (default for a folder: the preprocessing it recorded), a tensor of normalized
    images with ``labels``, or an iterable of ``(images, labels)`` batches. ``limit``: a class-balanced
    subset with a fixed seed. Returns a :class:`~dfquant.models.evaluate.Top1` (a float percent with ``.correct``
    and ``.n``, the number of images it was measured on)."""
    from dfquant.models.evaluate import top1_loader, top1_tensors

    spec, module = _reopen(model_or_dir)
    if isinstance(images, torch.Tensor):
        if labels is None or len(labels) != len(images):
            raise DfqError("evaluate(images=<tensor>) needs labels= of the same length")
        n = len(images) if limit is None else min(limit, len(images))
        return top1_tensors(module, images[:n], labels[:n], batch_size, progress=progress)
    if isinstance(images, (str, Path)):
        from torch.utils.data import DataLoader

        if transform is None and spec is None:
            raise DfqError(f"images={str(images)!r} is a folder: pass transform= (the model's preprocessing, PIL image -> tensor)")
        from dfquant.models.evaluate import folder_dataset

        ds = folder_dataset(images, transform or spec.transform(), spec.num_classes if spec is not None else None, limit)
        return top1_loader(module, DataLoader(ds, batch_size=batch_size), progress=progress)
    if isinstance(images, Iterable):
        return top1_loader(module, images, progress=progress)
    raise DfqError(f"images is a {type(images).__name__}; pass an image folder, a tensor with labels=, or (images, labels) batches")


def export(qmodel_or_dir: nn.Module | str | Path, path: str | Path, *, input_size: tuple[int, int, int] | None = None,
           format: str = "onnx", opset: int | None = None, fuse_bias: bool = False,
           verify_images: torch.Tensor | None = None, verify_labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Export a quantized model (from :func:`quantize`/:func:`load`) or folder for deployment: ``format``
    ``onnx`` (a QuantizeLinear/DequantizeLinear graph onnxruntime runs) or ``int-state`` (integer weights
    and scales as safetensors). ``input_size`` (C, H, W) is needed for a module (a folder records it).
    With ``verify_images``/``verify_labels`` (normalized), onnxruntime is checked against the simulation and
    ``report["verify"]`` says how they agree. Returns the exporter's summary."""
    from dfquant.quant.export import DEFAULT_OPSET, FORMATS, export_int_state, export_onnx, verify_onnx

    if format not in FORMATS:
        raise DfqError(f"format={format!r} is not supported; use one of: {', '.join(FORMATS)}")
    spec, module = _reopen(qmodel_or_dir)
    if format == "int-state":
        return {"export": export_int_state(module, path)}
    size = input_size or (spec.input_size if spec is not None else None)
    if size is None:
        raise DfqError("export(<module>, ...) needs input_size=(C, H, W), the normalized input it takes")
    report: dict[str, Any] = {"export": export_onnx(module, tuple(size), path, DEFAULT_OPSET if opset is None else opset,
                                                    fuse_bias=fuse_bias)}
    if verify_images is not None:
        if verify_labels is None:
            raise DfqError("export(verify_images=...) needs verify_labels= of the same length")
        report["verify"] = verify_onnx(module, path, verify_images, verify_labels)
    return report


def load(quant_dir: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Reopen a quantized folder. ``model``: the full-precision architecture it was quantized from
    (its weights are replaced); without it, the model is rebuilt from what the folder recorded
    (a registry name or a ``file.py:factory``)."""
    if model is None:
        from dfquant.io import read_json
        from dfquant.models.source import load_quantized_spec

        record = read_json(Path(quant_dir) / "quant_config.json") if (Path(quant_dir) / "quant_config.json").exists() else {}
        if "python" in (record.get("model_source") or {}):
            raise DfqError(f"{quant_dir} was saved from Python; pass its architecture: dfquant.load(dir, model)")
        return load_quantized_spec(quant_dir)[1]
    from dfquant.quant.checkpoint import load_quantized

    return load_quantized(Path(quant_dir), model)
