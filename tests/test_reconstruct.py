import copy

import pytest
import torch

from dfquant.errors import DfqError
from dfquant.models.evaluate import evaluate
from dfquant.quant.api import make_quant_config, quantize
from dfquant.quant.bn import batchnorms
from dfquant.quant.modules import QuantBlock, QuantLayer, set_quant_state
from dfquant.quant.transform import fold_bn, quantize_model, recon_units


@pytest.fixture(scope="module")
def calib(resnet20):
    from dfquant.data import fmnist

    x, _ = fmnist.load_split("A", limit=128, seed=0)
    return resnet20.normalize(x)


def test_transform_conventions(resnet20):
    q = quantize_model(resnet20.model, make_quant_config("genie-m", 4, 4))
    assert q.conv1.wq.bits == 8 and q.conv1.aq is None          # first layer: W8, input unquantized
    assert q.fc.wq.bits == 8 and q.fc.aq.bits == 8               # last layer: W8A8
    assert isinstance(q.layer1[0], QuantBlock) and q.layer1[0].aq.bits == 8  # second layer input A8 (Genie/BRECQ)
    assert q.layer1[1].aq.bits == 4 and q.layer1[1].block.conv1.aq is None   # block input quantized once
    assert q.layer1[1].block.conv2.aq.bits == 4 and q.layer1[1].block.conv2.wq.bits == 4
    assert q.layer2[0].block.downsample[0].aq is None            # shortcut conv shares the block's quantized input
    qd = quantize_model(resnet20.model, make_quant_config("qdrop", 4, 4))
    assert qd.layer1[0].aq.bits == 4                              # QDrop: no 8-bit second layer
    assert recon_units(q)[:3] == ["conv1", "layer1.0", "layer1.1"] and recon_units(q)[-1] == "fc"
    assert len(recon_units(q, "layer")) == sum(isinstance(m, QuantLayer) for m in q.modules())


def test_bn_folding_preserves_function(resnet20):
    import copy

    x = torch.randn(4, 3, 32, 32)
    folded = fold_bn(copy.deepcopy(resnet20.model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), resnet20.model(x), atol=1e-4)


def test_quant_disabled_is_identity(resnet20):
    q = quantize_model(resnet20.model, make_quant_config("genie-m", 4, 4))
    set_quant_state(q, weights=False, acts=False)
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(q(x), resnet20.model(x), atol=1e-5)


def test_reconstruction_lowers_block_loss(resnet20, calib):
    # 64 images, batch 16: half the per-step work of 128 at batch 32, and the same drop (layer2.1's last-10 /
    # first-10 mean: 0.83 here, 0.84 at 128 x 32)
    trace: list = []
    qmodel, info = quantize(resnet20.model, calib[:64], "genie-m", 2, 4, iters=60, batch_size=16, trace=trace,
                            progress=False)
    block = [t["rec_loss"] for t in trace if t["unit"] == "layer2.1"]
    assert len(block) == 60
    assert sum(block[-10:]) / 10 < 0.97 * sum(block[:10]) / 10
    assert all(t["grad_norm"] >= 0 for t in trace)
    for ql in (m for m in qmodel.modules() if isinstance(m, QuantLayer)):
        assert ql.soft is not None and ql.soft.hard


def test_w8a8_resnet20_within_half_point(resnet20, calib):
    # the MSE range search of every activation runs on all calibration images: 32 of them cost a quarter of 128
    # and give the same 8-bit model accuracy (|FP - W8A8| = 0.0 points with 32 or 128, 0.1 with 64)
    qmodel, _ = quantize(resnet20.model, calib[:32], "mse", 8, 8, iters=0, progress=False)
    fp = evaluate(resnet20, progress=False, limit=2000)
    q8 = evaluate(resnet20, qmodel, progress=False, limit=2000)
    assert abs(fp - q8) <= 0.5


