import copy

import pytest
import torch

from dfquant.errors import DfqError
from dfquant.evaluate import evaluate
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
    trace: list = []
    qmodel, info = quantize(resnet20.model, calib, "genie-m", 2, 4, iters=60, batch_size=32, trace=trace, progress=False)
    block = [t["rec_loss"] for t in trace if t["unit"] == "layer2.1"]
    assert len(block) == 60
    assert sum(block[-10:]) / 10 < 0.97 * sum(block[:10]) / 10
    assert all(t["grad_norm"] >= 0 for t in trace)
    for ql in (m for m in qmodel.modules() if isinstance(m, QuantLayer)):
        assert ql.soft is not None and ql.soft.hard


def test_w8a8_resnet20_within_half_point(resnet20, calib):
    qmodel, _ = quantize(resnet20.model, calib, "mse", 8, 8, iters=0, progress=False)
    fp = evaluate(resnet20, progress=False, limit=2000)
    q8 = evaluate(resnet20, qmodel, progress=False, limit=2000)
    assert abs(fp - q8) <= 0.5


def test_bad_inputs(resnet20, calib):
    with pytest.raises(DfqError, match="--wbits 9"):
        make_quant_config("genie-m", 9, 4)
    with pytest.raises(DfqError, match="unknown algorithm"):
        make_quant_config("gptq", 4, 4)
    with pytest.raises(DfqError, match="fewer than the batch size"):
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
    save_quantized(tmp_path, resnet20, qmodel, info["quant"], {})
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
    one_pass, _ = quantize(resnet20.model, calib, "genie-m", 4, 4, iters=1, progress=False)
    monkeypatch.setattr(reconstruct, "capture_all", counting_capture_all)
    monkeypatch.setattr(cache.ActivationCache, "__init__", tracking_init)
    budget_gb = 2e-3  # 2 MiB: one ResNet-20 block's input + output for 64 images is 8 MiB
    chunked, _ = quantize(resnet20.model, calib, "genie-m", 4, 4, iters=1, progress=False, cache_ram_gb=budget_gb)
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
