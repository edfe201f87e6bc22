"""The library's one quantization entry, :func:`quantize` (the public :func:`dfquant.quantize` resolves
the calibration data and calls it). It dispatches through :data:`~dfquant.quant.algorithms.ALGORITHMS`:
each algorithm names its runner, a key of :data:`RUNNERS`."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.algorithms import Algorithm, get_algorithm
from dfquant.quant.plan import warn_plan
from dfquant.quant.reconstruct import ReconConfig, reconstruct
from dfquant.quant.modules import QuantLayer, set_quant_state
from dfquant.quant.transform import build_quantized, make_quant_config
from dfquant.quant.vit import default_vit_options, full_precision_report, has_attention, reparameterize_layernorms

__all__ = ["RUNNERS", "build_quantized", "make_quant_config", "quantize", "vit_options"]


def vit_options(model: nn.Module, algo: str, vit: dict | None = None) -> dict | None:
    """The ViT options ``algo`` quantizes ``model`` with: ``vit`` when given, else the defaults
    (:func:`~dfquant.quant.vit.default_vit_options`) for a model with attention or a ViT algorithm, else None."""
    if vit is not None:
        return vit
    return default_vit_options(model) if get_algorithm(algo).vit or has_attention(model) else None


def quantize(model: nn.Module, calib: torch.Tensor, algo: str, wbits: float, abits: float, *,
             iters: int = 20000, batch_size: int = 32, seed: int = 0, device: str = "cpu", progress: bool = True,
             bn_recalib: str = "none", keep_fp: tuple[str, ...] | list[str] = (), units: list[str] | None = None,
             recon: dict | None = None, quant: dict | None = None, vit: dict | None = None,
             trace: list | None = None) -> tuple[nn.Module, dict]:
    """Quantize ``model`` (left untouched) with ``algo`` at W``wbits``A``abits`` on pre-normalized ``calib``
    images; returns the fake-quantized model and a report (``info["plan"]`` is the plan it followed,
    ``info["vit"]`` the ViT options it used or None).

    ``bn_recalib`` (relative | absolute | none): re-estimate the BatchNorm statistics of the quantized
    model on ``calib`` (:mod:`dfquant.quant.bn`); only presets that keep BN unfolded (Genie-M) have any.
    ``keep_fp``: module-name globs left in float; ``units``: module names to reconstruct as units.
    ``recon``: overrides of the algorithm's :class:`ReconConfig`; ``quant``: of its
    :class:`~dfquant.quant.modules.QuantConfig` conventions (e.g. ``{"act_signed_step": "qmax"}``).
    ``vit``: ViT options (default: :func:`vit_options`). ``trace``: a list the reconstruction appends
    its per-step records to. An option the algorithm cannot use is a :class:`DfqError` naming it.
    """
    from dfquant.quant.bn import batchnorms, check_bn_args

    algorithm = get_algorithm(algo)
    check_bn_args(bn_recalib, model)
    if bn_recalib != "none" and (quant or {}).get("target") is not None:
        raise DfqError(f"target={quant['target']!r} folds every BatchNorm into its conv (what the integer kernels run), "
                       f"so bn_recalib={bn_recalib!r} has nothing to re-estimate; use bn_recalib='none'",
                       params=("bn_recalib", "target"))
    if bn_recalib != "none" and not batchnorms(model):
        raise DfqError(f"bn_recalib={bn_recalib!r} re-estimates BatchNorm statistics, but the model has no BatchNorm "
                       "layers; use bn_recalib='none'", params=("bn_recalib",))
    return RUNNERS[algorithm.runner](
        model, calib, algorithm, wbits, abits, iters=iters, batch_size=batch_size, seed=seed, device=device,
        progress=progress, bn_recalib=bn_recalib, keep_fp=keep_fp, units=units, recon=recon or {}, quant=quant or {},
        vit=vit_options(model, algo, vit), trace=trace)


def _reconstruct_runner(model: nn.Module, calib: torch.Tensor, algorithm: Algorithm, wbits: float, abits: float, *,
                        iters: int, batch_size: int, seed: int, device: str, progress: bool, bn_recalib: str,
                        keep_fp, units: list[str] | None, recon: dict, quant: dict, vit: dict | None,
                        trace: list | None) -> tuple[nn.Module, dict]:
    """Block reconstruction over the units of the model's plan (:mod:`dfquant.quant.plan`)."""
    from dfquant.quant.bn import recalibrate_bn

    qcfg = make_quant_config(algorithm.name, wbits, abits, keep_fp=list(keep_fp), **quant)
    rcfg = ReconConfig.preset(algorithm.name, iters=iters, batch_size=batch_size, seed=seed, device=device, **recon)
    t0 = time.time()
    torch.manual_seed(seed)
    qmodel = build_quantized(model, qcfg, vit=vit, example_input=calib[:1], units=units)
    warn_plan(qmodel.dfq_plan)
    summary = reconstruct(qmodel, calib, rcfg, trace=trace, progress=progress)  # units: the plan's (recon_units)
    qmodel = qmodel.cpu().eval()
    n_bn = recalibrate_bn(qmodel, calib, bn_recalib, model)
    return qmodel, {"quant": qcfg, "recon": rcfg, "units": summary, "bn_recalib": bn_recalib, "bn_layers_reestimated": n_bn,
                    "plan": qmodel.dfq_plan, "vit": vit, "seconds": round(time.time() - t0, 1)}


