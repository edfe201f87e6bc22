"""NIPQ data-free QAT, SymReg/SatNL, `dfq qat` (issue 8)."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.modules import act_quantizers
from dfquant.quant.nipq import (NIPQQuantizer, average_weight_bits, budget_penalty, check_qat_args, eval_distill_loss,
                                finalize, layer_costs, prepare_nipq, qat_distill, round_bits, weight_quantizers)
from dfquant.quant.quantizers import UniformQuantizer
from dfquant.models.robust import SatNL, apply_satnl, symreg_loss, symreg_term


@pytest.mark.parametrize("bits", [2, 4])
def test_noise_matches_rounding_error_statistics(bits):
    torch.manual_seed(0)
    q = NIPQQuantizer(bits)
    q.init_range(torch.empty(1000).uniform_(-1, 1), method="minmax")
    x = torch.empty(200_000).uniform_(-1.3, 1.3)  # some values beyond the clip range on both sides
    step = (q.log_hi.exp() + q.log_lo.exp()) / (2**bits - 1)
    q.train()
    noisy = q(x)
    q.eval()
    hard = q(x)
    assert torch.allclose(q.scale, step, rtol=1e-5)  # the hard grid is the clip range over 2^b - 1 steps
    lower, upper = hard.min(), hard.max()
    inside = (x > lower) & (x < upper)
    assert 0.2 < inside.float().mean() < 0.9
    for err in (noisy - x)[inside], (hard - x)[inside]:
        assert abs(err.mean()) < 0.01 * step
        assert abs(err.var() / (step**2 / 12) - 1) < 0.05
        assert err.abs().max() <= step / 2 + 1e-5
    # clipping identical: values outside the range land on the same grid ends in both modes
    assert torch.allclose(noisy[~inside], hard[~inside], atol=1e-6)
    # inside values near an end may leave the range by less than step/2 (their error is still <= step/2)
    assert noisy.min() >= lower - step / 2 and noisy.max() <= upper + step / 2
    # non-negative activations: zero stays exactly zero, no noise below the range
    a = NIPQQuantizer(4)
    r = torch.relu(torch.randn(4096))
    a.init_range(r)
    a.train()
    assert not a.two_sided and (a(r)[r == 0] == 0).all()


def test_bit_width_and_clip_gradients_finite_and_nonzero():
    torch.manual_seed(0)
    q = NIPQQuantizer(3.3, channel_axis=0, learn_bits=True)
    w = torch.randn(8, 16, 3, 3)
    q.init_range(w, method="mse")
    b = float(q.bit_width().detach())
    assert 2 <= b <= 8 and abs(b - 3.3) < 1e-4
    q.train()
    target = torch.randn_like(w)
    (q(w) - target).pow(2).sum().backward()
    for p in (q.bit_logit, q.log_hi, q.log_lo):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # the budget penalty pushes the bits down only above the budget
    model = _tiny()
    qm = prepare_nipq(model, 2, 4, learn_bits=True, init_bits=4, calib=torch.randn(16, 3, 16, 16))
    learned = [q for q, _ in weight_quantizers(qm).values() if q.learn_bits]
    assert len(learned) == 2 and abs(float(average_weight_bits(qm).detach()) - 4) < 1e-4
    assert budget_penalty(qm, 5.0).item() == 0
    budget_penalty(qm, 3.0).backward()
    assert all(q.bit_logit.grad > 0 for q in learned)  # gradient descent lowers the bits


def test_round_bits_respects_budget():
    qm = prepare_nipq(_tiny(), 2, 4, learn_bits=True, init_bits=3, calib=torch.randn(16, 3, 16, 16))
    (n1, (q1, c1)), (n2, (q2, c2)) = [(n, v) for n, v in weight_quantizers(qm).items() if v[0].learn_bits]
    with torch.no_grad():  # 3.6 and 3.4 bits: nearest rounding gives 4 and 3
        for q, b in ((q1, 3.6), (q2, 3.4)):
            q.bit_logit.fill_(torch.logit(torch.tensor((b - 2) / 6)).item())
    assert round_bits(qm) == {n1: 4, n2: 3}
    fixed = round_bits(qm, budget=3.0)
    assert sum(fixed[n] * c for n, c in ((n1, c1), (n2, c2))) / (c1 + c2) <= 3.0 and fixed[n1] == 3


def test_bops_budget_weighs_layers_by_macs_times_input_bits(resnet20):
    x = torch.randn(8, 3, 32, 32)
    qm = prepare_nipq(resnet20.model, 2, 4, learn_bits=True, init_bits=3, calib=x, init_images=8, budget_by="bops")
    cost = {n: c for n, (_, c) in weight_quantizers(qm).items()}
    macs_3x3 = 32 * 32 * 16 * 16 * 9  # one 16->16 3x3 conv at 32x32; every stage of ResNet-20 has the same MACs
    assert cost["layer1.0.block.conv1"] == macs_3x3 * 8  # the second layer's input is 8-bit (the block's quantizer)
    assert cost["layer1.0.block.conv2"] == cost["layer3.2.block.conv2"] == macs_3x3 * 4
    assert cost["layer2.0.block.downsample.0"] == 16 * 16 * 32 * 16 * 4  # 1x1 stride 2, input from the 4-bit block quantizer
    assert cost["conv1"] == 32 * 32 * 16 * 27 * 32 and cost["fc"] == 64 * 10 * 8  # float image input; 8-bit last input
    size = layer_costs(qm, x, "size")
    assert size["layer3.2.block.conv2"] == 16 * size["layer1.0.block.conv2"]  # a size budget weighs them 16:1
    learned = {n: q for n, (q, _) in weight_quantizers(qm).items() if q.learn_bits}
    with torch.no_grad():  # deep layers at 4.4 bits, the rest at 3.4: both round to nearest over a 3.5 budget
        for n, q in learned.items():
            q.bit_logit.fill_(torch.logit(torch.tensor(((4.4 if n.startswith("layer3") else 3.4) - 2) / 6)).item())
    bits = round_bits(qm, budget=3.5)
    assert sum(bits[n] * cost[n] for n in bits) / sum(cost[n] for n in bits) <= 3.5
    info = finalize(qm, x, 3.5, fp_model=resnet20.model, n=8, batch_size=8)
    assert info["budget_by"] == "bops" and info["avg_weight_bits_learned"] <= 3.5
    with pytest.raises(DfqError, match="pass calib"):
        prepare_nipq(resnet20.model, 2, 4, learn_bits=True, budget_by="bops")


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


class _SharedInput(nn.Module):
    """Two convolutions read one tensor (the plan quantizes it once, for both)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.b, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


