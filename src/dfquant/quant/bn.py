"""BatchNorm re-estimation after quantization (an optional step of block PTQ and of NIPQ QAT).

Quantizing the weights (and activations) before a BatchNorm shifts the mean and variance of its
input, so the FP running statistics no longer normalize the quantized model's features.
Re-estimating them on the calibration set repairs that shift. *Relative* re-estimation measures
only the shift (quantized vs FP model, same images) and applies it to the FP statistics, so a
synthetic set whose own statistics differ from the real data does not replace them; *absolute*
re-estimation replaces the statistics by the calibration set's (the classic BN recalibration,
right when the calibration set is real data).
"""

from __future__ import annotations

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.cache import StopForward

BN_MODES = ("relative", "absolute", "none")


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def _bn_input_stats(model: nn.Module, bns: list[nn.Module], x: torch.Tensor, batch_size: int,
                    stop: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and (unbiased) variance of each BN's input over ``x``, the model in eval mode.
    ``stop`` ends each forward pass at the (single) BN, which is all a sequential update needs."""
    acc = [[0, 0.0, 0.0] for _ in bns]

    def hook(i):
        def fn(mod, inp):
            t = inp[0].detach().transpose(0, 1).reshape(mod.num_features, -1).double()
            acc[i][0] += t.shape[1]; acc[i][1] = acc[i][1] + t.sum(1); acc[i][2] = acc[i][2] + (t * t).sum(1)
            if stop:
                raise StopForward
        return fn

    handles = [bn.register_forward_pre_hook(hook(i)) for i, bn in enumerate(bns)]
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            try:
                model(x[i : i + batch_size])
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    out = []
    for n, s, ss in acc:
        mean = s / n
        var = (ss / n - mean * mean) * n / max(n - 1, 1)
        out.append((mean.float(), var.clamp_min(0).float()))
    return out


@torch.no_grad()
def reestimate_bn(model: nn.Module, calib: torch.Tensor, batch_size: int = 64, n: int | None = None,
                  reference: nn.Module | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` on ``calib``; return the number of BN layers.

    Without ``reference`` (*absolute*): the statistics are replaced by those of ``calib`` (standard BN
    re-estimation: BN in train mode, cumulative average over the batches).

    With ``reference`` (*relative*, the full-precision model whose BN layers correspond one to one):
    only the shift that quantization causes is measured on ``calib`` and applied to the reference's
    (real-data) statistics, so a synthetic set whose statistics differ from the real data does not
    replace them::

        mean = mean_ref + (mean_q(calib) - mean_ref(calib))
        var  = var_ref * var_q(calib) / var_ref(calib)

    measured on each BN's input in eval mode, layer after layer (each measurement sees the already
    corrected BNs upstream).
    """
    bns = batchnorms(model)
    if not bns:
        return 0
    x = calib if n is None else calib[:n]
    model.eval()
    if reference is not None:
        ref_bns = batchnorms(reference)
        if len(ref_bns) != len(bns) or any(a.num_features != b.num_features for a, b in zip(bns, ref_bns)):
            raise DfqError("the reference model's BatchNorm layers do not match the quantized model's; use absolute BN re-estimation")
        ref_stats = _bn_input_stats(reference, ref_bns, x, batch_size)
        for bn, rb, (m_ref, v_ref) in zip(bns, ref_bns, ref_stats):
            (m_q, v_q), = _bn_input_stats(model, [bn], x, batch_size, stop=True)
            bn.running_mean.copy_(rb.running_mean + (m_q - m_ref))
            bn.running_var.copy_(rb.running_var * (v_q + bn.eps) / (v_ref + bn.eps))
        return len(bns)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return len(bns)


def check_bn_mode(mode: str, what: str = "bn_recalib") -> None:
    """Validate a BN re-estimation mode before any slow work; ``what`` names the parameter in the error."""
    if mode not in BN_MODES:
        raise DfqError(f"{what}={mode!r} is not one of {', '.join(BN_MODES)}", params=(what,))


def check_bn_args(mode: str, fp_model: nn.Module | None) -> None:
    """:func:`check_bn_mode`, and relative mode has the full-precision model it measures against."""
    check_bn_mode(mode)
    if mode == "relative" and fp_model is None:
        raise DfqError("relative BN re-estimation needs the full-precision model")


def recalibrate_bn(qmodel: nn.Module, calib: torch.Tensor, mode: str, fp_model: nn.Module | None = None,
                   batch_size: int = 64, n: int | None = None) -> int:
    """Re-estimate ``qmodel``'s BN statistics by ``mode`` (relative | absolute | none); return the BN count."""
    check_bn_args(mode, fp_model)
    if mode == "none":
        return 0
    return reestimate_bn(qmodel, calib, batch_size, n, fp_model if mode == "relative" else None)
