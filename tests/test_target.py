"""Deployment target (onnxruntime): the simulation computes what the integer kernels compute, so the export
of a target model is the evaluated model and runs every Conv/MatMul (but the classifier) as an integer kernel."""

import copy
import itertools

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


def _assert_exact(q, path, images):
    """onnxruntime computes the simulation: every class, and the logits up to the classifier's float Gemm."""
    from dfquant.quant import export as E

    v = E.verify_onnx(q, path, images, torch.zeros(len(images), dtype=torch.long))
    assert v["argmax_agreement"] == 100.0 and v["max_abs_diff"] <= 1e-4 * v["max_abs_logit"], v
    return v


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x
        return self.relu(out)


class _Tiny(nn.Module):
    """Each kernel the target simulates: a stem conv whose folded BN leaves an in-place ReLU on its output, a
    residual block (QLinearAdd), a depthwise conv with ReLU6 (int8 weights), a pointwise conv, global average
    pooling (QLinearGlobalAveragePool) and a float classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU(inplace=True)
        self.block = _Block(8)
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                nn.ReLU6(inplace=True))
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pw(self.dw(self.block(self.relu(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _tiny():
    torch.manual_seed(0)
    model = _Tiny().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    return model


# every algorithm reconstructs on the target's simulation and exports exactly (a few iterations each);
# "genie-m+joint" adds the joint end-to-end post-step
@pytest.mark.parametrize("algo,bits", [("minmax", 8), ("genie-m", 8), ("genie-m", 4), ("brecq", 4), ("qdrop", 4),
                                       ("adaround", 4), ("genie-m+joint", 4)])
def test_every_algorithm_exports_exactly(algo, bits, images, tmp_path):
    pytest.importorskip("onnxruntime")
    from dfquant.quant import export as E
    from dfquant.quant.joint import joint_finetune

    name, _, joint = algo.partition("+")
    q, info = quantize(_tiny(), images[:32], name, bits, bits, iters=4, batch_size=16, progress=False, quant=T)
    if joint:
        joint_finetune(q, images[:32], 3, batch_size=16, lr=1e-3, progress=False)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    assert layers["dw.0"].wq.bits == (8 if bits == 8 else 4) and layers["stem.0"].wq.qrange == (-64, 63)
    summary = E.export_onnx(q, (3, 32, 32), tmp_path / "m.onnx")
    assert summary["exact"] and summary["inexact"] == {}, summary["inexact"]
    rt = E.runtime_graph(tmp_path / "m.onnx")
    assert rt["float"] == 1 and rt["integer"] == 5, rt
    assert rt["ops"].get("QLinearAdd") == 1 and rt["ops"].get("QLinearGlobalAveragePool") == 1, rt["ops"]
    _assert_exact(q, tmp_path / "m.onnx", images)


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
    # 8-bit weights of a matrix-product kernel: symmetric int8 on 7 bits (no int16 saturation on AVX2)
    assert first.wq.bits == 7 and first.wq.qrange == (-64, 63) and not first.wq.zero_point.any()
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
    assert rt["ops"].get("QLinearGlobalAveragePool") == 1 and summary["exact"] and summary["inexact"] == {}
    _assert_exact(q, tmp_path / "t.onnx", images[16:])
    # the same model under the papers' conventions leaves convolutions in float
    paper, _ = quantize(_resnet18(), images[:16], "minmax", 4, 4, iters=1, batch_size=16, progress=False)
    E.export_onnx(paper, (3, 32, 32), tmp_path / "p.onnx", fuse_bias=True)
    assert E.runtime_graph(tmp_path / "p.onnx")["float"] > 5


@pytest.mark.parametrize("bits,iters", [(4, 0), (8, 2)])  # RepQ-ViT alone, and with its block reconstruction
def test_target_vit_has_uniform_softmax_and_integer_attention(bits, iters, tmp_path):
    pytest.importorskip("onnxruntime")
    timm = pytest.importorskip("timm")
    from dfquant.quant import export as E
    from dfquant.quant.vit import QuantAttention

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=10).eval()
    x = torch.randn(16, 3, 32, 32)
    q, _ = quantize(vit, x, "repq-vit", bits, bits, iters=iters, batch_size=8, progress=False, quant=T)
    attn = [m for m in q.modules() if isinstance(m, QuantAttention)]
    assert attn and all(isinstance(m.softmax_q, UniformQuantizer) and m.softmax_q.bits == 8 for m in attn)
    summary = E.export_onnx(q, (3, 32, 32), tmp_path / "v.onnx")
    rt = E.runtime_graph(tmp_path / "v.onnx")
    assert list(rt["float_nodes"]) == ["/head/Gemm"], rt["float_nodes"]
    # integer kernels without saturation (8-bit linear weights on 7 bits); LayerNorm, softmax and GELU run in
    # onnxruntime's float arithmetic, so the export says it is not bit-exact, and why
    assert not summary["exact"] and all("quantizes the output of a float" in why for why in summary["inexact"].values())
    torch.manual_seed(2)
    v = E.verify_onnx(q, tmp_path / "v.onnx", torch.randn(32, 3, 32, 32), torch.zeros(32, dtype=torch.long))
    assert v["passed"] and v["argmax_agreement"] == 100.0, v


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


def _ort_run(nodes, inputs, initializers, feeds, out_type):
    """One small QDQ graph in onnxruntime (all optimizations: its integer kernels), its first output."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    kinds = {np.uint8: TensorProto.UINT8, np.float32: TensorProto.FLOAT}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, kinds[v.dtype.type], list(v.shape)) for k, v in feeds.items()],
        [helper.make_tensor_value_info("out", out_type, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _grid(scale: float, zero_point: int = 0, signed: bool = False) -> UniformQuantizer:
    q = UniformQuantizer(8, symmetric=zero_point == 0, signed=signed)
    q.set_params(torch.tensor([scale]), torch.tensor([float(zero_point)]))
    return q


def test_integer_add_and_pooling_are_onnxruntimes_kernels_at_half_way_values():
    """QLinearAdd and QLinearGlobalAveragePool on every input code, with grids whose ratios put many results
    exactly half-way between two output integers (and random ones): the simulation's integers are
    onnxruntime's, where rounding the float sum would pick the other neighbour at some of them."""
    import numpy as np
    from onnx import TensorProto, helper

    from dfquant.quant.integer import qlinear_add, qlinear_global_avgpool

    a = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(1, 1, 256, 256)
    b = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(1, 1, 256, 256)
    rng = np.random.default_rng(0)
    grids = [(0.0371, 3, 0.0371, 200, 0.0742, 7), (0.0123, 0, 0.0123, 128, 0.0246, 128)]  # ratios 1/2: ties
    grids += [tuple(float(rng.uniform(0.005, 0.2)) if i % 2 == 0 else int(rng.integers(0, 256)) for i in range(6))
              for _ in range(4)]
    for sa, za, sb, zb, sc, zc in grids:
        init = {"sa": np.float32(sa), "za": np.uint8(za), "sb": np.float32(sb), "zb": np.uint8(zb),
                "sc": np.float32(sc), "zc": np.uint8(zc)}
        nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
                 helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
                 helper.make_node("Add", ["fa", "fb"], ["s"]), helper.make_node("QuantizeLinear", ["s", "sc", "zc"], ["out"])]
        ort_codes = _ort_run(nodes, ["a", "b"], init, {"a": a, "b": b}, TensorProto.UINT8)
        qa, qb, qc = _grid(sa, za), _grid(sb, zb), _grid(sc, zc)
        value = lambda c, q: (torch.from_numpy(c.astype(np.float32)) - q.zero_point) * q.scale.detach()  # noqa: E731
        ours = qlinear_add(value(a, qa), qa, value(b, qb), qb, qc)
        codes = torch.clamp(torch.round(ours / qc.scale.detach()) + qc.zero_point, 0, 255).numpy()
        assert (codes == ort_codes).all(), (sa, za, sb, zb, sc, zc, int((codes != ort_codes).sum()))
    # global average pooling: averaging the dequantized floats moved 3 and 11 of these 2048 outputs
    for hw, (sx, zx, sy, zy) in itertools.product((4, 8), ((0.02, 128, 0.013, 128), (0.0173, 0, 0.0291, 0))):
        x = rng.integers(0, 256, (8, 256, hw, hw)).astype(np.uint8)
        init = {"sx": np.float32(sx), "zx": np.uint8(zx), "sy": np.float32(sy), "zy": np.uint8(zy)}
        nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["fx"]),
                 helper.make_node("GlobalAveragePool", ["fx"], ["p"]), helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["out"])]
        ort_codes = _ort_run(nodes, ["x"], init, {"x": x}, TensorProto.UINT8)
        qx, qy = _grid(sx, zx), _grid(float(sy), zy)
        ours = qlinear_global_avgpool((torch.from_numpy(x.astype(np.float32)) - zx) * qx.scale.detach(), qx, qy)
        codes = torch.clamp(torch.round(ours / qy.scale.detach()) + zy, 0, 255).numpy()
        assert (codes == ort_codes).all(), (sx, zx, sy, zy, int((codes != ort_codes).sum()))


