"""Quantizers: one uniform base for weights and activations, plus soft rounding.

* :class:`UniformQuantizer` — affine/symmetric uniform grid, per-channel or per-tensor,
  range init by min-max, percentile or Lp (MSE-family) search over clip ratios, and an
  optional LSQ-style learnable step. Ternary weights (``bits=1.58``) are the symmetric
  3-level case {-1, 0, +1} * scale.
* :class:`SoftRoundingWeight` — AdaRound's rectified-sigmoid rounding on top of a frozen
  ``floor(W / s0)``; with ``learn_scale`` the step size is learned jointly (Genie-M),
  without it the step stays at its init (AdaRound / BRECQ / QDrop).
* :class:`LogSqrt2Quantizer` — RepQ-ViT's post-softmax quantizer with levels 2^(-k/2).
"""

from __future__ import annotations


import torch
from torch import nn

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)
MSE_SAMPLE = 2**23  # per-tensor MSE search looks at most this many elements (every mini-world tensor is smaller)
TERNARY = 1.58
SIGNED_STEPS = ("qmax", "span")
FUSED = True  # per-tensor quantizers train through :class:`_FakeQuant`; False: plain autograd (tests compare both)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient.

    Where no gradient is recorded (range search, evaluation) this is a plain ``round``: the
    value is bit-identical, since ``round(x) - x`` is exact in floating point (Sterbenz) and
    adding ``x`` back is then exact too, and it skips two full-size tensor operations.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.round()
    return (x.round() - x).detach() + x


def check_bits(bits: float) -> float:
    """Accept integer bit-widths 2..8 and 1.58 (ternary); raise ValueError otherwise."""
    if bits == TERNARY or (float(bits).is_integer() and 2 <= bits <= 8):
        return float(bits)
    raise ValueError(f"bits must be an integer in 2..8 or 1.58 (ternary), got {bits}")


def _lp(d: torch.Tensor, p: float) -> torch.Tensor:
    """|d|^p elementwise, as exp(p log|d|): about 1.5x faster than ``pow`` on CPU (log 0 = -inf gives 0)."""
    return d.abs().log_().mul_(p).exp_()


