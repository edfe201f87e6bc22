"""The public Python API: ``dfquant.quantize``, ``dfquant.plan`` and ``dfquant.load``.

They take any ``nn.Module`` classifier. ``calib`` may be a tensor of normalized images, an
iterable of batches (a ``DataLoader``; ``(images, labels)`` pairs are fine, labels are ignored),
or an image folder together with the model's preprocessing ``transform``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

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
         keep_fp: tuple[str, ...] | list[str] = (), units: list[str] | None = None) -> QuantPlan:
    """The quantization plan ``quantize`` would follow: units in execution order, each layer's role,
    bits and where its input is quantized, BN folds, what stays float (``print`` it for a table)."""
    from dfquant.quant.transform import has_attention, make_quant_config
    from dfquant.quant.plan import make_plan

    qcfg = make_quant_config(algo, wbits, abits, keep_fp=list(keep_fp))
    if algo == "repq-vit" or has_attention(model):
        from dfquant.quant.vit import default_vit_options, prepare_vit

        model = prepare_vit(model, qcfg, default_vit_options(model))
    return make_plan(model, qcfg, example_input, units)


def quantize(model: nn.Module, calib: Any, *, wbits: float, abits: float, algo: str = "genie-m", iters: int = 20000,
             batch_size: int = 32, bn_recalib: str = "none", keep_fp: tuple[str, ...] | list[str] = (),
             units: list[str] | None = None, seed: int = 0, device: str = "cpu", progress: bool = True,
             transform: Callable | None = None, n: int | None = None,
             recon: dict[str, Any] | None = None, quant: dict[str, Any] | None = None) -> tuple[nn.Module, dict]:
    """Quantize ``model`` (left untouched) with ``algo`` at W``wbits``A``abits`` on ``calib``; returns the
    fake-quantized model and a report (``report["plan"]`` is the :class:`QuantPlan` it followed).
    ``n`` caps the number of calibration images; ``transform`` is needed when ``calib`` is a folder.
    ``recon`` overrides fields of the algorithm's :class:`~dfquant.quant.reconstruct.ReconConfig`, e.g.
    ``{"loss_reduction": "sample", "round_weight": 0.01}`` for dfquant's maths before it matched the
    reference code (README, "Reconstruction maths"). ``quant`` overrides its
    :class:`~dfquant.quant.modules.QuantConfig` conventions, e.g. ``{"act_signed_step": "qmax"}``."""
    from dfquant.quant.api import quantize_any

    x = _calibration(calib, transform, n)
    return quantize_any(model.eval(), x, algo, wbits, abits, iters, batch_size, seed, device, None, progress, bn_recalib,
                        keep_fp=tuple(keep_fp), units=units, recon=recon, quant=quant)


def save(quant_dir: str | Path, qmodel: nn.Module, report: dict, name: str = "custom") -> None:
    """Write ``qmodel`` (from :func:`quantize`) as a quantized folder that :func:`load` reopens."""
    from types import SimpleNamespace

    from dfquant.quant.checkpoint import save_quantized

    spec = SimpleNamespace(name=name, source={"python": name})
    meta = {k: report[k] for k in ("units",) if k in report}
    save_quantized(Path(quant_dir), spec, qmodel, report["quant"], meta)


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