def test_prepare_builds_pseudo_quantizers_and_finalize_hardens_them(tmp_path):
    """The transform builds NIPQ's quantizers itself (QuantConfig.weight_quantizer / act_quantizer): no plain
    quantizer before finalize, a shared input quantizer shared throughout, a plain model after; a checkpoint keeps
    the conventions only and refuses a config that still carries constructors."""
    from dataclasses import replace

    from dfquant.io import read_json
    from dfquant.quant.checkpoint import ModelRecord, save_quantized

    fp = _SharedInput().eval()
    calib = torch.randn(32, 3, 16, 16)
    q = prepare_nipq(fp, 2, 4, learn_bits=True, init_bits=3, calib=calib)
    assert all(isinstance(m.wq, NIPQQuantizer) for m in q.modules() if hasattr(m, "wq"))
    assert all(type(a) is NIPQQuantizer for a in act_quantizers(q))
    assert [m.wq.learn_bits for m in (q.stem, q.a, q.b, q.fc)] == [False, True, True, False]
    assert q.a.aq is q.b.aq
    qat_distill(q, fp, calib, 2, 1e-3, 3.0, batch_size=16, progress=False)
    finalize(q, calib, 3.0, fp_model=fp)
    assert q.a.aq is q.b.aq and type(q.a.aq) is UniformQuantizer
    assert q.nipq_config.weight_quantizer is None and q.nipq_config.act_quantizer is None
    save_quantized(tmp_path / "ck", ModelRecord("shared"), q, q.nipq_config, {})
    assert "weight_quantizer" not in read_json(tmp_path / "ck" / "quant_config.json")["quant"]
    with pytest.raises(DfqError, match="weight_quantizer"):
        save_quantized(tmp_path / "bad", ModelRecord("shared"), q, replace(q.nipq_config, weight_quantizer=id), {})


