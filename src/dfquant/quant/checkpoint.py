"""Quantized checkpoints: ``model.safetensors`` (full state incl. quantizer parameters) +
``quant_config.json`` (model name, configs, non-tensor quantizer state, results)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dfquant.errors import DfqError
from dfquant.io import read_json, save_tensors, write_json
from dfquant.models.registry import ModelSpec, get_model
from dfquant.quant.modules import QuantConfig, QuantLayer
from dfquant.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer


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


def save_quantized(out_dir: Path, spec: ModelSpec, qmodel: nn.Module, qcfg: QuantConfig, meta: dict) -> None:
    """Write the checkpoint atomically (config last, so a folder with a config is complete)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in qmodel.state_dict().items()}
    save_tensors(out_dir / "model.safetensors", state, metadata={"model": spec.name})
    write_json(out_dir / "quant_config.json", {"model": spec.name, "quant": asdict(qcfg),
                                                "quantizers": quantizer_state(qmodel), **meta})


def load_quantized(ckpt_dir: Path) -> tuple[ModelSpec, nn.Module]:
    """Rebuild a quantized model from :func:`save_quantized` output."""
    cfg_path = ckpt_dir / "quant_config.json"
    if not cfg_path.exists():
        raise DfqError(f"{ckpt_dir} is not a quantized checkpoint (no quant_config.json); create one with `dfq quantize`")
    meta = read_json(cfg_path)
    spec = get_model(meta["model"], pretrained=False)  # every tensor comes from the checkpoint
    qcfg = QuantConfig(**meta["quant"])
    from dfquant.quant.api import build_quantized

    qmodel = build_quantized(spec.model, qcfg, init=False, vit=meta.get("vit"))
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
    state = load_file(str(ckpt_dir / "model.safetensors"))
    for name, m in qmodel.named_modules():  # per-channel buffers/params must take the saved shapes
        for pname in ("scale", "zero_point"):
            key = f"{name}.{pname}" if name else pname
            if key in state and hasattr(m, pname) and getattr(m, pname).shape != state[key].shape:
                getattr(m, pname).data = torch.empty_like(state[key])
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DfqError(f"checkpoint {ckpt_dir} does not match {meta['model']} ({len(missing)} missing, "
                       f"{len(unexpected)} unexpected tensors); re-run `dfq quantize`")
    return spec, qmodel.eval()
