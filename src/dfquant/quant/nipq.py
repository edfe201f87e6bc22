"""NIPQ: quantization-aware training with pseudo-quantization noise (Shin et al., CVPR 2023), data-free.

When PTQ is not enough (e.g. W2A4), the quantized network is fine-tuned on the calibration set
by distillation from the full-precision model (KL on logits, no labels).

Pseudo-quantization (training mode) — for a grid with clip range ``[lo, hi]`` and bit-width ``b``:

* step ``Δ = (hi - lo) / (2^b - 1)`` — derived from the clip range and the (continuous) bits;
* zero point ``z = round(-lo / Δ)`` (straight-through), grid ends ``lower = -zΔ``, ``upper = (2^b - 1 - z)Δ``
  (exactly the ends of the hard grid at integer ``b``);
* ``y = clamp(x, lower, upper) + Δ·u·[lower < x < upper]``, ``u ~ U(-1/2, 1/2)`` drawn anew every call:
  values inside the range get noise with the statistics of the rounding error of the hard grid
  (mean 0, variance Δ²/12), clipped values sit on the grid ends, exactly as after hard rounding
  (an inside value within Δ/2 of an end may leave the range by less than Δ/2; its error is still U(±Δ/2)).

There is no rounding in the forward pass, so the gradient reaches the clip range (through the
clamp and through Δ) and the bit-width (through Δ: more bits, less noise) without a
straight-through estimator. Eval mode (and :meth:`NIPQQuantizer.freeze`) is the hard quantizer
of the base class on the same grid with ``round(b)`` bits.

Learned parameters per quantizer: ``log_hi``/``log_lo`` (log of the clip ends, per output channel for
weights; ``lo`` is fixed at 0 for non-negative activations) and, with ``learn_bits``,
``bit_logit`` with ``b = b_min + (b_max - b_min)·sigmoid(bit_logit)`` in ``[2, 8]``.
Bit budget (mixed precision): ``penalty = strength · max(0, avg_b - budget)`` where
``avg_b = Σ_l n_l b_l / Σ_l n_l`` over the layers with learned bits (the first and last layer stay at
8 bit and do not count). ``n_l`` is the layer's cost per weight bit: its weight count for a model-size
budget (``budget_by="size"``), or its multiply-accumulates per image times its input's activation bits
for a BOPs budget (``"bops"``: ``Σ_l n_l b_l`` is then the bit operations, so ``budget`` is the BOPs
allowed, expressed as the average weight bit-width that spends them). After training, :func:`finalize` rounds the bits
(to nearest, then lowers the most rounded-up layers until the budget holds), freezes every grid on its
learned clip range and re-estimates BatchNorm statistics on the calibration set.
BatchNorm keeps the FP model's running statistics during training; the re-estimation after hardening
is *relative* by default: the shift that quantization causes is measured on the calibration set
(quantized vs FP model) and applied to the FP model's real-data statistics, so synthetic images
whose own statistics differ from the real data do not replace them (see :func:`~dfquant.quant.bn.reestimate_bn`).
The result is a plain :class:`~dfquant.quant.quantizers.UniformQuantizer` model that
:func:`~dfquant.quant.checkpoint.save_quantized`, ``dfq eval`` and ``dfq export`` handle.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfquant.errors import DfqError
from dfquant.io import load_torch
from dfquant.quant.bn import check_bn_args, check_bn_mode, recalibrate_bn
from dfquant.quant.modules import QuantBlock, QuantConfig, QuantLayer, act_quantizers, train_keep_bn
from dfquant.quant.quantizers import UniformQuantizer, check_bits, round_ste

BIT_RANGE = (2.0, 8.0)
BUDGETS = ("size", "bops")
_EPS = 1e-8


def _round_half_up(b: float) -> int:
    return int(math.floor(b + 0.5))


class NIPQQuantizer(UniformQuantizer):
    """Pseudo-quantizer: noise in training, the base class's hard grid in eval / after :meth:`freeze`.

    Args:
        bits: initial bit-width; integer unless ``learn_bits`` (then anything in ``bit_range``).
        channel_axis: ``None`` per-tensor, else per-channel (weights: 0).
        learn_bits: make the bit-width a parameter (sigmoid-bounded to ``bit_range``).
        bit_range: bounds of the learned bit-width.

    The grid is always affine (``symmetric=False``, levels ``0..2^b-1`` with a zero point); for
    non-negative data the zero point is 0 and the grid equals the unsigned symmetric one.
    """

    def __init__(self, bits: float, channel_axis: int | None = None, learn_bits: bool = False,
                 bit_range: tuple[float, float] = BIT_RANGE):
        b_min, b_max = float(bit_range[0]), float(bit_range[1])
        if not BIT_RANGE[0] <= b_min < b_max <= BIT_RANGE[1]:
            raise ValueError(f"bit_range must lie within {BIT_RANGE}, got {bit_range}")
        if learn_bits:
            if not b_min <= bits <= b_max:
                raise ValueError(f"initial bits {bits} outside the learnable range {bit_range}")
        else:
            check_bits(bits)
            if bits == 1.58:
                raise ValueError("NIPQ supports 2..8 bits, not ternary")
        super().__init__(_round_half_up(bits), channel_axis=channel_axis, symmetric=False)
        self.scale.requires_grad_(False)  # the hard step is derived from the clip range; see freeze()
        self.learn_bits = learn_bits
        self.bit_range = (b_min, b_max)
        self.noise = True       # pseudo-quantization noise while training
        self.frozen = False     # True after freeze(): plain hard quantizer with stored scale/zero point
        self.two_sided = True   # False: lower clip fixed at 0 (non-negative activations)
        self.log_hi = nn.Parameter(torch.zeros(1))
        self.log_lo = nn.Parameter(torch.zeros(1))
        self.bit_logit = self._bit_logit(bits) if learn_bits else None

    def _bit_logit(self, bits: float) -> nn.Parameter:
        b_min, b_max = self.bit_range
        p = min(max((bits - b_min) / (b_max - b_min), 0.02), 0.98)  # keep the sigmoid out of saturation
        return nn.Parameter(torch.tensor(math.log(p / (1 - p))))

    def learn_bit_width(self, bits: float) -> None:
        """Make the bit-width a parameter starting at ``bits`` (within ``bit_range``), as ``learn_bits=True`` at
        construction would; an initialized clip range is re-derived on the grid of the learned bits."""
        if not self.bit_range[0] <= bits <= self.bit_range[1]:
            raise ValueError(f"initial bits {bits} outside the learnable range {self.bit_range}")
        self.learn_bits = True
        self.bit_logit = self._bit_logit(bits)
        if self.initialized:
            self.set_params(self.scale.detach(), self.zero_point)

    # ----- bit-width --------------------------------------------------------------------
    def bit_width(self) -> torch.Tensor:
        """The current (continuous, differentiable) bit-width."""
        if self.learn_bits and not self.frozen:
            b_min, b_max = self.bit_range
            return b_min + (b_max - b_min) * torch.sigmoid(self.bit_logit)
        return torch.tensor(float(self.bits))

    def int_bits(self) -> int:
        if self.learn_bits and not self.frozen:
            return _round_half_up(float(self.bit_width().detach()))
        return int(self.bits)

    @property
    def qrange(self) -> tuple[int, int]:
        return 0, 2 ** self.int_bits() - 1

    # ----- clip range -------------------------------------------------------------------
    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Base init (range search) result -> clip range ``[lo, hi]`` of the current integer grid."""
        super().set_params(scale, zero_point)
        qmin, qmax = self.qrange
        s = self.scale.detach()
        lo, hi = (qmin - self.zero_point) * s, (qmax - self.zero_point) * s
        self.two_sided = bool((lo < 0).any())
        dev = self.scale.device
        self.log_hi = nn.Parameter(torch.log(hi.clamp_min(_EPS)).to(dev))
        self.log_lo = nn.Parameter(torch.log((-lo).clamp_min(_EPS)).to(dev), requires_grad=self.two_sided)

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, method: str = "mse", **kwargs) -> None:
        self.bits = float(self.int_bits())
        super().init_range(x, method=method, **kwargs)

    def clip_range(self, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        hi = self.log_hi.exp().view(shape)
        lo = -self.log_lo.exp().view(shape) if self.two_sided else torch.zeros_like(hi)
        return lo, hi

    def grid(self, shape: list[int], hard: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(step, zero_point, n)`` with ``n = 2^b - 1`` levels above the lowest; ``hard`` uses round(b)."""
        b = torch.tensor(float(self.int_bits())) if hard else self.bit_width()
        n = 2.0 ** b - 1
        lo, hi = self.clip_range(shape)
        step = ((hi - lo) / n).clamp_min(_EPS)
        z = round_ste(-lo / step)
        return step, z, n

    # ----- forward ----------------------------------------------------------------------
    def pseudo_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Clip to the grid ends and add uniform noise of one step to the values inside."""
        step, z, n = self.grid(self._shape(x))
        lower, upper = -z * step, (n - z) * step
        inside = ((x > lower) & (x < upper)).to(x.dtype)
        clipped = torch.maximum(torch.minimum(x, upper), lower)
        return clipped + step * (torch.rand_like(x) - 0.5) * inside

    def hard_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the grid of ``round(b)`` bits defined by the current clip range (LSQ-style STE)."""
        step, z, _ = self.grid(self._shape(x), hard=True)
        return self.quantize(x, step, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.initialized:
            self.init_range(x, method=self.init_method)
        if self.frozen:
            return super().forward(x)
        if self.training and self.noise:
            return self.pseudo_quantize(x)
        return self.hard_quantize(x)

    @torch.no_grad()
    def freeze(self, bits: int | None = None) -> None:
        """Fix the bit-width (default ``round(b)``) and store the hard grid as the base ``scale``/``zero_point``."""
        bits = self.int_bits() if bits is None else int(bits)
        check_bits(bits)
        self.frozen = True
        self.bits = float(bits)
        shape = [1] * (1 if self.channel_axis is None else self.channel_axis + 1)
        if self.channel_axis is not None:
            shape[self.channel_axis] = -1
        step, z, _ = self.grid(shape, hard=True)
        UniformQuantizer.set_params(self, step.flatten(), z.flatten())
        for p in (self.log_hi, self.log_lo, self.bit_logit):
            if p is not None:
                p.requires_grad_(False)

    def to_uniform(self) -> UniformQuantizer:
        """A plain base-class quantizer with the same (frozen) grid."""
        if not self.frozen:
            self.freeze()
        q = UniformQuantizer(self.bits, channel_axis=self.channel_axis, symmetric=False,
                             learn_scale=self.channel_axis is None)
        q.enabled, q.init_method, q.signed = self.enabled, self.init_method, self.signed
        q.set_params(self.scale.detach(), self.zero_point)
        return q.to(self.scale.device)

    def extra_repr(self) -> str:
        b = f"{float(self.bit_width().detach()):.2f} (learned)" if self.learn_bits and not self.frozen else f"{self.bits:g}"
        axis = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        return f"bits={b}, {axis}, two_sided={self.two_sided}, {'frozen' if self.frozen else 'pseudo-quant'}"


# ----- model preparation -----------------------------------------------------------------
def _weight_pseudo_quantizer(grid: UniformQuantizer, bit_range: tuple[float, float] = BIT_RANGE) -> NIPQQuantizer:
    """A layer's weight pseudo-quantizer (``QuantConfig.weight_quantizer``): per channel, fixed bits, on the grid
    the preset's range search found (``grid``); :func:`prepare_nipq` lets the inner layers learn their bits."""
    q = NIPQQuantizer(grid.bits, channel_axis=0, bit_range=bit_range)
    q.bits = grid.bits
    q.set_params(grid.scale.detach(), grid.zero_point)
    return q


def _act_pseudo_quantizer(bits: float, cfg: QuantConfig) -> NIPQQuantizer:
    """An activation pseudo-quantizer (``QuantConfig.act_quantizer``), range-initialized on its first input."""
    q = NIPQQuantizer(bits)
    q.init_method = cfg.act_init
    return q


def nipq_quantizers(qmodel: nn.Module) -> list[NIPQQuantizer]:
    return [m for m in qmodel.modules() if isinstance(m, NIPQQuantizer)]


def weight_quantizers(qmodel: nn.Module) -> dict[str, tuple[NIPQQuantizer, float]]:
    """``layer name -> (weight quantizer, budget cost per weight bit)`` for every NIPQ-quantized layer.

    The cost is the one :func:`prepare_nipq` set for its ``budget_by`` (:func:`layer_costs`)."""
    return {n: (m.wq, m.wq.cost) for n, m in qmodel.named_modules()
            if isinstance(m, QuantLayer) and isinstance(m.wq, NIPQQuantizer)}


def check_budget_by(budget_by: str, what: str = "budget_by") -> None:
    """Raise a DfqError naming the choices unless ``budget_by`` is one of :data:`BUDGETS`."""
    if budget_by not in BUDGETS:
        raise DfqError(f"{what}={budget_by} is not a bit budget; use one of {', '.join(BUDGETS)}", params=(what,))


@torch.no_grad()
def layer_costs(qmodel: nn.Module, x: torch.Tensor | None, budget_by: str = "size") -> dict[str, float]:
    """Budget cost per weight bit of every quantized layer: weight count (``size``; ``x`` unused) or, for ``bops``,
    multiply-accumulates per image (one forward pass of ``x``) times the bits of the layer's input
    (its own activation quantizer, else the enclosing residual block's; 32 for a float input)."""
    check_budget_by(budget_by)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    if budget_by == "size":
        return {n: float(m.layer.weight.numel()) for n, m in layers.items()}
    blocks = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantBlock)}
    macs: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda mod, i, out, n=n: macs.__setitem__(
        n, out[0].numel() * mod.layer.weight[0].numel())) for n, m in layers.items()]
    was = qmodel.training
    try:
        qmodel.eval()
        qmodel(x[:1])
    finally:
        qmodel.train(was)
        for h in hooks:
            h.remove()
    out = {}
    for n, m in layers.items():
        aq = m.aq if m.aq is not None else next(
            (blocks[b].aq for b in sorted(blocks, key=len, reverse=True) if n.startswith(b + ".")), None)
        abits = float(aq.bits) if aq is not None and getattr(aq, "enabled", True) else 32.0
        out[n] = macs[n] * abits
    return out


