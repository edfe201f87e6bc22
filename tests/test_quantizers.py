import pytest
import torch
from torch import nn

from dfquant.quant.quantizers import LogSqrt2Quantizer, SoftRoundingWeight, UniformQuantizer, check_bits, round_ste
from dfquant.quant.reconstruct import _Beta


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_on_grid_and_error_bound(bits, symmetric):
    torch.manual_seed(bits)
    q = UniformQuantizer(bits, channel_axis=0, symmetric=symmetric)
    w = torch.randn(6, 4, 3, 3)
    q.init_range(w, method="minmax")
    wq = q(w)
    assert torch.allclose(q(wq), wq, atol=1e-6)  # grid points are fixed points
    step = q.scale.view(-1, 1, 1, 1)
    assert ((wq - w).abs() <= step / 2 + 1e-6).all()  # min-max range: no clipping, error <= step/2
    levels = [torch.unique(torch.round(wq[c] / step[c])).numel() for c in range(6)]
    assert max(levels) <= 2**bits


def test_per_channel_shapes_and_independence():
    q = UniformQuantizer(4, channel_axis=0)
    w = torch.randn(8, 3, 3, 3)
    w[3] *= 100
    q.init_range(w)
    assert q.scale.shape == (8,) and q.zero_point.shape == (8,)
    assert q.scale[3] > 20 * q.scale[2]
    lin = UniformQuantizer(4, channel_axis=0)
    lin.init_range(torch.randn(5, 7))
    assert lin.scale.shape == (5,)


def test_activation_signedness_and_methods():
    x = torch.relu(torch.randn(4096))
    q = UniformQuantizer(4, symmetric=True)
    q.init_range(x)
    assert q.signed is False and q.qrange == (0, 15)
    y = torch.randn(4096)
    for method in ("minmax", "percentile", "mse"):
        s = UniformQuantizer(4, symmetric=True)
        s.init_range(y, method=method)
        assert s.signed is True and s.qrange == (-8, 7)
    mse, mm = UniformQuantizer(3, symmetric=True), UniformQuantizer(3, symmetric=True)
    mse.init_range(y, "mse", p=2.0)
    mm.init_range(y, "minmax")
    assert (mse(y) - y).pow(2).mean() < (mm(y) - y).pow(2).mean()  # the search never loses to its own start


def test_ternary_levels():
    q = UniformQuantizer(1.58, channel_axis=0)
    w = torch.randn(4, 16)
    q.init_range(w)
    levels = torch.round(q(w) / q.scale.view(-1, 1))
    assert set(levels.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert q.qrange == (-1, 1)


def test_bits_validation():
    for bad in (1, 9, 2.5, 0):
        with pytest.raises(ValueError):
            check_bits(bad)
    assert check_bits(1.58) == 1.58


def test_lsq_scale_receives_gradient():
    q = UniformQuantizer(4, symmetric=True, learn_scale=True)
    x = torch.randn(256)
    q.init_range(x)
    q(x).pow(2).sum().backward()
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all() and q.scale.grad.abs().sum() > 0


def test_soft_rounding_starts_near_fp_and_hardens_to_grid():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    q = UniformQuantizer(4, channel_axis=0)
    q.init_range(w, method="minmax")  # no clipping, so h(V) starts at the exact remainder (clamped to .01..99)
    soft = SoftRoundingWeight(q, w, learn_scale=True)
    step = q.scale.view(-1, 1)
    err = (soft() - w).abs()
    # only values past the grid end (min/max under a rounded zero point) may be clipped
    assert (err <= 0.0101 * step).float().mean() >= 0.95 and (err <= step).all()
    soft.harden()
    hard = soft()
    codes = hard / step + q.zero_point.view(-1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert ((hard - w).abs() <= step + 1e-6).all()  # floor or ceil of the original
    assert soft.V.requires_grad is False and q.scale.requires_grad is True


def test_rounding_loss_annealing():
    beta = _Beta(iters=100, warmup=0.2, start=20, end=2)
    # counted as the reference LinearTempDecay counts (iteration it is step it + 1)
    assert beta(0) is None and beta(18) is None
    assert beta(19) == pytest.approx(20) and beta(99) == pytest.approx(2.0)
    assert beta(60) > beta(80)
    w = torch.randn(3, 5)
    soft = SoftRoundingWeight(UniformQuantizer(4, channel_axis=0), w, False)
    # at high beta the term is ~1 per weight except right at 0/1 (free to move); at low beta it pulls
    # every h(V) toward 0 or 1 and vanishes once they get there
    assert soft.rounding_loss(20.0) > soft.rounding_loss(2.0) > 0
    soft.V.data = torch.sign(soft.V.data) * 50
    assert soft.rounding_loss(2.0).item() == pytest.approx(0.0, abs=1e-4)


def test_log_sqrt2_levels():
    q = LogSqrt2Quantizer(4)
    x = torch.softmax(torch.randn(8, 16) * 2, dim=-1)
    y = q(x)
    s = q.scale.item()
    nz = y[y > 0] / s
    k = -2 * torch.log2(nz)
    assert torch.allclose(k, k.round(), atol=1e-4) and k.max() <= 15
    assert (y[x < s * 2 ** (-8)] == 0).all()  # below the smallest level -> 0


def test_no_grad_rounding_is_bit_identical_to_straight_through():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100_000, generator=g) * s for s in (1e-3, 0.7, 3.0, 1e3, 1e7)]
                  + [torch.arange(-8, 8) + 0.5, torch.tensor([0.49999997, -0.49999997, 2.0**23 + 1])])
    with torch.no_grad():
        fast = round_ste(x)
    slow = round_ste(x.clone().requires_grad_(True)).detach()
    assert torch.equal(fast, slow)