def test_bad_inputs(resnet20, calib):
    with pytest.raises(DfqError, match="wbits=9") as err:
        make_quant_config("genie-m", 9, 4)
    assert err.value.render().startswith("--wbits 9 is not supported")
    with pytest.raises(DfqError, match="unknown algorithm"):
        make_quant_config("gptq", 4, 4)
    with pytest.raises(DfqError, match="fewer than batch_size=32"):
        quantize(resnet20.model, calib[:8], "genie-m", 4, 4, iters=1, batch_size=32, progress=False)


def test_nan_loss_stops_with_block_name(resnet20, calib):
    bad = calib.clone()
    bad[:, 0, 0, 0] = float("nan")
    with pytest.raises(DfqError, match="in block conv1"):
        quantize(resnet20.model, bad, "genie-m", 4, 4, iters=5, batch_size=32, progress=False)


def test_checkpoint_round_trip(resnet20, calib, tmp_path):
    from dfquant.models.source import load_quantized_spec
    from dfquant.quant.checkpoint import save_quantized

    qmodel, info = quantize(resnet20.model, calib, "genie-m", 3, 3, iters=3, progress=False)
    save_quantized(tmp_path, resnet20.record(), qmodel, info["quant"], {})
    _, loaded = load_quantized_spec(tmp_path)
    x = calib[:16]
    assert torch.allclose(loaded(x), qmodel(x), atol=1e-5)