def prepare_nipq(model: nn.Module, wbits: float, abits: float, learn_bits: bool = False, init_bits: float | None = None,
                 first_last_bits: int = 8, bit_range: tuple[float, float] = BIT_RANGE, preset: str = "genie-m",
                 calib: torch.Tensor | None = None, init_images: int = 256, budget_by: str = "size") -> nn.Module:
    """Wrap ``model`` (a copy) for NIPQ training, on :func:`~dfquant.quant.transform.quantize_model`'s conventions.

    The transform builds every weight and activation quantizer as a :class:`NIPQQuantizer` (through
    ``QuantConfig.weight_quantizer`` / ``act_quantizer``); the weight grids start where the preset's range search puts them. First/last layer weights (and the last layer's
    input) stay at ``first_last_bits`` with fixed bits; with ``learn_bits`` the other weight
    quantizers learn their bit-width, starting at ``init_bits`` (default ``wbits``). Activation bits
    are fixed. ``calib`` initializes the activation ranges now (else on the first forward pass).
    ``budget_by`` (``size`` | ``bops``) sets each layer's cost in the bit budget (:func:`layer_costs`;
    ``bops`` needs ``calib`` for the one forward pass that counts the multiply-accumulates).
    """
    from dfquant.quant.algorithms import get_algorithm
    from dfquant.quant.transform import quantize_model

    from dfquant.quant.vit import has_attention

    if has_attention(model):
        raise DfqError("NIPQ QAT supports CNNs only; quantize ViTs with algo=repq-vit", params=("algo",))
    for b, what in ((wbits, "wbits"), (abits, "abits")):
        if not (float(b).is_integer() and 2 <= b <= 8):
            raise DfqError(f"{what}={b:g} is not supported by NIPQ; use an integer from 2 to 8", params=(what,))
    check_budget_by(budget_by)
    if budget_by == "bops" and calib is None:
        raise DfqError("a BOPs budget counts multiply-accumulates on a calibration image; pass calib")
    start = float(wbits if init_bits is None else init_bits)
    if learn_bits and not bit_range[0] <= start <= bit_range[1]:
        raise DfqError(f"initial bit-width {start:g} lies outside the learnable range {bit_range[0]:g}..{bit_range[1]:g}")
    cfg = QuantConfig(wbits=_round_half_up(start) if learn_bits else wbits, abits=abits,
                      first_last_bits=first_last_bits, **get_algorithm(preset).quant,
                      weight_quantizer=partial(_weight_pseudo_quantizer, bit_range=bit_range),
                      act_quantizer=_act_pseudo_quantizer)
    qmodel = quantize_model(model, cfg)
    if learn_bits:
        layers = [m for m in qmodel.modules() if isinstance(m, QuantLayer)]
        for m in layers[1:-1]:  # the first and last layer keep their fixed bits
            m.wq.learn_bit_width(start)
    qmodel.nipq_config = replace(cfg, weight_quantizer=None, act_quantizer=None)  # the conventions, for saving
    qmodel.budget_by = budget_by
    if calib is not None:
        init_activation_ranges(qmodel, calib, init_images)
    mods = dict(qmodel.named_modules())
    for name, cost in layer_costs(qmodel, calib, budget_by).items():
        mods[name].wq.cost = cost
    return qmodel


