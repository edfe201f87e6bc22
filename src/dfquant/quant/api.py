"""The library's quantization entry points (the public :func:`dfquant.quantize` resolves the
calibration data and calls :func:`quantize_any`)."""

from __future__ import annotations

import time

import torch
from torch import nn

from dfquant.quant.plan import warn_plan
from dfquant.quant.reconstruct import ReconConfig, reconstruct
from dfquant.quant.modules import QuantLayer, set_quant_state
from dfquant.quant.transform import build_quantized, has_attention, make_quant_config
from dfquant.quant.vit import default_vit_options, full_precision_report, reparameterize_layernorms

__all__ = ["build_quantized", "make_quant_config", "quantize", "quantize_any", "repq_vit"]


def quantize(model: nn.Module, calib: torch.Tensor, algo: str, wbits: float, abits: float,
             iters: int = 20000, batch_size: int = 32, seed: int = 0, device: str = "cpu",
             trace: list | None = None, progress: bool = True, vit: dict | None = None, bn_recalib: str = "none",
             keep_fp: tuple[str, ...] | list[str] = (), units: list[str] | None = None,
             quant: dict | None = None, **recon_overrides) -> tuple[nn.Module, dict]:
    """Quantize ``model`` with ``algo`` at W``wbits``A``abits`` on pre-normalized ``calib`` images
    by block reconstruction over the units of its plan (:mod:`dfquant.quant.plan`).

    ``bn_recalib`` (relative | absolute | none): re-estimate the BatchNorm statistics of the reconstructed
    model on ``calib`` (:mod:`dfquant.quant.bn`); only presets that keep BN unfolded (Genie-M) have any.
    ``keep_fp``: module-name globs left in float; ``units``: module names to reconstruct as units.
    ``quant``: overrides of the preset's :class:`~dfquant.quant.modules.QuantConfig` conventions (e.g.
    ``{"act_signed_step": "qmax"}``); ``recon_overrides``: of its :class:`ReconConfig`.
    """
    from dfquant.quant.bn import check_bn_args, recalibrate_bn

    check_bn_args(bn_recalib, model)
    qcfg = make_quant_config(algo, wbits, abits, keep_fp=list(keep_fp), **(quant or {}))
    rcfg = ReconConfig.preset(algo, iters=iters, batch_size=batch_size, seed=seed, device=device, **recon_overrides)
    t0 = time.time()
    torch.manual_seed(seed)
    qmodel = build_quantized(model, qcfg, vit=vit, example_input=calib[:1], units=units)
    warn_plan(qmodel.dfq_plan)
    summary = reconstruct(qmodel, calib, rcfg, trace=trace, progress=progress, units=qmodel.dfq_plan.unit_names()
                          if rcfg.granularity == "block" else None)
    qmodel = qmodel.cpu().eval()
    n_bn = recalibrate_bn(qmodel, calib, bn_recalib, model)
    return qmodel, {"quant": qcfg, "recon": rcfg, "units": summary, "bn_recalib": bn_recalib, "bn_layers_reestimated": n_bn,
                    "plan": qmodel.dfq_plan, "seconds": round(time.time() - t0, 1)}


def quantize_any(model: nn.Module, calib: torch.Tensor, algo: str, wbits: float, abits: float, iters: int,
                 batch_size: int, seed: int, device: str, vit: dict | None, progress: bool = True,
                 bn_recalib: str = "none", keep_fp: tuple[str, ...] | list[str] = (),
                 units: list[str] | None = None, recon: dict | None = None,
                 quant: dict | None = None) -> tuple[nn.Module, dict]:
    """Dispatch: RepQ-ViT for ``repq-vit``, block reconstruction otherwise. ``vit=None`` on a model with
    timm attention still quantizes its attention (the default RepQ-ViT options). ``recon``: ReconConfig
    overrides of the block reconstruction (RepQ-ViT has none); ``quant``: QuantConfig overrides of block
    reconstruction's presets."""
    if vit is None and (algo == "repq-vit" or has_attention(model)):
        vit = default_vit_options(model)
    if algo == "repq-vit":
        return repq_vit(model, calib, wbits, abits, vit, iters=iters, batch_size=batch_size, seed=seed,
                        device=device, progress=progress, keep_fp=keep_fp)
    return quantize(model, calib, algo, wbits, abits, iters, batch_size, seed, device, progress=progress, vit=vit,
                    bn_recalib=bn_recalib, keep_fp=keep_fp, units=units, quant=quant, **(recon or {}))


def repq_vit(model: nn.Module, calib: torch.Tensor, wbits: float, abits: float, options: dict | None = None,
             iters: int = 0, batch_size: int = 32, seed: int = 0, device: str = "cpu", n_calib: int = 32,
             progress: bool = True, recon_algo: str = "qdrop", keep_fp: tuple[str, ...] | list[str] = ()) -> tuple[nn.Module, dict]:
    """RepQ-ViT on ``n_calib`` images, then (``iters > 0``) block reconstruction on all of ``calib``."""
    options = options or default_vit_options(model)
    qcfg = make_quant_config("repq-vit", wbits, abits, keep_fp=list(keep_fp))
    t0 = time.time()
    torch.manual_seed(seed)
    qmodel = build_quantized(model, qcfg, vit=options, example_input=calib[:1]).eval()
    warn_plan(qmodel.dfq_plan)
    small = calib[:n_calib]
    reparam = reparameterize_layernorms(qmodel, small, qcfg.weight_init) if options.get("reparam_layernorm", True) else []
    for m in qmodel.modules():
        if isinstance(m, QuantLayer) and m.aq is not None and not m.aq.initialized:
            m.aq.init_method = "psearch"
    set_quant_state(qmodel, weights=True, acts=True)
    with torch.no_grad():
        qmodel(small)  # lazy range init of every remaining quantizer, in forward order
    units: list = []
    rcfg = None
    if iters > 0:
        rcfg = ReconConfig.preset(recon_algo, iters=iters, batch_size=batch_size, seed=seed, device=device)
        units = reconstruct(qmodel, calib, rcfg, progress=progress)
    info = {"quant": qcfg, "recon": rcfg, "units": units, "plan": qmodel.dfq_plan, "seconds": round(time.time() - t0, 1),
            "reparameterized": reparam, "full_precision_layers": full_precision_report(qmodel)}
    return qmodel.cpu().eval(), info
