"""Quantized checkpoints: ``model.safetensors`` (full state incl. quantizer parameters) +
``quant_config.json`` (configs, the quantization plan, non-tensor quantizer state, results, and
``model_source``: how to rebuild the full-precision model, which the caller resolves).

Loading needs the full-precision architecture (:func:`load_quantized` takes it); the plan saved
with the checkpoint lays it out exactly as it was quantized, without tracing it again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.io import load_tensors, read_json, save_tensors, write_json
from dfquant.quant.modules import QuantConfig, QuantLayer
from dfquant.quant.plan import QuantPlan
from dfquant.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from dfquant.quant.transform import build_quantized
from dfquant.io import check_finite


def quantizer_state(qmodel: nn.Module) -> dict[str, dict]:
    """Non-tensor state each quantizer needs to rebuild its grid exactly."""
    out: dict[str, dict] = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, (UniformQuantizer, LogSqrt2Quantizer)):
            out[name] = {"bits": m.bits, "signed": getattr(m, "signed", None), "enabled": m.enabled,
                         "initialized": m.initialized}
        elif isinstance(m, QuantLayer) and m.soft is not None:
            out[name] = {"soft": True, "hard": m.soft.hard}
    return out


@dataclass
class ModelRecord:
    """What a quantized folder records of its full-precision model: ``name``; ``source``, how to rebuild it (the
    caller resolves it; empty: ``{"name": name}``); ``preprocess``, its input size, normalization, resizing and
    class names (empty when the folder reopens only with the model at hand). A ModelSpec gives its own
    (:meth:`~dfquant.models.spec.ModelSpec.record`)."""

    name: str
    source: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)


def _conventions(qcfg: QuantConfig) -> dict:
    """The saved form of ``qcfg``: its conventions, without the quantizer constructors (``metadata["saved"]``
    false), which a checkpoint cannot hold; a model built with custom quantizers is hardened to plain ones first."""
    unsaved = [f.name for f in fields(qcfg) if not f.metadata.get("saved", True)]
    custom = [name for name in unsaved if getattr(qcfg, name) is not None]
    if custom:
        raise DfqError(f"the quantization config has {', '.join(custom)} set: a checkpoint holds plain quantizers; "
                       "harden the model and save the conventions without them (NIPQ: finalize, then nipq_config)")
    return {k: v for k, v in asdict(qcfg).items() if k not in unsaved}


# What `dfq export` writes into a checkpoint folder by default: a rewritten checkpoint makes them stale.
EXPORT_FILES = ("model.onnx", "model_int.safetensors", "export_report.json")


def save_quantized(out_dir: Path, model: ModelRecord, qmodel: nn.Module, qcfg: QuantConfig, meta: dict) -> None:
    """Write the checkpoint atomically (config last, so a folder with a config is complete).

    ``model`` is what the folder records of the full-precision model (its name, and the source and preprocessing
    that say how to rebuild and feed it). Refuses non-finite tensors
    (nothing is written then), and removes the exports of a previous checkpoint in the same folder,
    which would otherwise sit beside weights they no longer match."""
    out_dir = Path(out_dir)
    state = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}  # a shared input quantizer appears twice
    check_finite(state.items(), f"the quantized {model.name}",
                 "nothing was written; check the calibration images and lower the learning rates or the iterations")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    save_tensors(out_dir / "model.safetensors", state, metadata={"model": model.name})
    source = dict(model.source or {"name": model.name})
    plan = getattr(qmodel, "dfq_plan", None)
    write_json(out_dir / "quant_config.json", {"model": model.name, "model_source": source,
                                                "preprocess": dict(model.preprocess),
                                                "quant": _conventions(qcfg), "plan": plan.to_dict() if plan else None,
                                                "quantizers": quantizer_state(qmodel), **meta})


def read_record(ckpt_dir: Path) -> dict:
    """The ``quant_config.json`` of a checkpoint folder; a one-line error when there is none."""
    cfg_path = Path(ckpt_dir) / "quant_config.json"
    if not cfg_path.exists():
        raise DfqError(f"{ckpt_dir} is not a quantized checkpoint (no quant_config.json); create one by quantizing a model and saving it")
    meta = read_json(cfg_path, fix="quantize and save the model again")
    if not isinstance(meta, dict) or not {"model", "quant", "quantizers"} <= set(meta):
        raise DfqError(f"{cfg_path} lacks the model/quant/quantizers entries of a checkpoint; quantize and save the model again")
    return meta


def load_quantized(ckpt_dir: Path, model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """Rebuild the quantized model of ``ckpt_dir`` on the full-precision architecture ``model``
    (its weights are replaced by the checkpoint's)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_record(ckpt_dir)
    unknown = sorted(set(meta["quant"]) - {f.name for f in fields(QuantConfig)})
    if unknown:
        raise DfqError(f"{ckpt_dir / 'quant_config.json'} records quantization settings this dfquant does not know "
                       f"({', '.join(unknown)}): it was saved by another version; quantize the model again")
    qcfg = QuantConfig(**meta["quant"])
    plan = QuantPlan.from_dict(meta["plan"]) if meta.get("plan") else None  # older folders: plan from the graph
    try:
        qmodel = build_quantized(model, qcfg, init=False, vit=meta.get("vit"), plan=plan, example_input=example_input)
    except AttributeError as exc:  # the plan names a module this architecture lacks
        raise DfqError(f"checkpoint {ckpt_dir} does not fit the model passed ({exc}); pass the architecture it was made from") from None
    qstate = meta["quantizers"]
    for name, m in qmodel.named_modules():
        st = qstate.get(name)
        if st is None:
            continue
        if isinstance(m, QuantLayer) and st.get("soft"):
            m.enable_soft_rounding(learn_scale=False)
            if st["hard"]:
                m.soft.harden()
        elif isinstance(m, (UniformQuantizer, LogSqrt2Quantizer)):
            m.enabled, m.initialized = st["enabled"], st["initialized"]
            if isinstance(m, UniformQuantizer):
                m.signed = st["signed"]
                m.bits = st.get("bits", m.bits)  # per-layer bit-widths (mixed precision from `dfq qat --learn-bits`)
    state = load_tensors(ckpt_dir / "model.safetensors", fix="quantize and save the model again")
    check_finite(state.items(), f"checkpoint {ckpt_dir}", "quantize and save the model again")
    for name, m in qmodel.named_modules():  # per-channel buffers/params must take the saved shapes
        for pname in ("scale", "zero_point"):
            key = f"{name}.{pname}" if name else pname
            if key in state and hasattr(m, pname) and getattr(m, pname).shape != state[key].shape:
                getattr(m, pname).data = torch.empty_like(state[key])
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DfqError(f"checkpoint {ckpt_dir} does not match {meta['model']} ({len(missing)} missing, "
                       f"{len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[0]}); pass the architecture "
                       "it was quantized from, or quantize it again")
    return qmodel.eval()