@torch.no_grad()
def init_activation_ranges(qmodel: nn.Module, calib: torch.Tensor, n: int = 256, batch_size: int = 256) -> None:
    """Initialize every uninitialized activation quantizer on its own input (hard grid upstream), in forward order."""
    if all(q.initialized for q in act_quantizers(qmodel)):
        return
    was = qmodel.training
    qmodel.eval()
    x = calib[:n]
    # lazy init happens on the first batch a quantizer sees, so one pass over `n` images is enough
    qmodel(x if len(x) <= batch_size else x[:batch_size])
    qmodel.train(was)


# ----- budget ------------------------------------------------------------------------------
def average_weight_bits(qmodel: nn.Module, learned_only: bool = True) -> torch.Tensor:
    """Cost-weighted mean bit-width (differentiable) over the learned-bit layers (or all); see :func:`layer_costs`."""
    pairs = [(q, n) for q, n in weight_quantizers(qmodel).values() if q.learn_bits or not learned_only]
    if not pairs:
        return torch.tensor(0.0)
    total = sum(n for _, n in pairs)
    return sum(q.bit_width() * n for q, n in pairs) / total


def _avg_bits(qmodel: nn.Module) -> float:
    """Mean weight bits over the learned-bit layers, or over all layers when none is learned."""
    learned = any(q.learn_bits for q, _ in weight_quantizers(qmodel).values())
    return float(average_weight_bits(qmodel, learned_only=learned).detach())