REPQ_CALIB_IMAGES = 32      # RepQ-ViT's calibration set (the LayerNorm reparameterization and range search)
REPQ_RECON_ALGO = "qdrop"   # the preset of its optional block reconstruction (iters > 0)


def _repq_vit_runner(model: nn.Module, calib: torch.Tensor, algorithm: Algorithm, wbits: float, abits: float, *,
                     iters: int, batch_size: int, seed: int, device: str, progress: bool, bn_recalib: str,
                     keep_fp, units: list[str] | None, recon: dict, quant: dict, vit: dict | None,
                     trace: list | None) -> tuple[nn.Module, dict]:
    """RepQ-ViT on the first :data:`REPQ_CALIB_IMAGES` images, then (``iters > 0``) block reconstruction
    (the :data:`REPQ_RECON_ALGO` preset, with ``recon`` overrides) on all of ``calib``."""
    from dfquant.quant.bn import recalibrate_bn

    if units is not None:
        raise DfqError(f"{algorithm.name} calibrates every layer of the ViT at once; units= does not apply", params=("units",))
    if recon and iters <= 0:
        raise DfqError(f"recon= overrides {algorithm.name}'s optional block reconstruction, which runs only with iters > 0",
                       params=("recon", "iters"))
    options = vit if vit is not None else default_vit_options(model)
    qcfg = make_quant_config(algorithm.name, wbits, abits, keep_fp=list(keep_fp), **quant)
    rcfg = (ReconConfig.preset(REPQ_RECON_ALGO, iters=iters, batch_size=batch_size, seed=seed, device=device, **recon)
            if iters > 0 else None)
    t0 = time.time()
    torch.manual_seed(seed)
    qmodel = build_quantized(model, qcfg, vit=options, example_input=calib[:1]).eval()
    warn_plan(qmodel.dfq_plan)
    small = calib[:REPQ_CALIB_IMAGES]
    reparam = reparameterize_layernorms(qmodel, small, qcfg.weight_init) if options.get("reparam_layernorm", True) else []
    for m in qmodel.modules():
        if isinstance(m, QuantLayer) and m.aq is not None and not m.aq.initialized:
            m.aq.init_method = "psearch"
    set_quant_state(qmodel, weights=True, acts=True)
    with torch.no_grad():
        qmodel(small)  # lazy range init of every remaining quantizer, in forward order
    summary = reconstruct(qmodel, calib, rcfg, trace=trace, progress=progress) if rcfg is not None else []
    qmodel = qmodel.cpu().eval()
    n_bn = recalibrate_bn(qmodel, calib, bn_recalib, model)
    info = {"quant": qcfg, "recon": rcfg, "units": summary, "bn_recalib": bn_recalib, "bn_layers_reestimated": n_bn,
            "plan": qmodel.dfq_plan, "vit": options, "seconds": round(time.time() - t0, 1),
            "reparameterized": reparam, "full_precision_layers": full_precision_report(qmodel)}
    return qmodel, info


# Algorithm.runner -> the function that runs it; every runner takes every option of quantize()
RUNNERS: dict[str, Callable[..., tuple[nn.Module, dict]]] = {
    "reconstruct": _reconstruct_runner,
    "repq-vit": _repq_vit_runner,
}