class UniformQuantizer(nn.Module):
    """Uniform fake quantizer; the single base class every weight and activation quantizer uses.

    Args:
        bits: bit-width (2..8) or 1.58 for ternary.
        channel_axis: ``None`` for per-tensor, else the axis that gets its own scale.
        symmetric: zero point fixed at 0 (signed grid if ``signed``, else [0, 2^b - 1]).
        signed: for symmetric grids; ``None`` decides from the data at init (signed iff min < 0).
        learn_scale: make the step an ``nn.Parameter`` (LSQ).
        signed_step: the step of a signed symmetric grid for absolute maximum ``m`` (levels -2^(b-1)..2^(b-1)-1
            either way): ``qmax`` puts ``m`` on the top level, ``m / (2^(b-1) - 1)``; ``span`` lets the 2^b - 1
            steps span [-m, m], ``2m / (2^b - 1)``, and scores the range search as Genie's ``init_scale`` does
            (SamsungLabs/Genie quantizer.py), on the affine form with zero point ``round(m / step)``.
        clamp_first: ``round_ste(clamp(x / s))`` (Genie's activations) instead of ``clamp(round_ste(x / s))``.
        clip_ratios: how many clip ratios 1.0, 0.99, ... the ``mse`` range search tries: 100 (down to 0.01, Genie's
            ``init_scale`` and QDrop's ``MSEObserver``) or 80 (down to 0.21, BRECQ's ``UniformAffineQuantizer``).
        zero_point_search: on an affine grid, when the data is two-sided (negative and positive values anywhere in
            the tensor), the ``mse`` search tries every zero point at each range ``(hi - lo) * ratio`` instead of the
            one that keeps the clipped range centred where the data is (QDrop's ``MSEObserver.perform_2D_search``:
            an offset data distribution gets its zero point from the error, not from min/max).
    """

    def __init__(self, bits: float, channel_axis: int | None = None, symmetric: bool = False,
                 signed: bool | None = None, learn_scale: bool = False, signed_step: str = "qmax",
                 clamp_first: bool = False, clip_ratios: int = 100, zero_point_search: bool = False):
        super().__init__()
        self.bits = check_bits(bits)
        self.channel_axis = channel_axis
        self.symmetric = symmetric or self.bits == TERNARY
        self.signed = True if self.bits == TERNARY else signed
        if signed_step not in SIGNED_STEPS:
            raise ValueError(f"signed_step must be one of {', '.join(SIGNED_STEPS)}, got {signed_step!r}")
        self.signed_step = signed_step
        self.clamp_first = clamp_first
        if not 1 <= clip_ratios <= 100:
            raise ValueError(f"clip_ratios must be in 1..100, got {clip_ratios}")
        self.clip_ratios = clip_ratios
        self.zero_point_search = zero_point_search
        self.enabled = True
        self.initialized = False
        self.init_method = "mse"  # used when the range is initialized lazily from the first batch
        self.drop_prob = 0.0      # QDrop: while training, keep each element full precision with this prob
        self.register_buffer("zero_point", torch.zeros(1))
        self.scale = nn.Parameter(torch.ones(1), requires_grad=learn_scale)

    # ----- grid -------------------------------------------------------------------------
    @property
    def qrange(self) -> tuple[int, int]:
        if self.bits == TERNARY:
            return -1, 1
        b = int(self.bits)
        if self.symmetric and self.signed:
            return -(2 ** (b - 1)), 2 ** (b - 1) - 1
        return 0, 2**b - 1

    def _shape(self, x: torch.Tensor) -> list[int]:
        if self.channel_axis is None:
            return [1] * x.dim()
        shape = [1] * x.dim()
        shape[self.channel_axis] = x.shape[self.channel_axis]
        return shape

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 qrange: tuple[int, int] | None = None) -> torch.Tensor:
        qmin, qmax = qrange or self.qrange
        if self.clamp_first:  # Genie's activations: round_ste(clamp(x / s)); same values, the STE passes every
            # gradient strictly inside the clip range (not only where the *rounded* value is)
            return (round_ste(torch.clamp(x / scale + zero_point, qmin, qmax)) - zero_point) * scale
        return (torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.initialized:
            self.init_range(x, method=self.init_method)
        shape = self._shape(x)
        drop = self.training and self.drop_prob > 0
        if FUSED and self.channel_axis is None and torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad):
            # reconstruction's hot path: one fused autograd node instead of ~8 (same values and gradients)
            keep = torch.rand_like(x).lt_(self.drop_prob) if drop else None  # 0/1 float: see _FakeQuant
            qmin, qmax = self.qrange
            zero = self.zero_point if self.zero_point.any() else None
            return _FakeQuant.apply(x, self.scale, zero, qmin, qmax, keep, self.clamp_first)
        out = self.quantize(x, self.scale.view(shape), self.zero_point.view(shape))
        if drop:
            out = torch.where(torch.rand_like(x) < self.drop_prob, x, out)
        return out

    # ----- range init -------------------------------------------------------------------
    def _minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channel_axis is None:
            return x.min().view(1), x.max().view(1)
        flat = x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)
        return flat.min(1).values, flat.max(1).values

    @property
    def _span(self) -> bool:
        """Genie's signed symmetric step (see ``signed_step``)."""
        return self.signed_step == "span" and self.symmetric and bool(self.signed) and self.bits != TERNARY

    def _params_for(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qmin, qmax = self.qrange
        lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
        if self.symmetric:
            absmax = torch.maximum(lo.abs(), hi)
            scale = 2 * absmax / (qmax - qmin) if self._span else absmax / qmax
            zp = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / (qmax - qmin)
            zp = torch.round(-lo / scale.clamp_min(1e-12)) + qmin
        return scale.clamp_min(1e-8), zp

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, method: str = "mse", p: float = 2.4, percentile: float = 0.9999) -> None:
        """Set scale/zero point from data: ``minmax``, ``percentile``, ``psearch`` (best of three
        percentiles) or ``mse`` (Lp error over ``clip_ratios`` clip ratios 1.0, 0.99, ...)."""
        x = x.detach().float()
        if self.signed is None:
            self.signed = bool(x.min() < 0)
        lo, hi = self._minmax(x)
        if method == "psearch":  # RepQ-ViT: the percentile in {0.999, 0.9999, 0.99999} with least squared error
            best = None
            for pct in (0.999, 0.9999, 0.99999):
                self.init_range(x, "percentile", percentile=pct)
                err = (self.quantize(x, self.scale.view(self._shape(x)), self.zero_point.view(self._shape(x))) - x).pow(2).sum()
                if best is None or err < best[0]:
                    best = (err, self.scale.detach().clone(), self.zero_point.clone())
            self.set_params(best[1], best[2])
            return
        if method == "percentile":
            flat = x.reshape(1, -1) if self.channel_axis is None else x.transpose(0, self.channel_axis).reshape(len(lo), -1)
            if flat.shape[1] > 2**20:  # torch.quantile's size limit; a random subsample estimates the tail
                flat = flat[:, torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))[: 2**20]]
            lo = torch.quantile(flat, 1 - percentile, dim=1).view(lo.shape)
            hi = torch.quantile(flat, percentile, dim=1).view(hi.shape)
            scale, zp = self._params_for(lo, hi)
        elif method == "minmax":
            scale, zp = self._params_for(lo, hi)
        elif method == "mse":
            if self.channel_axis is None and x.numel() > MSE_SAMPLE:
                # ImageNet-size activations: estimate the Lp error on a fixed random subset of the
                # elements (the range itself, lo/hi above, still comes from every element)
                idx = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:MSE_SAMPLE]
                x = x.flatten()[idx.to(x.device)]
            if self.zero_point_search and not self.symmetric and lo.min() < 0 < hi.max():  # the whole tensor
                self.set_params(*self._search_zero_point(x, lo, hi, p))
                return
            shape = self._shape(x)
            best = torch.full_like(lo, float("inf"))
            scale, zp = self._params_for(lo, hi)
            for i in range(self.clip_ratios):
                r = 1.0 - i / 100
                s, z = self._params_for(lo * r, hi * r)
                if self._span:  # Genie scores the affine form: zero point round(m / step) on 0..2^b-1, in float
                    # arithmetic 2^(b-1) or 2^(b-1) - 1, i.e. now and then the grid one level up
                    qmin, qmax = self.qrange
                    z_score = torch.round(torch.maximum(lo.abs(), hi) * r / s)
                    err = self.quantize(x, s.view(shape), z_score.view(shape), (0, qmax - qmin))
                else:
                    err = self.quantize(x, s.view(shape), z.view(shape))
                err = err.sub_(x).abs_().pow_(p)
                err = err.sum().view(1) if self.channel_axis is None else err.transpose(0, self.channel_axis).reshape(len(lo), -1).sum(1)
                better = err < best
                best = torch.where(better, err, best)
                scale, zp = torch.where(better, s, scale), torch.where(better, z, zp)
        else:
            raise ValueError(f"unknown range init {method!r}")
        self.set_params(scale, zp)

    def _search_zero_point(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                           p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2-D Lp search (``zero_point_search``): every (range ratio, zero point) pair, per channel or tensor,
        exact, without scoring all 2^b zero points on every element.

        On sorted rows the codes ``k = round(x / s)`` are sorted, and zero point ``z`` clamps exactly the codes below
        ``qmin - z`` (a prefix) and above ``qmax - z`` (a suffix) to the grid's ends. So the error is the unclamped
        error of the middle (a difference of prefix sums) plus the two tails, which get a lower bound from prefix sums
        of ``x`` (power means: ``sum d^p >= n^(1 - p) (sum d)^p`` for ``p >= 1``). Only candidates whose bound is not
        above the row's best error so far are scored exactly. Exact ties resolve in QDrop's visiting order (ranges
        from the smallest up, then zero points upwards), as its ``perform_2D_search``."""
        qmin, qmax = self.qrange
        lo, hi = lo.clamp_max(0).double(), hi.clamp_min(0).double()
        rows = (x.reshape(1, -1) if self.channel_axis is None
                else x.transpose(0, self.channel_axis).reshape(len(lo), -1)).detach().double().sort(1).values
        n_rows, n = rows.shape
        csum_x = torch.cat([rows.new_zeros(n_rows, 1), rows.cumsum(1)], 1)
        zps = torch.arange(qmin, qmax + 1, dtype=torch.float64, device=rows.device)
        n_z = len(zps)
        low, high = (qmin - zps).expand(n_rows, -1), (qmax - zps).expand(n_rows, -1)  # codes kept unclamped
        best = torch.full((n_rows,), float("inf"), dtype=torch.float64, device=rows.device)
        best_key = torch.full((n_rows,), n_z * 101, dtype=torch.long, device=rows.device)
        best_s, best_z = self._params_for(lo, hi)[0], torch.zeros_like(lo)  # float64, as lo
        row_idx = torch.arange(n_rows, device=rows.device)
        for i in range(self.clip_ratios):  # the full range first: a low error early prunes the most
            s = ((hi - lo) * (1.0 - i / 100) / (qmax - qmin)).clamp_min(1e-8)
            codes = torch.round(rows / s[:, None])
            csum_err = torch.cat([rows.new_zeros(n_rows, 1), _lp(codes * s[:, None] - rows, p).cumsum(1)], 1)
            a = torch.searchsorted(codes, low.contiguous())                # codes below the window: row[:a]
            b = torch.searchsorted(codes, high.contiguous(), right=True)   # codes above it: row[b:]
            middle = csum_err.gather(1, b) - csum_err.gather(1, a)
            n_lo, n_hi = a.double(), (n - b).double()
            d_lo = (n_lo * low * s[:, None] - csum_x.gather(1, a)).clamp_min(0)
            d_hi = (csum_x[:, -1:] - csum_x.gather(1, b) - n_hi * high * s[:, None]).clamp_min(0)
            bound = middle + n_lo.clamp_min(1).pow(1 - p) * d_lo.pow(p) + n_hi.clamp_min(1).pow(1 - p) * d_hi.pow(p)
            # score each row's most promising candidate, then every candidate whose bound does not exceed the best
            first = bound.argmin(1)
            err = self._score(rows, codes, s, low, high, row_idx, first, p)
            key = (100 - i) * n_z + first
            better = (err < best) | ((err == best) & (key < best_key))
            best, best_key = torch.where(better, err, best), torch.where(better, key, best_key)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, zps[first], best_z)
            todo = (bound <= best[:, None]).nonzero()
            todo = todo[todo[:, 1] != first[todo[:, 0]]]
            for chunk in todo.split(max(1, 2**22 // n)):  # few: their bounds are within the best error
                r, j = chunk[:, 0], chunk[:, 1]
                err = self._score(rows, codes, s, low, high, r, j, p)
                for e, rr, jj in zip(err.tolist(), r.tolist(), j.tolist()):
                    kk = (100 - i) * n_z + jj
                    if e < best[rr] or (e == best[rr] and kk < best_key[rr]):
                        best[rr], best_key[rr], best_s[rr], best_z[rr] = e, kk, s[rr], zps[jj]
        return best_s.float(), best_z.float()

    @staticmethod
    def _score(rows, codes, s, low, high, r, j, p) -> torch.Tensor:
        """The exact Lp error of candidates (row ``r``, zero point index ``j``) at steps ``s``."""
        q = torch.maximum(torch.minimum(codes[r], high[r, j][:, None]), low[r, j][:, None])
        return _lp(q * s[r][:, None] - rows[r], p).sum(1)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.data = scale.detach().clone().float().flatten()
        self.zero_point = zero_point.detach().clone().float().flatten()
        self.initialized = True

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        return f"bits={self.bits}, {axis}, symmetric={self.symmetric}, signed={self.signed}"


class _FakeQuant(torch.autograd.Function):
    """Per-tensor ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with QDrop's drop, as one autograd node.

    Gradients are exactly those autograd derives for :meth:`UniformQuantizer.quantize` followed by
    ``torch.where(keep, x, q)``: the straight-through estimator passes ``x``'s gradient where the value is
    kept in full precision or lies strictly inside the clip range (``torch.clamp``'s rule), and the
    step's gradient is LSQ's ``(c - z) - x / s`` inside the range and ``c - z`` at or beyond a bound, summed over the
    elements that were quantized. Saving one pass-through mask and one step-gradient factor instead of
    autograd's chain of ~8 intermediate tensors makes block reconstruction about twice as fast on CPU, where
    these elementwise passes cost more than the convolutions (``benchmarks/results/recon_speed.md``).

    The masks are 0/1 float tensors combined by multiplication, never ``torch.where``/``masked_fill_``: with a
    random QDrop mask those select kernels run about 10x slower than a multiply on this CPU (about 2.1 ms against
    0.22 ms on a 32x16x32x32 tensor, ``benchmarks/results/select_kernels.md``). For finite values the products are exact (``a * 1 = a``, ``a * 0 + b = b``),
    so the outputs and gradients are bit-identical to the selecting form.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                keep: torch.Tensor | None, clamp_first: bool = False) -> torch.Tensor:
        u = x / scale
        v = torch.round(u)
        if zero_point is not None:  # None: a symmetric grid, whose zero point is 0 (two passes saved)
            v.add_(zero_point)
        c = v.clamp(qmin, qmax)
        # where torch.clamp passes gradients (bounds excluded): on the rounded value (clamp after round), or on the
        # scaled input itself (clamp_first, Genie's round_ste(clamp(x / s)))
        w = (u if zero_point is None else u + zero_point) if clamp_first else v
        inside = (w > qmin).logical_and_(w < qmax).to(x.dtype)
        if zero_point is not None:
            c.sub_(zero_point)
        out = c * scale
        ds = c.sub_(u.mul_(inside))  # d out / d scale per element: c - u inside the range, c at or beyond a bound
        if keep is not None:
            drop = 1.0 - keep
            ds.mul_(drop)
            inside = torch.maximum(inside, keep)
            out = out.mul_(drop).addcmul_(x, keep)
        ctx.save_for_backward(inside, ds)
        ctx.scale_shape = scale.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        passes, ds = ctx.saved_tensors
        grad_x = grad * passes if ctx.needs_input_grad[0] else None
        grad_s = torch.dot(grad.reshape(-1), ds.reshape(-1)).view(ctx.scale_shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None, None, None, None


class SoftRoundingWeight(nn.Module):
    """Learned rounding of a weight tensor on a frozen integer floor.

    ``W_q = s * (clamp(floor(W / s0) + h(V) + z, qmin, qmax) - z)`` where ``h`` is the rectified
    sigmoid. ``floor(W / s0)`` is frozen at init, so when the step ``s`` is learned as well
    (Genie-M) the soft bits ``V`` and ``s`` are optimized jointly without the floor drifting.
    After :meth:`harden`, ``h(V)`` is replaced by ``V >= 0``.
    """

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor, learn_scale: bool):
        super().__init__()
        # a plain reference, not a registered submodule: the quantizer is owned (and saved) by its layer
        self.__dict__["q"] = quantizer
        if not quantizer.initialized:
            quantizer.init_range(weight)
        shape = quantizer._shape(weight)
        s0 = quantizer.scale.detach().view(shape)
        self.register_buffer("w_floor", torch.floor(weight.detach() / s0))
        rest = weight.detach() / s0 - self.w_floor
        # invert the rectified sigmoid so that h(V) starts at the fractional remainder (finite on [0, 1]
        # because the stretch (gamma, zeta) = (-0.1, 1.1) reaches beyond it)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.q.scale.requires_grad_(learn_scale)
        self.hard = False

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self) -> torch.Tensor:
        shape = self.q._shape(self.w_floor)
        s, z = self.q.scale.view(shape), self.q.zero_point.view(shape)
        qmin, qmax = self.q.qrange
        bits = (self.V >= 0).float() if self.hard else self.h()
        return s * (torch.clamp(self.w_floor + bits + z, qmin, qmax) - z)

    def rounding_loss(self, beta: float) -> torch.Tensor:
        """AdaRound regularizer: pushes every h(V) to 0 or 1 as beta anneals from 20 to 2."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def harden(self) -> None:
        self.hard = True
        self.V.requires_grad_(False)


class LogSqrt2Quantizer(nn.Module):
    """RepQ-ViT post-softmax quantizer: x in [0, 1] -> 2^(-k/2) * scale, k in 0..2^b-1 (k = max means 0)."""

    def __init__(self, bits: float):
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = True
        self.register_buffer("scale", torch.ones(1))
        self.initialized = False

    @torch.no_grad()
    def init_range(self, x: torch.Tensor) -> None:
        """Search the scale among {max * 2^(-j/8)} minimizing squared error (as RepQ-ViT's calibration)."""
        best, best_s = float("inf"), x.max().clamp_min(1e-8)
        for j in range(16):
            s = x.max().clamp_min(1e-8) * 2 ** (-j / 8)
            err = (self._q(x, s) - x).pow(2).sum().item()
            if err < best:
                best, best_s = err, s
        self.scale.fill_(float(best_s))
        self.initialized = True

    def _q(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        n_levels = 2 ** int(round(self.bits))
        k = torch.round(-2 * torch.log2((x / s).clamp_min(1e-20)))
        zero = k >= n_levels
        k = k.clamp(0, n_levels - 1)
        out = s * 2 ** (-k / 2)
        return torch.where(zero, torch.zeros_like(out), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.initialized:
            self.init_range(x)
        return (self._q(x, self.scale) - x).detach() + x