def test_mse_range_search_matches_reference():
    """The in-place search picks exactly the clip ratio the textbook formula picks."""
    x = torch.randn(8, 16, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    for axis in (None, 1):
        q = UniformQuantizer(4, channel_axis=axis)
        q.init_range(x, method="mse")
        ref = UniformQuantizer(4, channel_axis=axis)
        ref.signed = bool(x.min() < 0)
        lo, hi = ref._minmax(x)
        shape = ref._shape(x)
        best, best_s = None, None
        for i in range(100):
            s_, z_ = ref._params_for(lo * (1 - i / 100), hi * (1 - i / 100))
            xq = (torch.clamp(torch.round(x / s_.view(shape)) + z_.view(shape), *ref.qrange) - z_.view(shape)) * s_.view(shape)
            err = (xq - x).abs().pow(2.4)
            err = err.sum().view(1) if axis is None else err.transpose(0, axis).reshape(len(lo), -1).sum(1)
            better = err < best if best is not None else torch.ones_like(err, dtype=torch.bool)
            best = err if best is None else torch.where(better, err, best)
            best_s = s_ if best_s is None else torch.where(better, s_, best_s)
        assert torch.equal(q.scale.data, best_s.float().flatten())


def test_mse_search_on_huge_tensors_uses_a_fixed_subset(monkeypatch):
    from dfquant.quant import quantizers

    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(2)).relu()
    full = UniformQuantizer(4)
    full.init_range(x)
    monkeypatch.setattr(quantizers, "MSE_SAMPLE", 4000)  # x has 64000 elements
    a, b = UniformQuantizer(4), UniformQuantizer(4)
    a.init_range(x)
    b.init_range(x)
    assert torch.equal(a.scale.data, b.scale.data)                         # deterministic
    assert torch.allclose(a.scale.data, full.scale.data, rtol=0.1)         # close to the full search
    monkeypatch.setattr(quantizers, "MSE_SAMPLE", 10**6)
    c = UniformQuantizer(4)
    c.init_range(x)
    assert torch.equal(c.scale.data, full.scale.data)                      # below the limit: every element