def budget_penalty(qmodel: nn.Module, budget: float | None, strength: float = 1.0) -> torch.Tensor:
    """``strength · max(0, avg_bits - budget)`` over the learned-bit layers (0 when nothing is learned)."""
    if budget is None or not any(q.learn_bits and not q.frozen for q, _ in weight_quantizers(qmodel).values()):
        return torch.tensor(0.0)
    return strength * F.relu(average_weight_bits(qmodel) - budget)


def round_bits(qmodel: nn.Module, budget: float | None = None) -> dict[str, int]:
    """Integer bit-width per learned-bit layer: round to nearest, then while the weighted mean exceeds
    ``budget`` lower by one bit the layer that was rounded up the most (ties: the larger layer)."""
    learned = {n: (q, c) for n, (q, c) in weight_quantizers(qmodel).items() if q.learn_bits and not q.frozen}
    cont = {n: float(q.bit_width().detach()) for n, (q, _) in learned.items()}
    out = {n: _round_half_up(b) for n, b in cont.items()}
    if budget is not None and learned:
        total = sum(c for _, c in learned.values())
        b_min = min(q.bit_range[0] for q, _ in learned.values())
        if budget < b_min:
            raise DfqError(f"bit budget {budget:g} is below the smallest bit-width {b_min:g}")
        while sum(out[n] * c for n, (_, c) in learned.items()) / total > budget + 1e-9:
            cands = [n for n in out if out[n] - 1 >= learned[n][0].bit_range[0]]
            n = max(cands, key=lambda k: (out[k] - cont[k], learned[k][1]))
            out[n] -= 1
    return out