def test_qat_resume_matches_straight_run(tmp_path):
    fp = _tiny()
    calib = torch.randn(64, 3, 16, 16)
    kw = dict(lr=1e-3, budget=3.0, batch_size=16, progress=False)
    q1 = prepare_nipq(fp, 2, 4, learn_bits=True, init_bits=3, calib=calib)
    q2 = copy.deepcopy(q1)
    ck = tmp_path / "qat.pt"
    qat_distill(q1, fp, calib, 12, resume=ck, max_steps=5, **kw)
    resumed = qat_distill(copy.deepcopy(q2), fp, calib, 12, resume=ck, **kw)
    straight = qat_distill(q2, fp, calib, 12, **kw)
    assert len(resumed) == 12 and resumed == pytest.approx(straight, rel=1e-4, abs=1e-6)
    with pytest.raises(DfqError, match="other settings"):
        qat_distill(copy.deepcopy(q2), fp, calib, 13, resume=ck, **kw)


def test_qat_lowers_distillation_loss_and_checkpoint_round_trip(resnet20, tmp_path):
    from dfquant.data.calib import load_calibration
    from dfquant.quant.api import make_quant_config
    from dfquant.models.source import load_quantized_spec
    from dfquant.quant.checkpoint import save_quantized

    # 32 images (one batch): every activation range search, at prepare and at finalize with act_reinit, runs on all
    # of them; the distillation loss drops as far as with 64 (after/before 0.29 vs 0.31)
    calib = load_calibration("real:A", resnet20, 32)
    q = prepare_nipq(resnet20.model, 2, 4, calib=calib, init_images=32)
    x = calib[:32]
    before = eval_distill_loss(q, resnet20.model, x)
    losses = qat_distill(q, resnet20.model, calib, iters=15, lr=1e-4, batch_size=32, progress=False)
    after = eval_distill_loss(q, resnet20.model, x)
    assert len(losses) == 15 and all(math.isfinite(v) for v in losses)
    assert after < 0.7 * before, (before, after)
    absolute = copy.deepcopy(q)
    reinit = copy.deepcopy(q)
    learned = [float(a.grid([1], hard=True)[0].detach()) for a in act_quantizers(q)]  # hard step of each learned clip range
    info = finalize(q, calib, fp_model=resnet20.model, n=32, init_images=32)
    assert info["bn_stats"] == "relative" and info["bn_layers_reestimated"] == 21 and info["act_quantizers_reinitialized"] == 0
    # by default the hardened grids keep the clip ranges NIPQ learned
    assert len(learned) > 10 and learned == pytest.approx([float(a.scale.detach()) for a in act_quantizers(q)], rel=1e-5)
    assert finalize(reinit, calib, fp_model=resnet20.model, n=32, init_images=32, act_reinit=True)["act_quantizers_reinitialized"] > 10
    assert not any(isinstance(m, NIPQQuantizer) for m in q.modules())
    assert all(type(a) is UniformQuantizer for a in act_quantizers(q))
    assert eval_distill_loss(q, resnet20.model, x) < before
    # absolute re-estimation replaces the statistics by the calibration set's; on the FP model itself the
    # relative one reproduces the FP statistics exactly (no quantization shift to apply)
    assert finalize(absolute, calib, n=32, init_images=32, act_reinit=False)["bn_stats"] == "absolute"
    fp = copy.deepcopy(resnet20.model)
    from dfquant.quant.bn import reestimate_bn

    reestimate_bn(fp, calib, n=32, reference=resnet20.model)
    for a, b in zip(fp.modules(), resnet20.model.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5) and torch.allclose(a.running_var, b.running_var, rtol=1e-4)
    # mixed bit-widths survive the checkpoint (load restores each quantizer's bits)
    conv = q.get_submodule("layer3.2.block.conv2")
    conv.wq.bits = 3.0
    conv.wq.init_range(conv.layer.weight, method="minmax")
    qcfg = make_quant_config("genie-m", 2, 4, act_symmetric=False)
    save_quantized(tmp_path / "ck", resnet20.record(), q, qcfg, {"algo": "nipq-qat"})
    _, loaded = load_quantized_spec(tmp_path / "ck")
    assert loaded.get_submodule("layer3.2.block.conv2").wq.bits == 3.0
    with torch.no_grad():
        assert torch.allclose(loaded(x), q.eval()(x), atol=1e-5)