def test_integer_conv_is_onnxruntimes_qlinearconv_at_half_way_values():
    """The simulation's conv without autograd (QuantLayer._kernel_forward) against onnxruntime's QLinearConv on
    the same integers, with s_y = 2 s_x s_w so that every odd accumulator is half-way between two outputs."""
    import numpy as np
    from onnx import TensorProto, helper

    from dfquant.quant.export.qdq import integer_weight

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    ql = QuantLayer(conv, 8, 8, make_quant_config("minmax", 8, 8, target="onnxruntime"))
    ql.aq.set_params(torch.tensor([0.0371]), torch.tensor([128.0]))
    ql.wq.set_params(torch.full((8,), 0.00913), torch.zeros(8))
    step = torch.tensor(0.0371, dtype=torch.float32) * torch.tensor(0.00913, dtype=torch.float32)
    out = _grid(float(2 * step), 100)
    ql.write_output_to(out)
    assert ql._integer_kernel()
    x = torch.randint(0, 256, (4, 16, 12, 12), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        ours = ql((x - 128) * ql.aq.scale)
    codes = torch.clamp(torch.round(ours / out.scale) + 100, 0, 255)
    iw = integer_weight(ql)
    bias = ql.bias().detach().numpy().astype(np.float32)
    init = {"sx": np.float32(0.0371), "zx": np.uint8(128), "w": iw["q"].numpy().astype(np.int8),
            "sw": np.full(8, np.float32(0.00913)), "zw": np.zeros(8, np.int8), "bias": bias,
            "sy": np.float32(out.scale.item()), "zy": np.uint8(100)}
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["fx"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["fw"], axis=0),
             helper.make_node("Conv", ["fx", "fw", "bias"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["out"])]
    ort_codes = _ort_run(nodes, ["x"], init, {"x": x.numpy().astype(np.uint8)}, TensorProto.UINT8)
    assert (codes.numpy() == ort_codes).all(), int((codes.numpy() != ort_codes).sum())


def test_target_warns_once_per_part_it_cannot_run_as_integer():
    """A tensor no single module produces (here an input of each residual addition, scaled inside the block's own
    forward) cannot get an output quantizer: one warning per part, naming it and what stays float."""
    from dfquant.api import plan as make_plan

    class Scaled(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + 0.5 * x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Scaled(8), Scaled(8), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    p = make_plan(model, torch.randn(1, 3, 16, 16), algo="minmax", target="onnxruntime")
    warned = [w for w in p.warnings if w.startswith("target:")]
    assert warned == [f"target: no single module produces an input of the residual addition in {name}, so it stays "
                      "float and the kernels around it run in float" for name in ("2", "3")], p.warnings


def test_checkpoint_with_unknown_settings_is_one_clear_error(target_w4a4, tmp_path):
    """A folder saved by another dfquant version, with a QuantConfig field this one lacks, is refused in one line
    naming the field (it was a TypeError traceback)."""
    import json

    from dfquant.api import load, save

    q, info = target_w4a4
    save(tmp_path / "ckpt", q, info)
    path = tmp_path / "ckpt" / "quant_config.json"
    meta = json.loads(path.read_text())
    meta["quant"]["weight_multiplier"] = False
    path.write_text(json.dumps(meta))
    with pytest.raises(DfqError, match=r"does not know \(weight_multiplier\): it was saved by another version"):
        load(tmp_path / "ckpt", _resnet18())