# ----- training ------------------------------------------------------------------------------
def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and translation by up to ``shift`` pixels (zero padding, normalized space)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    h, w = x.shape[-2:]
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
    return F.pad(x, (shift,) * 4)[..., dy : dy + h, dx : dx + w]


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1), reduction="batchmean") * t * t


@torch.no_grad()
def eval_distill_loss(qmodel: nn.Module, fp_model: nn.Module, x: torch.Tensor, temperature: float = 1.0) -> float:
    """KL(FP || quantized) on ``x`` with the hard grid (eval mode)."""
    was = qmodel.training
    qmodel.eval()
    loss = distill_kl(qmodel(x), fp_model.eval()(x), temperature).item()
    qmodel.train(was)
    return loss


def _param_groups(qmodel: nn.Module, lr: float, lr_clip: float, lr_bits: float) -> list[dict]:
    quant = {id(p) for q in nipq_quantizers(qmodel) for p in q.parameters()}
    weights = [p.requires_grad_(True) for p in qmodel.parameters() if id(p) not in quant]
    clips = [p for q in nipq_quantizers(qmodel) for p in (q.log_hi, q.log_lo) if p.requires_grad and not q.frozen]
    bits = [q.bit_logit for q in nipq_quantizers(qmodel) if q.learn_bits and not q.frozen]
    groups = [{"params": weights, "lr": lr, "name": "weights"}, {"params": clips, "lr": lr_clip, "name": "clip"}]
    if bits:
        groups.append({"params": bits, "lr": lr_bits, "name": "bits"})
    return [g for g in groups if g["params"]]