def test_symreg_and_satnl():
    v = torch.rand(4, 50) + 0.1
    symmetric = torch.cat([v, -v.flip(1)], 1)
    assert symreg_term(symmetric).item() == pytest.approx(0.0, abs=1e-7)
    skewed = torch.cat([torch.rand(4, 80), -0.1 * torch.rand(4, 20)], 1)
    assert 0 < symreg_term(skewed).item() <= 1
    assert symreg_term(torch.ones(3, 10)).item() == pytest.approx(1.0)
    assert symreg_term(5 * skewed).item() == pytest.approx(symreg_term(skewed).item(), rel=1e-5)  # scale-free
    w = skewed.clone().requires_grad_(True)
    symreg_term(w).backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    model = _tiny()
    assert symreg_loss(model).item() > 0
    x = 100 * torch.randn(1000)
    for mode in ("tanh", "hard"):
        y = SatNL(3.0, mode)(x)
        assert y.min() >= 0 and y.max() <= 3.0 and torch.allclose(SatNL(3.0, mode)(torch.tensor([0.01])), torch.tensor([0.01]), atol=1e-4)
    keys = set(model.state_dict())
    assert apply_satnl(model, 3.0) == 3 and not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert set(model.state_dict()) == keys


def test_registry_loads_robust_variant_with_satnl(resnet20, tmp_path):
    from dfquant.io import save_tensors, write_json
    from dfquant.models.registry import get_model

    save_tensors(tmp_path / "fmnist_resnet20.safetensors", resnet20.model.state_dict())
    write_json(tmp_path / "fmnist_resnet20.json", {"satnl": {"bound": 4.0, "mode": "hard"}, "symreg": 1e-3})
    spec = get_model(f"fmnist/resnet20@{tmp_path}")
    assert spec.embedded and sum(isinstance(m, SatNL) for m in spec.model.modules()) == 10
    with pytest.raises(DfqError, match="train-classifier"):
        get_model(f"fmnist/resnet20@{tmp_path / 'missing'}")


def test_qat_argument_checks():
    check_qat_args(2, 4, 10, 1e-4, True, 3.0, 64, 32)
    for args, msg in [((9, 4, 10, 1e-4, False, None, 64, 32), "--wbits 9"), ((2, 1.58, 10, 1e-4, False, None, 64, 32), "--abits"),
                      ((2, 4, 10, 0.0, False, None, 64, 32), "--lr"), ((2, 4, 10, 1e-4, False, 3.0, 64, 32), "--learn-bits"),
                      ((2, 4, 10, 1e-4, True, None, 64, 32), "--avg-bits above 2"), ((2, 4, 10, 1e-4, False, None, 16, 32), "--n 16"),
                      ((2, 4, 10, 1e-4, False, None, 64, 32, "batch"), "--bn-recalib"),
                      ((2, 4, 10, 1e-4, False, None, 64, 32, "relative", "bops"), "add --learn-bits"),
                      ((2, 4, 10, 1e-4, True, 3.0, 64, 32, "relative", "flops"), "--budget-by flops")]:
        with pytest.raises(DfqError) as err:  # the library names parameters; the CLI renders its flags
            check_qat_args(*args)
        assert msg in err.value.render() and "--" not in str(err.value), (msg, str(err.value))


@pytest.mark.parametrize("args, msg", [(["--wbits", "9"], "error: --wbits 9"),
                                       (["--calib", "no/such/folder"], "error: calibration source")])
def test_cli_qat_rejects_bad_input(tmp_path, args, msg):
    cmd = [sys.executable, "-m", "dfquant.cli", "qat", "fmnist/resnet20", "--calib", "real:A", "--out", str(tmp_path / "q"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(msg), proc.stderr
    assert not (tmp_path / "q").exists()


def test_train_classifier_robust_option(monkeypatch, tmp_path):
    """The --symreg/--satnl training path on a few images (the real run is benchmarks/qat.py's prerequisite)."""
    from dfquant.data import fmnist
    from dfquant.models import train
    from dfquant.models.registry import get_model

    x, y = fmnist.load_split("test", limit=128)
    monkeypatch.setattr(train.fmnist, "load_split", lambda split, **kw: (x, y))
    card = train.train_classifier("resnet20", tmp_path, epochs=1, batch_size=64, symreg=1e-3, satnl=True)
    assert card["symreg"] == 1e-3 and card["satnl"] == {"bound": 4.0, "mode": "tanh"}
    spec = get_model(f"fmnist/resnet20@{tmp_path}")
    assert any(isinstance(m, SatNL) for m in spec.model.modules()) and not any(isinstance(m, nn.ReLU) for m in spec.model.modules())