def _genie_init_scale(x: torch.Tensor, bits: int) -> float:
    """SamsungLabs/Genie quantizer.py ``init_scale`` for a per-tensor symmetric activation, written out: for clip
    ratios 1.0, 0.99, .., 0.01 of m = max|x|, the range [-m r, m r] (signed) or [0, m r] on 2^b - 1 steps, scored
    on the affine form (zero point round(-min / step)) by the mean of |x - x_q|^2.4; the best step."""
    m, n = x.abs().max(), 2**bits - 1
    signed = bool(x.min() < 0)
    best, step = float("inf"), None
    for r in torch.arange(1.0, 0.0, -0.01):
        hi, lo = m * r, (-m * r if signed else torch.zeros(()))
        delta = (hi - lo) / n
        zp = (-lo / delta).round()
        xq = (torch.clamp(torch.round(x / delta) + zp, 0, n) - zp) * delta
        score = (x - xq).abs().pow(2.4).mean().item()
        if score < best:
            best, step = score, delta.item()
    return step


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_span_step_matches_genie(bits):
    """genie-m's signed activation grid (``signed_step="span"``): levels -2^(b-1)..2^(b-1)-1 with the step
    2 max / (2^b - 1), range searched exactly as Genie's init_scale; unsigned grids are the same either way."""
    g = torch.Generator().manual_seed(bits)
    signed_x = torch.randn(16, 8, 6, 6, generator=g) * 1.5 - 0.2
    unsigned_x = torch.randn(16, 8, 6, 6, generator=g).relu()
    m = signed_x.abs().max()
    q = UniformQuantizer(bits, symmetric=True, learn_scale=True, signed_step="span")
    q.init_range(signed_x, method="minmax")
    assert q.qrange == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert q.scale.item() == pytest.approx(2 * m.item() / (2**bits - 1), rel=1e-6)
    levels = q(signed_x).detach() / q.scale
    qmin, qmax = q.qrange
    assert torch.allclose(levels, levels.round(), atol=1e-4) and qmin <= levels.min() and levels.max() <= qmax
    assert levels.flatten()[signed_x.abs().argmax()].round().item() in (qmin, qmax)  # +-m at -+(2^b - 1) / 2 steps
    old = UniformQuantizer(bits, symmetric=True, learn_scale=True)  # dfquant's former grid: max on the top level
    old.init_range(signed_x, method="minmax")
    assert old.scale.item() == pytest.approx(m.item() / (2 ** (bits - 1) - 1), rel=1e-6)
    for x in (signed_x, unsigned_x):
        span = UniformQuantizer(bits, symmetric=True, learn_scale=True, signed_step="span")
        span.init_range(x)
        assert span.scale.item() == pytest.approx(_genie_init_scale(x, bits), rel=1e-5)
    qmax = UniformQuantizer(bits, symmetric=True, learn_scale=True)
    qmax.init_range(unsigned_x)
    assert qmax.scale.item() == pytest.approx(_genie_init_scale(unsigned_x, bits), rel=1e-5)
    with pytest.raises(ValueError, match="signed_step"):
        UniformQuantizer(bits, symmetric=True, signed_step="half")


def test_genie_m_preset_uses_the_span_step_and_the_former_grid_by_name():
    from dfquant.errors import DfqError
    from dfquant.quant.modules import _act_quantizer
    from dfquant.quant.transform import make_quant_config

    assert _act_quantizer(4, make_quant_config("genie-m", 4, 4)).signed_step == "span"
    assert _act_quantizer(4, make_quant_config("genie-m", 4, 4, act_signed_step="qmax")).signed_step == "qmax"
    assert {make_quant_config(a, 4, 4).act_signed_step for a in ("brecq", "qdrop", "adaround")} == {"qmax"}
    # Genie's STE round_ste(clamp(x / s)); BRECQ's and QDrop's clamp(round_ste(x / s))
    assert _act_quantizer(4, make_quant_config("genie-m", 4, 4)).clamp_first
    assert not _act_quantizer(4, make_quant_config("genie-m", 4, 4, act_clamp_first=False)).clamp_first
    assert not any(make_quant_config(a, 4, 4).act_clamp_first for a in ("brecq", "qdrop", "adaround"))
    with pytest.raises(DfqError, match="act_signed_step 'half' is not one of qmax, span"):
        make_quant_config("genie-m", 4, 4, act_signed_step="half")
    with pytest.raises(DfqError, match="unknown quantization setting"):
        make_quant_config("genie-m", 4, 4, signed_step="qmax")