def qat_distill(qmodel: nn.Module, fp_model: nn.Module, calib: torch.Tensor, iters: int, lr: float = 1e-4,
                budget: float | None = None, batch_size: int = 32, lr_clip: float | None = None, lr_bits: float = 1e-2,
                penalty: float = 1.0, temperature: float = 1.0, augment: bool = True, seed: int = 0,
                resume: Path | None = None, save_every: int = 200, max_steps: int | None = None,
                trace: list | None = None, progress: bool = True) -> list[float]:
    """Fine-tune ``qmodel`` (from :func:`prepare_nipq`) by distillation from ``fp_model`` on ``calib``.

    Loss per step: ``KL(softmax(fp/T) || softmax(q/T))·T² + penalty·max(0, avg_bits - budget)`` on a
    random (augmented) batch; no labels. Adam with cosine decay; weights, biases and BN affine
    parameters at ``lr``, clip ranges at ``lr_clip`` (default ``10·lr``, in log space), bit logits at
    ``lr_bits``. BatchNorm running statistics stay frozen during training. Returns the KL of every
    step (this call's and, when resumed, the earlier ones). ``resume`` checkpoints every
    ``save_every`` steps; ``max_steps`` stops this call early (a time-boxed slice).
    """
    if len(calib) < batch_size:
        raise DfqError(f"calibration set has {len(calib)} images, fewer than batch_size={batch_size}; "
                       "add images or lower it", params=("batch_size",))
    if not nipq_quantizers(qmodel):
        raise DfqError("qat_distill needs a model from prepare_nipq (no NIPQ quantizers found)")
    init_activation_ranges(qmodel, calib)
    fp_model = fp_model.eval()
    lr_clip = 10 * lr if lr_clip is None else lr_clip
    groups = _param_groups(qmodel, lr, lr_clip, lr_bits)
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the noise
    start, losses = 0, []
    key = {"iters": iters, "lr": lr, "lr_clip": lr_clip, "lr_bits": lr_bits, "budget": budget,
           "budget_by": qmodel.budget_by, "batch_size": batch_size,
           "penalty": penalty, "temperature": temperature, "augment": augment, "seed": seed, "n_calib": len(calib)}
    if resume is not None and Path(resume).exists():
        state = load_torch(resume)
        if state.get("key") != key:
            raise DfqError(f"{resume} belongs to a QAT run with other settings ({state.get('key')}); "
                           "delete it or choose another output folder")
        qmodel.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"]); torch.set_rng_state(state["rng"]); start, losses = state["step"], state["losses"]
    train_keep_bn(qmodel)
    try:
        stop = iters if max_steps is None else min(iters, start + max_steps)
        bar = tqdm(range(start, stop), desc="NIPQ QAT", disable=not progress, initial=start, total=iters, mininterval=1.0)
        for step in bar:
            x = calib[torch.randint(0, len(calib), (batch_size,), generator=gen)]
            if augment:
                x = _augment(x, gen)
            with torch.no_grad():
                t_logits = fp_model(x)
            kl = distill_kl(qmodel(x), t_logits, temperature)
            pen = budget_penalty(qmodel, budget, penalty)
            loss = kl + pen
            if not torch.isfinite(loss):
                raise DfqError(f"QAT loss became {loss.item()} at step {step}; lower lr={lr:g}", params=("lr",))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
            losses.append(kl.item())
            if trace is not None:
                trace.append({"step": step, "kl": kl.item(), "penalty": float(pen.detach()), "avg_bits": _avg_bits(qmodel)})
            if step % 20 == 0:
                bar.set_postfix(kl=f"{kl.item():.4f}", bits=f"{_avg_bits(qmodel):.2f}")
            if resume is not None and ((step + 1) % save_every == 0 or step + 1 == stop):
                from dfquant.io import atomic_path

                with atomic_path(resume) as tmp:
                    torch.save({"model": qmodel.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                "gen": gen.get_state(), "rng": torch.get_rng_state(), "step": step + 1,
                                "losses": losses, "key": key}, tmp)
    finally:
        qmodel.eval()
    return losses