def test_fp_targets_in_budgeted_chunks_give_the_same_model(resnet20, calib, monkeypatch):
    """A RAM budget too small for all FP targets captures them a few units at a time (spilling to
    disk); the quantized model is bit-identical to one captured in a single pass."""
    from dfquant.quant import cache, reconstruct

    passes: list[int] = []
    peak = {"ram": 0}
    real_capture_all, real_init = reconstruct.capture_all, cache.ActivationCache.__init__

    def counting_capture_all(model, modules, *a, **k):
        passes.append(len(modules))
        return real_capture_all(model, modules, *a, **k)

    def tracking_init(self, *a, **k):
        real_init(self, *a, **k)
        peak["ram"] = max(peak["ram"], cache.ActivationCache.ram_in_use)

    calib = calib[:64]
    # batch 16: Genie-M initialises the activation ranges on the first batch (the bulk of this test's time)
    one_pass, _ = quantize(resnet20.model, calib, "genie-m", 4, 4, iters=1, batch_size=16, progress=False)
    monkeypatch.setattr(reconstruct, "capture_all", counting_capture_all)
    monkeypatch.setattr(cache.ActivationCache, "__init__", tracking_init)
    budget_gb = 2e-3  # 2 MiB: one ResNet-20 block's input + output for 64 images is 8 MiB
    chunked, _ = quantize(resnet20.model, calib, "genie-m", 4, 4, iters=1, batch_size=16, progress=False,
                          recon={"cache_ram_gb": budget_gb})
    assert len(passes) > 1 and sum(passes) == len(recon_units(chunked))
    assert peak["ram"] <= budget_gb * 2**30
    a, b = one_pass.state_dict(), chunked.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reconstruction_and_joint_keep_batchnorm_statistics(resnet20, calib):
    """Genie-M keeps BatchNorm unfolded: its running statistics must survive reconstruction and
    joint PTQ (training mode is for the quantizers only)."""
    from dfquant.quant.joint import joint_finetune

    q, _ = quantize(resnet20.model, calib[:64], "genie-m", 4, 4, iters=2, progress=False)
    bns = [m for m in q.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ref = [m for m in resnet20.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == len(ref) > 0
    assert all(torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
               for a, b in zip(bns, ref))
    joint_finetune(q, calib[:64], iters=2, progress=False)
    assert all(torch.equal(a.running_mean, b.running_mean) for a, b in zip(bns, ref))


def test_relative_bn_recalibration_matches_fp_statistics_after_quantization(resnet20, calib):
    """After relative re-estimation, the first BN (whose only quantized upstream op is the stem conv)
    normalizes the quantized model's features to the FP model's output statistics on the same images."""
    x = calib[:64]
    q, info = quantize(resnet20.model, x, "genie-m", 2, 4, iters=1, progress=False, bn_recalib="relative")
    assert info["bn_layers_reestimated"] == 21
    plain = copy.deepcopy(q)  # the same model with the FP statistics back (re-estimation changes nothing else)
    for a, b in zip(batchnorms(plain), batchnorms(resnet20.model), strict=True):
        a.running_mean.copy_(b.running_mean)
        a.running_var.copy_(b.running_var)

    def bn1_out(model):
        out = []
        h = model.get_submodule("bn1").register_forward_hook(lambda m, i, o: out.append(o.detach()))
        with torch.no_grad():
            model(x)
        h.remove()
        return out[0].mean((0, 2, 3))

    fp, recal, before = bn1_out(resnet20.model), bn1_out(q), bn1_out(plain)
    assert (recal - fp).abs().max() < 1e-3 < (before - fp).abs().max()
    with pytest.raises(DfqError, match="not one of relative, absolute, none"):
        quantize(resnet20.model, x, "genie-m", 4, 4, iters=1, progress=False, bn_recalib="yes")


def _conv_unit(seed: int = 0):
    """One 3x3 conv as a reconstruction unit, W4, no activation quantizer (so the loss is hand-computable)."""
    from dfquant.quant.modules import QuantConfig

    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    return conv, QuantLayer(copy.deepcopy(conv), 4, None, QuantConfig())


def test_block_loss_matches_reference_formula():
    """Iteration 0's objective equals Genie's reconstruct.py computed by hand:
    (y_q - y).pow(2).sum(1).mean() + round_weight * sum (1 - |2 h(V) - 1|^beta)."""
    from dfquant.quant.reconstruct import ReconConfig, reconstruct_unit

    conv, unit = _conv_unit()
    x_q, x_fp = torch.randn(8, 3, 6, 6), torch.randn(8, 3, 6, 6)
    y_fp = conv(x_fp).detach() + 0.1 * torch.randn(8, 5, 6, 6)
    s0 = unit.wq.scale.detach().view(-1, 1, 1, 1)
    rest = conv.weight.detach() / s0 - torch.floor(conv.weight.detach() / s0)
    # h(V) starts at the fractional remainder: iteration 0 computes conv(x_q, s * (clamp(floor + rest + z) - z)),
    # the FP weights wherever the clip range does not cut them
    z = unit.wq.zero_point.view(-1, 1, 1, 1)
    w_soft = s0 * (torch.clamp(torch.floor(conv.weight.detach() / s0) + rest + z, 0, 15) - z)
    y_soft = torch.nn.functional.conv2d(x_q, w_soft, conv.bias.detach(), padding=1)
    rec_hand = (y_soft - y_fp).pow(2).sum(1).mean()
    trace: list = []
    cfg = ReconConfig.preset("genie-m", iters=1, batch_size=8, warmup=0.0, drop_prob=0.0)
    reconstruct_unit(unit, x_q, x_fp, y_fp, cfg, "conv", trace)
    beta = 2.0  # the reference LinearTempDecay at count 1 of 1 iteration (warm-up 0): end temperature
    round_hand = 1.0 * (1 - (2 * rest - 1).abs().pow(beta)).sum()
    assert cfg.round_weight == 1.0
    assert trace[0]["rec_loss"] == pytest.approx(rec_hand.item(), rel=1e-4)
    assert trace[0]["round_loss"] == pytest.approx(round_hand.item(), rel=1e-4)
    # the old reduction summed over C*H*W: H*W (= 36) times the reference's reconstruction term
    from dfquant.quant.reconstruct import recon_loss

    out = y_soft
    assert recon_loss(out, y_fp, "sample").item() == pytest.approx(36 * recon_loss(out, y_fp).item(), rel=1e-5)
    tokens = torch.randn(2, 4, 6)  # (N, tokens, D): the sum runs over D
    assert recon_loss(tokens, torch.zeros_like(tokens)).item() == pytest.approx(tokens.pow(2).sum(-1).mean().item())


def test_reference_schedules_and_sampling():
    """Beta follows the reference LinearTempDecay; Genie's batches cover every image once per epoch;
    the rounding learning rate stays constant while the step sizes decay (cosine to 0)."""
    from dfquant.quant.reconstruct import ReconConfig, _Batches, _Beta, _optimizer

    beta = _Beta(100, 0.2, 20.0, 2.0)
    assert beta(18) is None and beta(19) == pytest.approx(20.0) and beta(99) == pytest.approx(2.0)
    assert beta(59) == pytest.approx(2 + 18 * (1 - (60 - 20) / 80))
    b = _Batches(10, 4, "epoch", 0)
    epoch = torch.cat([b.next(), b.next()])
    assert len(set(epoch.tolist())) == 8  # without replacement within an epoch (the 2 left over start the next)
    conv, unit = _conv_unit(1)
    softs = [unit.enable_soft_rounding(True)]
    for schedule, v_lr in (("constant", 1e-3), ("cosine", 0.5e-3)):
        groups, opt, sched = _optimizer(softs, [], ReconConfig.preset("genie-m", iters=20, rounding_schedule=schedule))
        for _ in range(10):
            opt.step()
            sched.step()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([v_lr, 0.5e-4])
    with pytest.raises(DfqError, match="sampling 'shuffle' is not one of"):
        ReconConfig.preset("genie-m", sampling="shuffle")


def test_fused_quantizer_keeps_the_loss_curve(resnet20, monkeypatch):
    """The fused fake-quant node (speed) gives the same Genie-M loss curve as plain autograd, batch for batch."""
    import dfquant.quant.quantizers as quantizers
    from dfquant.quant.reconstruct import ReconConfig, reconstruct_unit

    q = quantize_model(resnet20.model, make_quant_config("genie-m", 2, 4))
    x = torch.randn(16, 16, 32, 32).relu()
    with torch.no_grad():
        y = resnet20.model.layer1[1](x)
    curves = []
    for fused in (True, False):
        monkeypatch.setattr(quantizers, "FUSED", fused)
        unit, trace = copy.deepcopy(q.layer1[1]), []
        torch.manual_seed(0)  # the QDrop masks
        reconstruct_unit(unit, x, x + 0.05, y, ReconConfig.preset("genie-m", iters=25, batch_size=8, warmup=0.0), "b", trace)
        curves.append(torch.tensor([[t["rec_loss"], t["round_loss"], t["grad_norm"]] for t in trace]))
    assert torch.allclose(curves[0], curves[1], rtol=1e-3, atol=1e-6)
    assert curves[0][:, 0].std() > 0  # the curve moves: the comparison is not between constants


def test_brecq_learns_weights_then_activation_steps(resnet20, calib, monkeypatch):
    """BRECQ's main_imagenet.py: pass 1 learns every unit's rounding with activation quantization off (the steps
    stay uninitialised); all steps are then initialised in one pass through the model; pass 2 learns only them
    (the quantized weights do not move) for a quarter of the iterations, without a rounding term."""
    import dfquant.quant.reconstruct as recon
    from dfquant.quant.modules import act_quantizers
    from dfquant.quant.reconstruct import ReconConfig

    cfg = ReconConfig.preset("brecq")
    assert (cfg.stages, cfg.act_init_images, cfg.lr_act_scale, cfg.act_stage_p) == ("weights-then-acts", 64, 4e-4, 2.4)
    assert ReconConfig.preset("adaround").stages == "weights-then-acts"
    assert {ReconConfig.preset(a).stages for a in ("genie-m", "qdrop")} == {"joint"}
    assert ReconConfig.preset("brecq", stages="joint").stages == "joint"   # one pass, by name
    with pytest.raises(DfqError, match="act_init 'images'"):
        ReconConfig.preset("brecq", act_init="first-batch")
    seen, inner = [], recon.reconstruct_unit

    def spy(unit, x_q, x_fp, y_fp, cfg, name, trace, progress, on_rate, stage):
        aqs = [q for q in act_quantizers(unit) if hasattr(q, "initialized")]
        layers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
        before = ([q.initialized for q in aqs], [q.scale.detach().clone() for q in aqs])
        w_before = [ql.qweight().detach().clone() for ql in layers] if stage == "acts" else None
        out = inner(unit, x_q, x_fp, y_fp, cfg, name, trace, progress, on_rate, stage)
        if stage == "weights":
            assert not any(before[0]) and not any(q.initialized for q in aqs)   # acts off: steps untouched
            assert all(ql.soft is not None and ql.soft.hard for ql in layers)
        else:
            assert all(before[0]) and x_q is x_fp                                # initialised before pass 2; FP inputs
            assert all(torch.equal(w, ql.qweight()) for w, ql in zip(w_before, layers))  # weights untouched
            if aqs:
                assert any(not torch.equal(s, q.scale) for s, q in zip(before[1], aqs))  # the steps learn
        seen.append((name, stage, out["iters"]))
        return out

    monkeypatch.setattr(recon, "reconstruct_unit", spy)
    trace: list = []
    _, info = quantize(resnet20.model, calib[:64], "brecq", 4, 4, iters=8, batch_size=16, trace=trace, progress=False)
    units = recon_units(quantize_model(resnet20.model, make_quant_config("brecq", 4, 4)))
    assert [(u["unit"], u["stage"]) for u in info["units"]] == [(u, s) for s in ("weights", "acts") for u in units]
    acts = [it for name, stage, it in seen if stage == "acts" and name == "layer2.1"]
    assert acts == [2]                                                   # 0.25 * 8 iterations
    assert [t["round_loss"] for t in trace if t["unit"] == "layer2.1"][-2:] == [0.0, 0.0]
    p24 = torch.randn(3, 4, 2, 2)
    assert recon.recon_loss(p24, torch.zeros_like(p24), p=2.4).item() == pytest.approx(
        p24.abs().pow(2.4).sum(1).mean().item(), rel=1e-6)


def test_time_estimate_carries_measured_unit_work_over_to_every_unit():
    """The estimate's step model, a * calls + g (g: the unit's measured forward + backward), with a fitted on the
    timed units, reproduces a third unit whose backward is heavy for its forward (a depthwise convolution's); the
    activation-range initialisation scales with the elements the unit's quantizers take in; captures grow with the
    forward before each unit and loss evaluations with its own; timed units faster than g scale g alone."""
    from dfquant.quant.estimate import estimate_seconds

    profile = {"stem": (1e-3, 2), "block": (10e-3, 10), "late": (5e-3, 10)}   # forward seconds, module calls
    work = {"stem": (3e-3, 0), "block": (30e-3, 1000), "late": (40e-3, 500)}  # forward + backward seconds, elements
    step = {u: 1e-3 * c + work[u][0] for u, (f, c) in profile.items()}       # a = 1 ms per call
    timed = {"stem": {"rate": step["stem"], "capture": 0.01, "rest": 0.0, "init": 0.0},
             "block": {"rate": step["block"], "capture": 0.1, "init": 0.2}}
    units = list(profile)
    capture = 0.01 + 0.1 + (0.1 + 32 * 10e-3)      # "late" runs 10 ms more of forward before it than "block"
    init = 0.2 + 0.2 * 500 / 1000                   # 0.2 s for the block's 1000 elements
    evals = 24 * ((10e-3 - 1e-3) + (5e-3 - 1e-3))  # 24 batches of loss evaluation, beyond the stem's (its rest)
    assert estimate_seconds(units, profile, work, timed, 100, 32, 24, 1, 0.0) == pytest.approx(
        100 * sum(step.values()) + capture + init + evals)
    assert 100 * step["late"] > 100 * 5 * profile["late"][0]  # a forward-scaled step would under-count "late"
    slow = {u: (10 * g, e) for u, (g, e) in work.items()}   # timed rates below g: g scaled by the rates' share
    share = sum(step[u] for u in ("stem", "block")) / sum(slow[u][0] for u in ("stem", "block"))
    assert estimate_seconds(units, profile, slow, timed, 100, 32, 24, 2, 0.5) == pytest.approx(
        100 * share * sum(g for g, _ in slow.values()) + capture + 2 * (init + evals + 0.5))


def test_unit_profile_measures_each_unit_without_side_effects(resnet20, calib):
    """The estimate's per-unit work: a forward and backward of each full-precision unit on the probe batch, and the
    elements entering its activation quantizers (ResNet-20 layer1.1: its block input and conv2's input, 16 x 32 x
    32 per image; the stem has none); it draws no random numbers and leaves no gradients, and with the estimate
    (progress on) the quantized model is bit-identical to one without."""
    from dfquant.quant.estimate import unit_profile

    q = quantize_model(resnet20.model, make_quant_config("genie-m", 4, 4))
    set_quant_state(q, weights=False, acts=False)
    units = recon_units(q)
    rng = torch.get_rng_state()
    work = unit_profile(q, {u: q.get_submodule(u) for u in units}, calib[:4])
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in q.parameters())
    assert set(work) == set(units) and all(g > 0 for g, _ in work.values())
    assert work["conv1"][1] == 0 and work["layer1.1"][1] == 2 * 4 * 16 * 32 * 32
    x = calib[:32]
    a, _ = quantize(resnet20.model, x, "genie-m", 4, 4, iters=2, batch_size=16, progress=True)
    b, _ = quantize(resnet20.model, x, "genie-m", 4, 4, iters=2, batch_size=16, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loss_before_is_the_rounded_model_and_reconstruction_beats_it(resnet20, calib):
    """``loss_before`` is the unit without reconstruction (nearest-rounded weights at the initial steps), measured
    like ``loss_after`` (hard rounding): after a few Genie-M iterations most units end below it. The soft start
    (``loss_before_soft``, near full-precision weights) is kept beside it."""
    _, info = quantize(resnet20.model, calib[:64], "genie-m", 2, 4, iters=30, batch_size=16, progress=False)
    units = [u for u in info["units"] if u["iters"] > 0]
    assert len(units) == len(recon_units(quantize_model(resnet20.model, make_quant_config("genie-m", 2, 4))))
    improved = [u["unit"] for u in units if u["loss_after"] <= u["loss_before"]]
    assert len(improved) >= 0.8 * len(units), info["units"]
    assert all(u["loss_before_soft"] >= 0 and u["loss_before_soft"] != u["loss_before"] for u in units), info["units"]


def test_measuring_loss_before_leaves_the_quantized_model_unchanged(resnet20, calib, monkeypatch):
    """The rounded-weights measurement draws no random numbers (QDrop's masks, Genie's first-batch activation
    init under drop) and changes no quantizer state: the quantized model, and every later unit's losses, are
    bit-identical to a run without it; the soft rounding it sets aside is back in place before the optimization."""
    import dfquant.quant.reconstruct as recon

    real, seen = recon._rounded_loss, []

    def checked(eval_loss, layers):
        rng, softs = torch.get_rng_state(), [ql.soft for ql in layers]
        state = {k: v.clone() for ql in layers for k, v in ql.state_dict().items()}
        out = real(eval_loss, layers)
        assert torch.equal(rng, torch.get_rng_state()) and all(ql.soft is s for ql, s in zip(layers, softs))
        after = {k: v for ql in layers for k, v in ql.state_dict().items()}
        assert all(torch.equal(state[k], after[k]) for k in state)
        seen.append(out)
        return out

    x = calib[:64]
    monkeypatch.setattr(recon, "_rounded_loss", checked)
    measured, info = quantize(resnet20.model, x, "genie-m", 3, 4, iters=4, batch_size=16, progress=False)
    monkeypatch.setattr(recon, "_rounded_loss", lambda eval_loss, layers: float("nan"))
    plain, info_plain = quantize(resnet20.model, x, "genie-m", 3, 4, iters=4, batch_size=16, progress=False)
    assert seen and [u["loss_before"] for u in info["units"]] == seen
    a, b = measured.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(measured(x[:8]), plain(x[:8]))
    assert [u["loss_after"] for u in info["units"]] == [u["loss_after"] for u in info_plain["units"]]