@pytest.mark.parametrize("fused", [True, False])
def test_clamp_first_passes_gradients_inside_the_range_like_genie(fused, monkeypatch):
    """Genie's round_ste(clamp(x / s)) gives the same values as clamp(round_ste(x / s)) but its STE passes the
    gradient wherever x / s is strictly inside the range, also within half a step of a bound."""
    import dfquant.quant.quantizers as quantizers

    monkeypatch.setattr(quantizers, "FUSED", fused)
    grads, values = {}, {}
    for clamp_first in (False, True):
        q = UniformQuantizer(2, symmetric=True, signed=False, learn_scale=True, clamp_first=clamp_first)
        q.set_params(torch.tensor([0.5]), torch.zeros(1))
        q.initialized = True
        x = (torch.tensor([0.2, 0.7, 2.7, 3.4]) * 0.5).requires_grad_()
        out = q(x)
        out.backward(torch.ones_like(out))
        grads[clamp_first], values[clamp_first] = (x.grad.clone(), q.scale.grad.clone()), out.detach()
    assert torch.equal(values[False], values[True])
    assert grads[False][0].tolist() == [0.0, 1.0, 0.0, 0.0]  # rounded 0 and 3 sit on the bounds
    assert grads[True][0].tolist() == [1.0, 1.0, 1.0, 0.0]
    # d out / d s: (c - u) where the gradient passes, c at or beyond a bound (c = 0, 1, 3, 3)
    assert grads[False][1].item() == pytest.approx(0 + (1 - 0.7) + 3 + 3)
    assert grads[True][1].item() == pytest.approx((0 - 0.2) + (1 - 0.7) + (3 - 2.7) + 3)


def _brecq_mse_init(x: torch.Tensor, bits: int) -> tuple[float, float]:
    """yhhhli/BRECQ (and wimh966/QDrop) ``UniformAffineQuantizer`` per-tensor ``mse`` init, written out: for
    i in 0..79, the range [min, max] * (1 - 0.01 i) on 2^b - 1 steps, zero point round(-min / step), scored by
    the mean of |x - x_q|^2.4; the best step and zero point."""
    lo, hi, n = x.min(), x.max(), 2**bits - 1
    best, out = float("inf"), None
    for i in range(80):
        new_lo, new_hi = lo * (1.0 - i * 0.01), hi * (1.0 - i * 0.01)
        delta = (new_hi - new_lo) / n
        zp = (-new_lo / delta).round()
        xq = (torch.clamp(torch.round(x / delta) + zp, 0, n) - zp) * delta
        score = (x - xq).abs().pow(2.4).mean().item()
        if score < best:
            best, out = score, (delta.item(), zp.item())
    return out


@pytest.mark.parametrize("algo", ["brecq", "adaround"])
def test_brecq_family_activation_grid_is_the_reference_affine_one(algo):
    """BRECQ/AdaRound presets: affine activation grids, range searched over 80 clip ratios as BRECQ's
    UniformAffineQuantizer does, so a signed input gets an asymmetric grid and no ratio below 0.21 is chosen."""
    from dfquant.errors import DfqError
    from dfquant.quant.modules import _act_quantizer
    from dfquant.quant.transform import make_quant_config

    g = torch.Generator().manual_seed(3)
    signed_x = torch.randn(16, 8, 6, 6, generator=g) * 1.5 + 0.8          # asymmetric: min ~ -6, max ~ 8
    cfg = make_quant_config(algo, 4, 4)
    assert (cfg.act_symmetric, cfg.clip_ratios) == (False, 80)
    for bits in (2, 4):
        q = _act_quantizer(bits, cfg)
        q.init_range(signed_x)
        step, zp = _brecq_mse_init(signed_x, bits)
        assert q.scale.item() == pytest.approx(step, rel=1e-5) and q.zero_point.item() == zp
        assert 0 < zp < 2**bits - 1                                          # neither symmetric nor unsigned
    # one far outlier at 2 bits: Genie's 100 ratios clip the range to 0.06 of it, the 80 ratios stop at 0.21
    spiky = torch.cat([torch.randn(20000, generator=g).abs(), torch.tensor([40.0])])
    genie, brecq = UniformQuantizer(2), UniformQuantizer(2, clip_ratios=80)
    genie.init_range(spiky)
    brecq.init_range(spiky)
    assert genie.scale.item() < 0.2 * 40 / 3 <= brecq.scale.item()
    assert brecq.scale.item() == pytest.approx(_brecq_mse_init(spiky, 2)[0], rel=1e-5)
    assert make_quant_config("genie-m", 4, 4).clip_ratios == 100
    qdrop = make_quant_config("qdrop", 4, 4)  # QDrop's MSEObserver: affine, 100 ranges
    assert (qdrop.act_symmetric, qdrop.clip_ratios) == (False, 100)
    with pytest.raises(DfqError, match="clip_ratios 0 is not an integer from 1 to 100"):
        make_quant_config(algo, 4, 4, clip_ratios=0)