# ----- finalization -----------------------------------------------------------------------------
def _harden_quantizers(qmodel: nn.Module) -> None:
    """Each frozen pseudo-quantizer hands its grid over to a plain :class:`UniformQuantizer` (what checkpoints and
    export read); a quantizer several layers share stays shared."""
    plain: dict[int, UniformQuantizer] = {}

    def hard(q: NIPQQuantizer) -> UniformQuantizer:
        if id(q) not in plain:
            plain[id(q)] = q.to_uniform()
        return plain[id(q)]

    for m in list(qmodel.modules()):
        if isinstance(m, (QuantLayer, QuantBlock)):
            if isinstance(m, QuantLayer) and isinstance(m.wq, NIPQQuantizer):
                m.wq = hard(m.wq)
            if isinstance(m.aq, NIPQQuantizer):
                m.aq = hard(m.aq)


def layer_bits(qmodel: nn.Module) -> dict[str, float]:
    """Weight bit-width of every quantized layer."""
    return {n: (float(m.wq.bit_width().detach()) if isinstance(m.wq, NIPQQuantizer) else float(m.wq.bits))
            for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


def finalize(qmodel: nn.Module, calib: torch.Tensor, budget: float | None = None, fp_model: nn.Module | None = None,
             bn_stats: str | None = None, act_reinit: bool = False, act_init: str = "mse", n: int = 1024,
             init_images: int = 256, batch_size: int = 64) -> dict:
    """Hard quantization + short recalibration, in place; return a summary.

    1. round the learned bit-widths (:func:`round_bits`, honouring ``budget``) and freeze every grid;
    2. hand every frozen grid over to a plain :class:`UniformQuantizer` (the checkpoint's and export's form);
    3. re-estimate BatchNorm running statistics of the hard-quantized model on up to ``n`` calibration images
       (:func:`~dfquant.quant.bn.reestimate_bn`; ``bn_stats``: ``relative`` to the FP model's statistics — the default when
       ``fp_model`` is given —, ``absolute``, or ``none``);
    4. only with ``act_reinit``: re-initialize the activation ranges (range search ``act_init`` on ``init_images``
       images, in forward order). Off by default: the clip ranges NIPQ learned are part of what the trained network
       computes, and replacing them by a range search took MobileNetV2 W2A4 from 55.9 to 8.7 top-1
       (``benchmarks/results/nipq_finalize.md``).
    """
    if not nipq_quantizers(qmodel):
        raise DfqError("finalize needs a model from prepare_nipq (no NIPQ quantizers found)")
    bn_stats = bn_stats or ("relative" if fp_model is not None else "absolute")
    check_bn_args(bn_stats, fp_model)
    init_activation_ranges(qmodel, calib)
    bits = round_bits(qmodel, budget)
    wqs = weight_quantizers(qmodel)
    costs = {n_: c for n_, (_, c) in wqs.items()}  # the budget's weights, kept past the replacement below
    for name, (q, _) in wqs.items():
        q.freeze(bits.get(name))
    for q in nipq_quantizers(qmodel):
        if not q.frozen:
            q.freeze()
    _harden_quantizers(qmodel)
    qmodel.eval()
    n_bn = recalibrate_bn(qmodel, calib, bn_stats, fp_model, batch_size, n)
    n_act = 0
    if act_reinit:
        qs = act_quantizers(qmodel)
        for q in qs:
            if isinstance(q, UniformQuantizer):
                q.initialized, q.init_method = False, act_init
                n_act += 1
        with torch.no_grad():
            qmodel(calib[:init_images])
    lb = layer_bits(qmodel)
    counts = {n_: m.layer.weight.numel() for n_, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    return {"layer_bits": lb, "avg_weight_bits_all": sum(lb[k] * counts[k] for k in lb) / sum(counts.values()),
            "avg_weight_bits_learned": (sum(bits[k] * costs[k] for k in bits) / sum(costs[k] for k in bits)) if bits else None,
            "budget_by": qmodel.budget_by, "bn_stats": bn_stats, "bn_layers_reestimated": n_bn, "act_quantizers_reinitialized": n_act}


# ----- CLI-level job -------------------------------------------------------------------------------
def check_qat_args(wbits: float, abits: float, iters: int, lr: float, learn_bits: bool, avg_bits: float | None,
                   n: int, batch_size: int, bn_stats: str = "relative", budget_by: str = "size") -> None:
    """Validate ``dfq qat`` options before any slow work (DfqError naming the fix)."""
    check_bn_mode(bn_stats, "bn_recalib")
    check_budget_by(budget_by, "budget_by")
    if budget_by != "size" and not learn_bits:
        raise DfqError(f"budget_by={budget_by} weighs the learned bit-widths; add learn_bits=True (or drop budget_by=)",
                       params=("budget_by", "learn_bits"))
    for b, what in ((wbits, "wbits"), (abits, "abits")):
        if not (float(b).is_integer() and 2 <= b <= 8):
            raise DfqError(f"{what}={b:g} is not supported by NIPQ QAT; use an integer from 2 to 8", params=(what,))
    if iters < 0:
        raise DfqError(f"iters={iters} must be >= 0", params=("iters",))
    if not lr > 0:
        raise DfqError(f"lr={lr:g} must be positive", params=("lr",))
    if batch_size < 1 or n < batch_size:
        raise DfqError(f"n={n} must be at least batch_size={batch_size}", params=("n", "batch_size"))
    if avg_bits is not None:
        if not learn_bits:
            raise DfqError("avg_bits= is the budget of learned bit-widths; add learn_bits=True (or drop avg_bits=)",
                           params=("avg_bits", "learn_bits"))
        if not BIT_RANGE[0] <= avg_bits <= BIT_RANGE[1]:
            raise DfqError(f"avg_bits={avg_bits:g} must lie in {BIT_RANGE[0]:g}..{BIT_RANGE[1]:g}", params=("avg_bits",))
    if learn_bits and (avg_bits if avg_bits is not None else wbits) <= BIT_RANGE[0]:
        raise DfqError(f"learn_bits=True with an average of {BIT_RANGE[0]:g} bits leaves nothing to distribute; "
                       "pass avg_bits= above 2 (e.g. avg_bits=3)", params=("learn_bits", "avg_bits"))
