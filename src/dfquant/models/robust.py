"""Training-time robustness to quantization: SymReg and SatNL (Park, Jang & Park, ECCV 2022).

The paper's observation: a network whose weights are distributed symmetrically around zero and
whose activations live in a bounded range loses less accuracy when quantized, and keeps that
robustness across bit-widths, because the quantization grid (set from the range) fits the data
without wasted levels and without rare outliers stretching it. Both are options of
:func:`dfquant.models.train.train_classifier`; the trained model is then quantized with the
project's ordinary PTQ at several bit-widths (``benchmarks/qat.py``).

**SymReg** (:func:`symreg_loss`). For one output channel with weights sorted ascending
``w_(1) <= ... <= w_(n)``, the empirical distribution is symmetric about 0 exactly when
``w_(i) = -w_(n+1-i)`` for every ``i`` (each quantile mirrors the opposite one). The penalty is the
mean squared mismatch of those mirrored pairs, normalized by the channel's second moment::

    S(w) = mean_i (w_(i) + w_(n+1-i))^2 / (4 * mean_i w_i^2 + eps)      in [0, 1]

``S = 0`` for a symmetric channel, ``S = 1`` when all weights are equal and of one sign. The
outermost pair is ``max + min``, the asymmetry of the min/max range that a quantizer's grid is set
from; the inner pairs make the whole distribution (not only its ends) symmetric, and the median
term pulls the centre to 0. The normalization makes the term scale-free, so it cannot be lowered by
shrinking the weights (which BatchNorm would undo anyway) and one coefficient suits every layer.
The model loss adds ``lambda * sum over Conv2d/Linear layers of mean over output channels of S``.
(Gradients flow through ``torch.sort``'s values.)

**SatNL** (:class:`SatNL`). A saturating replacement for ReLU: ``y = c * tanh(relu(x) / c)``
(``mode="tanh"``; slope 1 at 0+, saturates at ``c``) or ``y = clamp(x, 0, c)`` (``mode="hard"``,
ReLU6-like). Every activation, including the residual stream of a ResNet (the block's final ReLU
is replaced too), is bounded to ``[0, c]``, so activation ranges are known in advance and no rare
large value stretches the activation grid. :func:`apply_satnl` swaps every ``nn.ReLU``/``nn.ReLU6``
module of a model; the swap has no parameters or buffers, so state dicts are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

SATNL_MODES = ("tanh", "hard")


def symreg_term(weight: torch.Tensor, per_channel: bool = True, eps: float = 1e-12) -> torch.Tensor:
    """Asymmetry ``S`` (module doc) of ``weight``, averaged over output channels (dim 0) or for the whole tensor."""
    w = weight.reshape(weight.shape[0], -1) if per_channel and weight.dim() > 1 else weight.reshape(1, -1)
    s = torch.sort(w, dim=1).values
    mismatch = (s + s.flip(1)).pow(2).mean(1)
    return (mismatch / (4 * s.pow(2).mean(1) + eps)).mean()


def symreg_loss(model: nn.Module, per_channel: bool = True) -> torch.Tensor:
    """Sum of :func:`symreg_term` over every Conv2d/Linear weight of ``model``."""
    terms = [symreg_term(m.weight, per_channel) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


class SatNL(nn.Module):
    """Saturating nonlinearity: ``c·tanh(relu(x)/c)`` (``tanh``) or ``clamp(x, 0, c)`` (``hard``); output in ``[0, c]``."""

    def __init__(self, bound: float = 4.0, mode: str = "tanh"):
        super().__init__()
        if mode not in SATNL_MODES:
            raise ValueError(f"SatNL mode must be one of {SATNL_MODES}, got {mode!r}")
        if not bound > 0:
            raise ValueError(f"SatNL bound must be positive, got {bound}")
        self.bound, self.mode = float(bound), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "hard":
            return torch.clamp(x, 0.0, self.bound)
        return self.bound * torch.tanh(torch.relu(x) / self.bound)

    def extra_repr(self) -> str:
        return f"bound={self.bound:g}, mode={self.mode}"


def apply_satnl(model: nn.Module, bound: float = 4.0, mode: str = "tanh") -> int:
    """Replace every ``nn.ReLU``/``nn.ReLU6`` module of ``model`` (in place) by :class:`SatNL`; return how many."""
    targets = [name for name, m in model.named_modules() if type(m) in (nn.ReLU, nn.ReLU6)]
    for name in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, SatNL(bound, mode))
    return len(targets)
