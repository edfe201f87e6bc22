"""Deployment target (onnxruntime): the simulation computes what the integer kernels compute, so the export
of a target model is the evaluated model and runs every Conv/MatMul (but the classifier) as an integer kernel."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.api import make_quant_config, quantize
from dfquant.quant.modules import QuantLayer
from dfquant.quant.quantizers import UniformQuantizer

T = {"target": "onnxruntime"}


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(48, 3, 32, 32)


@pytest.fixture(scope="module")
def target_w4a4(images):
    q, info = quantize(_resnet18(), images[:16], "minmax", 4, 4, iters=1, batch_size=16, progress=False, quant=T)
    return q, info


def test_target_plan_quantizes_what_integer_kernels_write(images):
    from dfquant.api import plan as make_plan

    plan = make_plan(_resnet18(), images[:1], algo="genie-m", target="onnxruntime")
    # residual-branch outputs (the folded BN after each block's last conv and the downsample BN), the stem ReLU
    # (it feeds MaxPool, no layer input), the last block's sum (it feeds the pooling)
    expected = {"relu", "layer4.1"} | {f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)} \
        | {f"layer{i}.0.downsample.1" for i in range(2, 5)}
    assert set(plan.outputs) == expected and set(plan.outputs.values()) == {8}
    assert plan.layers["conv1"].abits == 8 and plan.layers["conv1"].input == "own"  # the 8-bit image input
    assert len(plan.folds) == 20  # BN folded for Genie-M too
    text = str(plan)
    assert "target onnxruntime" in text and "output quantizers added (13)" in text
    # the papers' conventions add none of it
    paper = make_plan(_resnet18(), images[:1], algo="genie-m")
    assert paper.outputs == {} and paper.target is None and paper.layers["conv1"].input == "unquantized"


def test_target_simulates_kernel_grids_and_int32_biases(target_w4a4, images):
    q, _ = target_w4a4
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    first = layers["conv1"]
    assert first.wq.bits == 8 and first.wq.qrange == (-128, 127) and not first.wq.zero_point.any()  # symmetric int8
    for name, ql in layers.items():
        if isinstance(ql.layer, nn.Conv2d):
            s_x = ql.input_quantizer.scale.reshape(())
            t = ql.bias().detach() / (s_x * ql.wq.scale.reshape(-1))
            assert torch.allclose(t, t.round(), atol=1e-3), name  # on the int32 grid of s_x * s_w
    # the papers' conventions keep 8-bit weights asymmetric and the float bias
    paper, _ = quantize(_resnet18(), images[:16], "minmax", 8, 8, iters=1, batch_size=16, progress=False)
    ql = next(m for m in paper.modules() if isinstance(m, QuantLayer) and m.wq.bits == 8)
    assert ql.wq.qrange == (0, 255)


def test_target_export_runs_integer_kernels_and_equals_the_simulation(target_w4a4, images, tmp_path):
    pytest.importorskip("onnxruntime")
    from dfquant.quant import export as E

    q, _ = target_w4a4
    summary = E.export_onnx(q, (3, 32, 32), tmp_path / "t.onnx")  # a target model needs no export options
    assert summary["target"] == "onnxruntime" and summary["int32_biases"]["kept_float"] == {}
    rt = E.runtime_graph(tmp_path / "t.onnx")
    assert rt["float"] == 1 and list(rt["float_nodes"]) == ["/fc/Gemm"]  # only the classifier (float logits)
    assert rt["integer"] == 20 and rt["ops"].get("QLinearAdd", 0) == 8
    v = E.verify_onnx(q, tmp_path / "t.onnx", images[16:], torch.zeros(32, dtype=torch.long))
    assert v["passed"] and v["argmax_agreement"] >= 96.0  # float rounding at grid ties only (docs/deployment.md)
    # the same model under the papers' conventions leaves convolutions in float
    paper, _ = quantize(_resnet18(), images[:16], "minmax", 4, 4, iters=1, batch_size=16, progress=False)
    E.export_onnx(paper, (3, 32, 32), tmp_path / "p.onnx", fuse_bias=True)
    assert E.runtime_graph(tmp_path / "p.onnx")["float"] > 5


def test_target_vit_has_uniform_softmax_and_integer_attention(tmp_path):
    pytest.importorskip("onnxruntime")
    timm = pytest.importorskip("timm")
    from dfquant.quant import export as E
    from dfquant.quant.vit import QuantAttention

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=10).eval()
    x = torch.randn(16, 3, 32, 32)
    q, _ = quantize(vit, x, "repq-vit", 4, 4, iters=0, progress=False, quant=T)
    attn = [m for m in q.modules() if isinstance(m, QuantAttention)]
    assert attn and all(isinstance(m.softmax_q, UniformQuantizer) and m.softmax_q.bits == 8 for m in attn)
    E.export_onnx(q, (3, 32, 32), tmp_path / "v.onnx")
    rt = E.runtime_graph(tmp_path / "v.onnx")
    assert list(rt["float_nodes"]) == ["/head/Gemm"], rt["float_nodes"]


def test_target_checkpoint_round_trip(target_w4a4, images, tmp_path):
    from dfquant.api import load, save

    q, info = target_w4a4
    save(tmp_path / "ckpt", q, info)
    again = load(tmp_path / "ckpt", _resnet18())
    assert again.dfq_plan.target == "onnxruntime" and again.dfq_plan.outputs == q.dfq_plan.outputs
    with torch.no_grad():
        assert torch.equal(again(images[16:24]), q(images[16:24]))


def test_target_bad_input_is_one_clear_error(images):
    with pytest.raises(DfqError, match="target='tpu' is not a known deployment target; use one of onnxruntime") as e:
        make_quant_config("genie-m", 4, 4, target="tpu")
    assert e.value.params == ("target",) and e.value.render().startswith("--target 'tpu'")
    with pytest.raises(DfqError, match="fixes fold_bn=True"):
        make_quant_config("genie-m", 4, 4, target="onnxruntime", fold_bn=False)
    with pytest.raises(DfqError, match="folds every BatchNorm.*bn_recalib='none'"):
        quantize(_resnet18(), images[:4], "genie-m", 4, 4, iters=1, progress=False, bn_recalib="relative",
                 quant=copy.deepcopy(T))
