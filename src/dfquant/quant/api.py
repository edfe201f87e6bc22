"""High-level quantization entry points used by the CLI and ``dfq run``."""

from __future__ import annotations

import time

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.modules import QuantConfig
from dfquant.quant.quantizers import check_bits
from dfquant.quant.reconstruct import ReconConfig, reconstruct
from dfquant.quant.algorithms import get_algorithm
from dfquant.quant.transform import quantize_model


def make_quant_config(algo: str, wbits: float, abits: float, **overrides) -> QuantConfig:
    """The preset conventions for ``algo`` at WxAy."""
    for b, what in ((wbits, "--wbits"), (abits, "--abits")):
        try:
            check_bits(b)
        except ValueError:
            raise DfqError(f"{what} {b} is not supported; use an integer from 2 to 8 (or 1.58 for ternary weights)") from None
    if abits == 1.58:
        raise DfqError("ternary (1.58) applies to weights only; use --abits 2..8")
    return QuantConfig(wbits=wbits, abits=abits, **{**get_algorithm(algo).quant, **overrides})


def build_quantized(model: nn.Module, qcfg: QuantConfig, init: bool = True, vit: dict | None = None) -> nn.Module:
    """Wrap ``model`` for quantization (ViTs get quantized attention first)."""
    if vit is not None:
        from dfquant.quant.vit import prepare_vit

        model = prepare_vit(model, qcfg, vit)
    return quantize_model(model, qcfg, init=init)


def quantize(model: nn.Module, calib: torch.Tensor, algo: str, wbits: float, abits: float,
             iters: int = 20000, batch_size: int = 32, seed: int = 0, device: str = "cpu",
             trace: list | None = None, progress: bool = True, vit: dict | None = None, bn_recalib: str = "none",
             **recon_overrides) -> tuple[nn.Module, dict]:
    """Quantize ``model`` with ``algo`` at W``wbits``A``abits`` on pre-normalized ``calib`` images.

    ``bn_recalib`` (relative | absolute | none): re-estimate the BatchNorm statistics of the reconstructed
    model on ``calib`` (:mod:`dfquant.quant.bn`); only presets that keep BN unfolded (Genie-M) have any.
    """
    from dfquant.quant.bn import check_bn_args, recalibrate_bn

    check_bn_args(bn_recalib, model)
    qcfg = make_quant_config(algo, wbits, abits)
    rcfg = ReconConfig.preset(algo, iters=iters, batch_size=batch_size, seed=seed, device=device, **recon_overrides)
    t0 = time.time()
    torch.manual_seed(seed)
    qmodel = build_quantized(model, qcfg, vit=vit)
    if trace is None and progress:
        from dfquant.quant.eta import EtaTrace, unit_forward_seconds
        from dfquant.quant.transform import recon_units

        names = recon_units(qmodel, rcfg.granularity)
        trace = EtaTrace(unit_forward_seconds(qmodel, names, calib[:batch_size]), rcfg.iters)
    units = reconstruct(qmodel, calib, rcfg, trace=trace, progress=progress)
    qmodel = qmodel.cpu().eval()
    n_bn = recalibrate_bn(qmodel, calib, bn_recalib, model)
    return qmodel, {"quant": qcfg, "recon": rcfg, "units": units, "bn_recalib": bn_recalib, "bn_layers_reestimated": n_bn,
                    "seconds": round(time.time() - t0, 1)}


def run_quantize(model_name: str, calib_source: str, wbits: float, abits: float, algo: str, iters: int, n: int,
                 batch_size: int, seed: int, out, val=None, eval_limit: int | None = None, device: str = "cpu",
                 progress: bool = True, calib: torch.Tensor | None = None, fp_top1: float | None = None,
                 joint_iters: int = 0, bn_recalib: str = "none") -> dict:
    """CLI-level job: resolve model and calibration, quantize, evaluate, write checkpoint + results."""
    from pathlib import Path

    from dfquant.data.calib import load_calibration
    from dfquant.evaluate import evaluate
    from dfquant.io import versions, write_json
    from dfquant.models.registry import get_model
    from dfquant.quant.checkpoint import save_quantized

    make_quant_config(algo, wbits, abits)  # validate before any slow work
    spec = get_model(model_name)
    calib = load_calibration(calib_source, spec, n, seed) if calib is None else calib
    if fp_top1 is None:
        fp_top1 = evaluate(spec, val_dir=val, limit=eval_limit, progress=progress)
    vit = None
    if algo == "repq-vit" or spec.is_vit:
        from dfquant.quant.vit import default_vit_options

        vit = default_vit_options(spec.model)
    qmodel, info = quantize_any(spec.model, calib, algo, wbits, abits, iters, batch_size, seed, device, vit, progress,
                                bn_recalib)
    if joint_iters > 0:
        from dfquant.quant.joint import joint_finetune

        Path(out).mkdir(parents=True, exist_ok=True)
        joint_finetune(qmodel, calib, joint_iters, batch_size, seed=seed, resume=Path(out) / "joint_resume.pt",
                       progress=progress)
    q_top1 = evaluate(spec, qmodel, val_dir=val, limit=eval_limit, progress=progress)
    meta = {"algo": algo, "wbits": wbits, "abits": abits, "calib": str(calib_source), "n_calib": len(calib),
            "iters": iters, "joint_iters": joint_iters, "bn_recalib": bn_recalib, "batch_size": batch_size, "seed": seed, "fp_top1": fp_top1, "q_top1": q_top1,
            "seconds": info["seconds"], "units": info["units"], "vit": vit, "versions": versions(),
            "recon": {k: v for k, v in vars(info["recon"]).items()} if info.get("recon") else None,
            "full_precision_layers": info.get("full_precision_layers", [])}
    save_quantized(Path(out), spec, qmodel, info["quant"], meta)
    write_json(Path(out) / "results.json", {k: meta[k] for k in ("algo", "wbits", "abits", "calib", "n_calib", "iters",
                                                                   "seed", "fp_top1", "q_top1", "seconds")})
    return meta


def quantize_any(model: nn.Module, calib: torch.Tensor, algo: str, wbits: float, abits: float, iters: int,
                 batch_size: int, seed: int, device: str, vit: dict | None, progress: bool = True,
                 bn_recalib: str = "none") -> tuple[nn.Module, dict]:
    """Dispatch: RepQ-ViT for ``repq-vit``, block reconstruction otherwise."""
    if algo == "repq-vit":
        from dfquant.quant.vit import repq_vit

        return repq_vit(model, calib, wbits, abits, vit, iters=iters, batch_size=batch_size, seed=seed,
                        device=device, progress=progress)
    return quantize(model, calib, algo, wbits, abits, iters, batch_size, seed, device, progress=progress, vit=vit,
                    bn_recalib=bn_recalib)