def _qdrop_2d_search(x: torch.Tensor, bits: int, ch_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """QDrop's MSEObserver.perform_2D_search written out: ranges xrange * i / 100 (i = 1..100) and at each one every
    zero point, scored by the mean |x - Q(x)|^2.4 (per channel for weights), strict improvement in that order."""
    qmax = 2**bits - 1
    rows = x.reshape(1, -1) if ch_axis is None else x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)
    x_min, x_max = rows.min(1).values.clamp_max(0), rows.max(1).values.clamp_min(0)
    best = torch.full_like(x_min, 1e10)
    scale, zp = torch.zeros_like(x_min), torch.zeros_like(x_min)
    for i in range(1, 101):
        delta = (x_max - x_min) / 100 * i / qmax
        for z in range(0, qmax + 1):
            new_min, new_max = -z * delta, (x_max - x_min) / 100 * i - z * delta
            s = ((new_max.clamp_min(0) - new_min.clamp_max(0)) / qmax).clamp_min(1e-8)
            zero = (-torch.round(new_min.clamp_max(0) / s)).clamp(0, qmax)
            xq = (torch.clamp(torch.round(rows / s[:, None]) + zero[:, None], 0, qmax) - zero[:, None]) * s[:, None]
            score = (xq - rows).abs().pow(2.4).mean(1)
            better = score < best
            scale, zp, best = torch.where(better, s, scale), torch.where(better, zero, zp), torch.minimum(score, best)
    return scale, zp


def test_qdrop_zero_point_search_is_the_reference_2d_search(monkeypatch):
    """QDrop's preset searches every (range, zero point) pair for two-sided tensors, weights per channel and
    activations per tensor; one-sided data keeps the 1-D search, and so do the other presets."""
    from dfquant.quant.modules import QuantLayer, _act_quantizer
    from dfquant.quant.transform import make_quant_config

    g = torch.Generator().manual_seed(5)
    cfg = make_quant_config("qdrop", 4, 4)
    assert cfg.zero_point_search and not make_quant_config("brecq", 4, 4).zero_point_search
    # a skewed two-sided activation: the error-optimal zero point is not the one min/max centring gives
    act = torch.cat([torch.randn(6000, generator=g).abs() ** 2 * 3, -torch.rand(2000, generator=g) * 0.5,
                     torch.tensor([-6.0])]).view(1, -1, 1, 1)
    for bits, x in ((2, act), (4, act), (8, act[:, :1500])):  # 8 bits: the reference's 25,600 candidates, fewer elements
        q = _act_quantizer(bits, cfg)
        q.init_range(x)
        s_ref, z_ref = _qdrop_2d_search(x, bits, None)
        assert q.scale.item() == pytest.approx(s_ref.item(), rel=1e-5) and q.zero_point.item() == z_ref.item()
        one_d = _act_quantizer(bits, make_quant_config("qdrop", 4, 4, zero_point_search=False))
        one_d.init_range(x)
        err_2d, err_1d = ((m(x) - x).abs().pow(2.4).sum().item() for m in (q, one_d))
        assert err_2d <= err_1d * (1 + 1e-6)
        if bits == 4:  # the 1-D search lands elsewhere on this data
            assert one_d.zero_point.item() != z_ref.item() and err_2d < 0.9 * err_1d
    conv = nn.Conv2d(3, 6, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(6, 3, 3, 3, generator=g) + torch.linspace(-1, 1, 6).view(6, 1, 1, 1))
        conv.weight[0].abs_()           # an all-positive channel and an all-negative one: their range includes 0
        conv.weight[5].abs_().neg_()
    for bits in (2, 4):
        layer = QuantLayer(conv, bits, None, cfg)
        s_ref, z_ref = _qdrop_2d_search(conv.weight.detach(), bits, 0)
        torch.testing.assert_close(layer.wq.scale.detach(), s_ref, rtol=1e-5, atol=0)
        assert torch.equal(layer.wq.zero_point, z_ref)
    # one-sided data (here with exact zeros, as after a ReLU): QDrop's 1-D branch, not the 2-D search
    from dfquant.quant.quantizers import UniformQuantizer as UQ

    def no_2d(*args, **kwargs):
        raise AssertionError("the 2-D search ran on one-sided data")

    monkeypatch.setattr(UQ, "_search_zero_point", no_2d)
    a, b = _act_quantizer(4, cfg), _act_quantizer(4, make_quant_config("qdrop", 4, 4, zero_point_search=False))
    a.init_range(act.relu())
    b.init_range(act.relu())
    assert (a.scale.item(), a.zero_point.item()) == (b.scale.item(), b.zero_point.item())
