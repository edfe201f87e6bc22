"""The one table of PTQ algorithms: each name's quantization conventions and reconstruction settings.

Everything that lists algorithms (the API, the CLI, ``dfq run``, NIPQ's range-init presets) reads
:data:`ALGORITHMS`; nothing else spells out a preset. The values follow each method's published
code (see docs/conventions.md):

* ``quant`` fills :class:`~dfquant.quant.modules.QuantConfig` (which layers are 8-bit, range init,
  BN folding).
* ``recon`` fills :class:`~dfquant.quant.reconstruct.ReconConfig` (what is learned, loss weights,
  optimizer schedules, QDrop probability, activation-init batch). ``None`` means the algorithm does
  not run block reconstruction (RepQ-ViT has its own calibration in :mod:`dfquant.quant.vit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Algorithm:
    """One PTQ algorithm: its conventions (``quant``), its reconstruction settings (``recon``) and the
    function that runs it (``runner``, a key of :data:`dfquant.quant.api.RUNNERS`). ``vit``: a ViT method,
    run with the ViT options (:func:`~dfquant.quant.vit.default_vit_options`) even on a model without
    detected attention."""

    name: str
    quant: dict[str, Any]
    recon: dict[str, Any] | None = field(default_factory=dict)
    summary: str = ""
    runner: str = "reconstruct"
    vit: bool = False

    @property
    def learns(self) -> bool:
        """Whether it optimizes anything over iterations (block reconstruction); without, ``iters=0`` is the
        algorithm as published (RepQ-ViT) or changes nothing (range init only)."""
        return self.recon is not None and self.recon.get("learn_rounding", True)


# AdaRound / BRECQ / QDrop (yhhhli/BRECQ, wimh966/QDrop): lp_loss = sum over channels, mean over the rest;
# rounding weight 0.01; Adam on V at its default 1e-3 without a schedule; activation steps with cosine decay,
# initialised on the first 256 cached inputs
_ADAROUND = dict(round_weight=0.01, lr_rounding=1e-3, rounding_schedule="constant", loss_reduction="channel",
                 sampling="randperm", act_init="images", act_init_images=256)
# BRECQ's main_imagenet.py (AdaRound = its layer-wise reconstruction): rounding of every unit first with activation
# quantization off, then activation steps initialised on the first 64 images through the whole model and learned in
# a second pass (lr 4e-4, cosine, L2.4 loss, a quarter of the iterations: 5000 after 20000), weights hard
_TWO_STAGES = dict(stages="weights-then-acts", act_init_images=64, lr_act_scale=4e-4)
# BRECQ's UniformAffineQuantizer: affine activation grids (a zero point from the range, so signed inputs get an
# asymmetric grid) and an Lp (p=2.4) range search over 80 clip ratios 1.0..0.21, for weights and activations.
# QDrop's MSEObserver (qdrop/quantization/observer.py, the code behind its published configs) is affine too, for
# weights (per channel) and activations, but tries 100 ranges (xrange * i / 100), and for two-sided tensors every
# zero point at each of them (perform_2D_search)
_AFFINE = dict(act_symmetric=False, clip_ratios=80)

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("minmax", dict(second_input_bits=8, weight_init="minmax", act_init="minmax", fold_bn=True),
              dict(learn_rounding=False), "range init only (min-max)"),
    Algorithm("mse", dict(second_input_bits=8, weight_init="mse", act_init="mse", fold_bn=True),
              dict(learn_rounding=False), "range init only (Lp, p=2.4, over clip ratios)"),
    Algorithm("adaround", dict(second_input_bits=8, fold_bn=True, **_AFFINE),
              dict(_ADAROUND, **_TWO_STAGES, granularity="layer"),
              "learned rounding layer by layer, then activation steps"),
    Algorithm("brecq", dict(second_input_bits=8, fold_bn=True, **_AFFINE),
              dict(_ADAROUND, **_TWO_STAGES), "learned rounding per block, then activation steps"),
    Algorithm("qdrop", dict(second_input_bits=None, fold_bn=True, act_symmetric=False, zero_point_search=True),
              dict(_ADAROUND, drop_prob=0.5, lr_act_scale=4e-5, sampling="randint"), "as brecq, with random drop of activation quantization"),
    # Genie-M (SamsungLabs/Genie main.py / reconstruct.py): round_weight 1.0, Adam on V without a schedule,
    # weight and activation steps with cosine decay, activation steps initialised on the first shuffled batch
    # through the block with soft weights, batches drawn by shuffling once per epoch; signed activation grids with
    # the step 2*max/(2^b - 1) (its quantizer.py init_scale); activations round_ste(clamp(x / s)), so the
    # straight-through gradient passes everywhere inside the clip range
    Algorithm("genie-m", dict(second_input_bits=8, fold_bn=False, act_signed_step="span", act_clamp_first=True),
              dict(round_weight=1.0, drop_prob=0.5, learn_weight_scale=True, lr_rounding=1e-3, lr_weight_scale=1e-4,
                   lr_act_scale=4e-5, rounding_schedule="constant", loss_reduction="channel", sampling="epoch",
                   act_init="first-batch"),
              "rounding and weight step jointly on a frozen floor, activation steps, QDrop p=0.5"),
    Algorithm("repq-vit", dict(second_input_bits=None, quantize_first_input=True, act_init="percentile", fold_bn=False),
              None, "ViTs: LayerNorm reparameterization, log-sqrt2 softmax quantizer, percentile search",
              runner="repq-vit", vit=True),
)}

ALGOS: tuple[str, ...] = tuple(ALGORITHMS)
DEFAULT_ALGORITHM = "genie-m"       # CNNs
DEFAULT_VIT_ALGORITHM = "repq-vit"  # models with attention


def default_algorithm(model) -> str:
    """The algorithm ``auto`` stands for: RepQ-ViT for a model with (timm) attention, Genie-M otherwise."""
    from dfquant.quant.vit import has_attention

    return DEFAULT_VIT_ALGORITHM if has_attention(model) else DEFAULT_ALGORITHM


def get_algorithm(name: str) -> Algorithm:
    """The table entry for ``name``; a ``DfqError`` naming the valid choices otherwise."""
    from dfquant.errors import DfqError

    if name not in ALGORITHMS:
        raise DfqError(f"unknown algorithm {name!r}; use one of {', '.join(ALGOS)}")
    return ALGORITHMS[name]
