"""Deployment export: ONNX QDQ graph checked with onnxruntime, integer state dict, refusals."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dfquant.errors import DfqError  # noqa: E402
from dfquant.quant import export as E  # noqa: E402
from dfquant.quant.export.int32_bias import _exact_bias_window  # noqa: E402
from dfquant.quant.export.qdq import _exact_int8_bound, _ExportLayer  # noqa: E402
from dfquant.quant.modules import QuantLayer, act_quantizers  # noqa: E402
from dfquant.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer  # noqa: E402
from dfquant.quant.plan import bn_folds  # noqa: E402
from dfquant.quant.transform import bn_affine  # noqa: E402

INPUT = (3, 32, 32)


@pytest.fixture(scope="module")
def data():
    """64 split-A images (BN statistics + calibration) and 256 test images, normalized."""
    from dfquant.data import fmnist
    from dfquant.models.spec import FMNIST_MEAN, FMNIST_STD

    mean, std = torch.tensor(FMNIST_MEAN).view(1, 3, 1, 1), torch.tensor(FMNIST_STD).view(1, 3, 1, 1)
    xa, _ = fmnist.load_split("A", limit=64)
    xt, yt = fmnist.load_split("test", limit=256)
    return (xa - mean) / std, (xt - mean) / std, yt


@pytest.fixture(scope="module")
def fp_model(data):
    """ResNet-20 with random weights but realistic BatchNorm: random affine, running
    statistics measured on real images (so activations are not degenerate)."""
    from dfquant.models import zoo

    torch.manual_seed(0)
    model = zoo.resnet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(data[0])
    return model.eval()


def _quantize(fp_model, calib, algo, wbits, abits):
    from dfquant.quant.api import quantize

    qmodel, _ = quantize(copy.deepcopy(fp_model), calib, algo, wbits, abits, iters=2, batch_size=32, progress=False)
    return qmodel


@pytest.fixture(scope="module")
def qmodels(fp_model, data):
    """W4A4 genie-m (hardened soft rounding, learned steps, BN kept) and W8A8 mse (BN folded, biases).
    mse range-searches every activation on all of its calibration images, so it gets 32 (Genie-M searches on its
    first batch of 32 anyway)."""
    return {"w4a4": _quantize(fp_model, data[0], "genie-m", 4, 4), "w8a8": _quantize(fp_model, data[0][:32], "mse", 8, 8)}


def _scope(name: str) -> str:
    """The ONNX node-name prefix the TorchScript exporter gives module ``name`` (``layer1.0.conv1`` ->
    ``/layer1/layer1.0/conv1``)."""
    parts: list[str] = []
    for p in name.split("."):
        parts.append(f"{parts[-1]}.{p}" if p.isdigit() and parts else p)
    return "/" + "/".join(parts)


def _kernel_weights(path) -> dict[str, torch.Tensor]:
    """node name -> the float weight each exported Conv/Gemm consumes, computed by onnxruntime with
    graph optimizations off (so DequantizeLinear, the INT4 Cast chains and the Cast/Mul
    dequantization of float kernels are all evaluated as written)."""
    model = onnx.load(str(path))
    names = {n.input[1]: n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    for t in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(list(names), {"input": np.zeros((1, *INPUT), np.float32)})
    return {names[t]: torch.from_numpy(o) for t, o in zip(names, outs)}


@pytest.mark.parametrize("which", ["w4a4", "w8a8"])
def test_onnx_round_trip(qmodels, fp_model, data, tmp_path, which):
    qmodel = qmodels[which]
    path = tmp_path / "model.onnx"
    summary = E.export_onnx(qmodel, INPUT, path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    n_acts = sum(1 for q in act_quantizers(qmodel) if q.enabled)
    assert ops.count("QuantizeLinear") == n_acts
    # with separate bias Adds no Conv is an integer kernel, and the reasons are recorded; weights stay
    # behind DequantizeLinear (so onnxruntime cannot fold the Add and re-quantize them on its own grid),
    # except the first conv's: its input is float, so its weight is dequantized by Cast/Mul (folded at load)
    assert ops.count("DequantizeLinear") == n_acts + len(layers) - 1
    assert len(summary["float_kernels"]) == len(layers)
    assert summary["float_kernels"]["/conv1/Conv"] == "input not quantized (float activations)"
    # Genie-M's unfolded BatchNorm is folded into the weight scales and biases
    assert "BatchNormalization" not in ops
    # weights: integer initializers; 4-bit grids packed as INT4/UINT4 at opset 21, first/last layer 8-bit
    types = {t.name: t.data_type for t in model.graph.initializer}
    for name, m in layers.items():
        key = f"{name}.weight_int_int4" if m.wq.bits <= 4 else f"{name}.weight_int"
        assert types[key] in ((onnx.TensorProto.INT4, onnx.TensorProto.UINT4) if m.wq.bits <= 4
                              else (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)), name
        assert summary["weights"][name].split()[0] in (("INT4", "UINT4") if m.wq.bits <= 4 else ("INT8", "UINT8"))
    assert ("Clip" in ops) == (which == "w4a4")  # b < 8: the b-bit clamp on the integer tensor
    # biases (every layer has one once BN is folded) are float Adds after the Conv, out of reach
    # of int32 bias rounding
    assert all(len(n.input) == 2 for n in model.graph.node if n.op_type == "Conv")
    assert ops.count("Add") == 9 + len(layers)  # + 9 residual additions
    # the weights the kernels see: the fake-quantized weights, times the folded BN scale
    weights = _kernel_weights(path)
    # which BN follows which conv: the float model's data flow, in qmodel's names; Genie-M kept them all
    clean = E.clean_names(qmodel)
    qname: dict[str, str] = {}
    for q, c in clean.items():
        qname.setdefault(c, q)
    fp_folds = bn_folds(fp_model)
    bns = {name: qname[fp_folds[clean[name]]] for name in layers if clean[name] in fp_folds
           and isinstance(qmodel.get_submodule(qname[fp_folds[clean[name]]]), nn.BatchNorm2d)}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in fp_model.modules())
    assert len(bns) == (n_bn if which == "w4a4" else 0), bns
    for name, m in layers.items():
        w = weights[_scope(name) + "/Conv"] if isinstance(m.layer, nn.Conv2d) else weights[_scope(name) + "/MatMul"].T
        ref = m.qweight().detach()
        if name in bns:
            k, _ = bn_affine(qmodel.get_submodule(bns[name]))
            ref = ref * k.view(-1, 1, 1, 1)
        assert torch.allclose(w, ref, rtol=1e-6, atol=0), name
        if name not in bns:
            assert torch.equal(w, ref), name
    # onnxruntime vs fake quantization on 256 test images
    report = E.verify_onnx(qmodel, path, data[1], data[2])
    assert report["n"] == 256
    assert report["mean_rel_diff"] <= E.LOGIT_MEAN_TOLERANCE, report
    assert report["argmax_agreement"] >= 99.0, report
    assert report["top1_diff_points"] <= 100 / 256 + 1e-6, report  # at most one image's worth on this random net
    with torch.no_grad():
        correct = int((qmodel(data[1]).argmax(1) == data[2]).sum())
    assert report["correct_torch"] == correct and report["top1_torch"] == 100 * correct / 256
    assert report["top1_diff_images"] == abs(report["correct_onnx"] - correct) and report["top1_tolerance_images"] == 1
    assert report["passed"]  # one image of 256 is within the bound


def test_bn_fold_keeps_the_integers_and_mirrors_negative_channels():
    """Folding y*k + c into a quantized conv rescales channels by |k| and, where k < 0, mirrors the
    channel inside its grid: the weight becomes qweight * k and every integer stays on the grid."""
    from dfquant.quant.modules import QuantConfig

    torch.manual_seed(0)
    ql = QuantLayer(nn.Conv2d(3, 6, 3), 4, None, QuantConfig())
    k, c = torch.tensor([1.5, -0.5, 2.0, -3.0, 0.25, -1.0]), torch.randn(6)
    layer = _ExportLayer(ql, "conv")
    layer.fold_bn(k, c)
    w = (layer.weight_int.float() - layer.weight_zero_point.float().view(-1, 1, 1, 1)) * layer.weight_scale.view(-1, 1, 1, 1)
    assert torch.allclose(w, ql.qweight().detach() * k.view(-1, 1, 1, 1), rtol=1e-6, atol=0)
    assert (layer.weight_scale > 0).all() and layer.q.min() >= 0 and layer.q.max() <= 15
    # 4-bit grid: stored as int8 m (q - z), zero point 0, m the largest power of two with m max|q - z| <= 64, the
    # bound that keeps AVX2's int16 pair sums of uint8 x int8 products exact (2 * 255 * 64 < 2^15)
    span = int((layer.q - layer.z.view(-1, 1, 1, 1)).abs().max())
    bound = _exact_int8_bound()
    assert bound == 64 and 2 * 255 * bound <= 2**15 - 1 < 2 * 255 * (bound + 1) and _exact_int8_bound(127) == 127
    assert layer.multiplier * span <= 64 < 2 * layer.multiplier * span
    assert not layer.weight_zero_point.any() and layer.weight_int.abs().max() <= 64
    assert torch.allclose(layer.bias, ql.layer.bias.detach() * k + c)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(layer(x), ql(x) * k.view(1, -1, 1, 1) + c.view(1, -1, 1, 1), atol=1e-5)


def _chain(data, wbits: int, abits: int, width: int = 32) -> nn.Module:
    """conv-BN-ReLU x2 with 8-bit input and a quantized output, then a float classifier: every
    Conv of it fits the QDQ pattern onnxruntime turns into QLinearConv."""
    from dfquant.quant.modules import QuantConfig

    torch.manual_seed(0)
    cfg = QuantConfig()
    model = nn.Sequential(QuantLayer(nn.Conv2d(3, 16, 3), 8, 8, cfg), nn.BatchNorm2d(16), nn.ReLU(),
                          QuantLayer(nn.Conv2d(16, width, 3), wbits, abits, cfg), nn.BatchNorm2d(width), nn.ReLU(),
                          UniformQuantizer(abits, symmetric=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(width, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_var.data.uniform_(0.5, 2.0)
    with torch.no_grad():
        model.eval()(data[0][:32])  # lazy activation range init
    return model


def test_w8a8_optimized_graph_runs_integer_convolutions(data, tmp_path):
    """With biases fused, onnxruntime's optimized graph (saved through optimized_model_filepath)
    runs every Conv as an integer kernel; only the float classifier stays float. The int32 biases
    cannot reproduce every output integer of 8-bit grids, but measured on calibration images they
    move the logits by less than the exporter's bound; without images the exporter cannot tell and
    keeps those Convs float."""
    model = _chain(data, 8, 8)
    path = tmp_path / "chain.onnx"
    summary = E.export_onnx(model, INPUT, path, fuse_bias=True, calib=data[0])
    rt = E.runtime_graph(path)
    assert rt["ops"].get("QLinearConv") == 2 and rt["integer"] == 2, rt
    assert not any(op in rt["ops"] for op in ("Conv", "FusedConv", "BatchNormalization")), rt
    assert rt["float"] == 1 and list(summary["float_kernels"].values()) == ["input not quantized (float activations)"]
    biases = summary["int32_biases"]
    assert biases["integer_kernels"] == 2 and len(biases["rounded"]) == 2 and not biases["kept_float"], biases
    assert biases["mean_rel_logit_diff"] <= E.BIAS_ROUNDING_LOGIT_TOLERANCE
    strict = E.export_onnx(model, INPUT, tmp_path / "strict.onnx", fuse_bias=True)["int32_biases"]
    assert sorted(strict["kept_float"]) == sorted(biases["rounded"]) and strict["calibration_images"] == 0
    # the same export without fused biases: every Conv stays float, and the exporter says why
    E.export_onnx(model, INPUT, tmp_path / "unfused.onnx")
    rt = E.runtime_graph(tmp_path / "unfused.onnx")
    assert rt["integer"] == 0 and "QLinearConv" not in rt["ops"]
    assert sum("fuse_bias" in why for why in rt["float_nodes"].values()) == 2
    # integer kernels round the bias to int32 and requantize in integers: close to the simulation
    report = E.verify_onnx(model, path, data[1][:128], data[2][:128])
    assert report["mean_rel_diff"] <= E.LOGIT_MEAN_TOLERANCE, report


def test_int4_weights_are_packed_on_disk(data, tmp_path):
    """A 4-bit weight costs half a byte on disk (packed INT4/UINT4) against 4 bytes in float32, and
    the runtime still gets the int8 weight its integer kernel takes."""
    model = _chain(data, 4, 4, width=256)  # the 4-bit layer (36,864 weights) dominates the file
    q_path, q8_path, fp_path = tmp_path / "w4.onnx", tmp_path / "w8.onnx", tmp_path / "fp.onnx"
    summary = E.export_onnx(model, INPUT, q_path, fuse_bias=True, calib=data[0])
    assert summary["weights"]["3"] in ("INT4", "UINT4") and summary["weights"]["0"].split()[0] in ("INT8", "UINT8")
    n4 = model[3].layer.weight.numel()
    (packed,) = [t for t in onnx.load(str(q_path)).graph.initializer if t.name == "3.weight_int_int4"]
    assert len(packed.raw_data) == n4 // 2
    # the same layer in int8 (opset 20 has no INT4) and in float32: 1 and 4 bytes per weight
    E.export_onnx(model, INPUT, q8_path, opset=20, fuse_bias=True, calib=data[0])
    fp = copy.deepcopy(model)
    for i in (0, 3):
        fp[i] = fp[i].layer
    fp[6] = nn.Identity()
    E.export_onnx(fp, INPUT, fp_path)
    size = {k: p.stat().st_size for k, p in (("w4", q_path), ("w8", q8_path), ("fp", fp_path))}
    assert size["w8"] - size["w4"] > 0.45 * n4, size  # half a byte per weight saved, less the INT4 Cast chain
    assert size["fp"] - size["w4"] > 3.3 * n4, size  # 4 bytes -> 0.5 byte per weight (int8 would save 3), less overhead
    assert size["fp"] / size["w4"] > 4, size  # whole file, with the float classifier and the 8-bit first layer
    assert E.runtime_graph(q_path)["ops"].get("QLinearConv") == 2
    report = E.verify_onnx(model, q_path, data[1][:128], data[2][:128])
    assert report["mean_rel_diff"] <= E.LOGIT_MEAN_TOLERANCE, report


def _act_model(quantizers: list[nn.Module]) -> nn.Module:
    return nn.Sequential(*quantizers)


@pytest.mark.parametrize("bits,symmetric,signed", [(4, True, True), (4, True, False), (8, True, True),
                                                   (8, True, False), (6, False, None), (2, True, True)])
def test_activation_qdq_is_exact(tmp_path, bits, symmetric, signed):
    """Clip -> QuantizeLinear -> DequantizeLinear in onnxruntime equals UniformQuantizer bit for bit."""
    torch.manual_seed(bits)
    x = torch.randn(4, 3, 16, 16) * 2 + (0 if signed in (True, None) else 1)
    x = x if signed is not False else x.relu()
    q = UniformQuantizer(bits, symmetric=symmetric, signed=signed)
    q.init_range(x, method="minmax" if bits == 8 else "mse")
    q.scale.data *= 0.7  # make some values clip
    model = _act_model([q]).eval()
    path = tmp_path / "q.onnx"
    E.export_onnx(model, (3, 16, 16), path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(y, ref)


def test_logsqrt2_softmax_quantizer_exports_as_elementwise_ops(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 17).softmax(-1)
    q = LogSqrt2Quantizer(4)
    q.init_range(x)
    model = _act_model([q]).eval()
    path = tmp_path / "s.onnx"
    E.export_onnx(model, (3, 17, 17), path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Log", "Round", "Pow", "Where"} <= ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    # log2 in onnxruntime (Log / ln 2) and torch may differ in the last bit at a rounding
    # boundary of k; such an element moves one level (a factor 2^0.5)
    assert (y != ref).float().mean() < 1e-3
    assert torch.allclose(y, ref, rtol=0.5, atol=1e-6)


def test_int_state_contents(qmodels, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    for which, qmodel in qmodels.items():
        path = tmp_path / f"{which}.safetensors"
        E.export_int_state(qmodel, path, metadata={"model": "fmnist/resnet20"})
        st = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        assert meta["format"] == "dfquant-int-state/1" and meta["model"] == "fmnist/resnet20"
        clean = E.clean_names(qmodel)
        layers = {clean[n]: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
        assert set(json.loads(meta["layers"])) == set(layers)
        for P, m in layers.items():
            q = st[f"{P}.weight_int"]
            qmin, qmax = st[f"{P}.weight_qrange"].tolist()
            assert (qmin, qmax) == m.wq.qrange and float(st[f"{P}.weight_bits"]) == m.wq.bits
            assert q.dtype == (torch.int8 if qmin < 0 else torch.uint8)
            assert int(q.min()) >= qmin and int(q.max()) <= qmax
            s, z = st[f"{P}.weight_scale"], st[f"{P}.weight_zero_point"]
            w = (q.float() - z.float().view(-1, *[1] * (q.dim() - 1))) * s.view(-1, *[1] * (q.dim() - 1))
            assert torch.equal(w, m.qweight().detach()), P
            assert f"{P}.weight" not in st
            assert (f"{P}.bias" in st) == (m.layer.bias is not None)
        for name, q in qmodel.named_modules():
            if isinstance(q, UniformQuantizer) and q in act_quantizers(qmodel) and q.enabled:
                A = clean[name]
                assert torch.equal(st[f"{A}.act_scale"], q.scale.detach().flatten())
                assert st[f"{A}.act_qrange"].tolist() == list(q.qrange)
                assert st[f"{A}.act_zero_point"].dtype == torch.int32
        assert not any(".wq." in k or ".soft." in k or ".layer." in k or ".block." in k for k in st)
    # genie-m keeps BatchNorm: the file rebuilds the float model with quantized weights by
    # its original state-dict names
    st = load_file(str(tmp_path / "w4a4.safetensors"))
    assert {"bn1.weight", "bn1.running_mean", "layer1.0.bn2.running_var", "layer2.0.downsample.1.weight"} <= set(st)
    assert "layer1.0.aq.act_scale" in st and "layer1.0.conv2.aq.act_scale" in st and "conv1.weight_int" in st
    from dfquant.models import zoo
    from dfquant.quant.modules import set_quant_state

    state = {k: v for k, v in st.items() if not k.rpartition(".")[2].startswith(("weight_", "act_"))}
    with safe_open(str(tmp_path / "w4a4.safetensors"), "pt") as fh:
        layer_names = json.loads(fh.metadata()["layers"])
    for P in layer_names:
        q, s, z = st[f"{P}.weight_int"].float(), st[f"{P}.weight_scale"], st[f"{P}.weight_zero_point"].float()
        shape = (-1,) + (1,) * (q.dim() - 1)
        state[f"{P}.weight"] = (q - z.view(shape)) * s.view(shape)
    rebuilt = zoo.resnet20()
    rebuilt.load_state_dict(state, strict=True)
    ref = copy.deepcopy(qmodels["w4a4"])
    set_quant_state(ref, weights=True, acts=False)
    x = torch.randn(4, *INPUT)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), ref(x), atol=1e-5)


class Bessel(nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x)


class FancyQuantizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.bits, self.scale = 4, nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x


class NoisyQuantizer(UniformQuantizer):
    frozen = False

    def forward(self, x):
        return super().forward(x) if self.frozen else x + 0.01 * torch.randn_like(x)


def test_unsupported_op_and_module_are_named(qmodels, tmp_path):
    model = nn.Sequential(qmodels["w8a8"], nn.Sequential(nn.ReLU(), Bessel()))
    with pytest.raises(DfqError, match=r"aten::special_bessel_j0.*1\.1 \(Bessel\)"):
        E.export_onnx(model, INPUT, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(DfqError, match="FancyQuantizer"):
        E.export_onnx(nn.Sequential(nn.Conv2d(3, 3, 1), FancyQuantizer()), INPUT, tmp_path / "y.onnx")
    with pytest.raises(DfqError, match="FancyQuantizer"):
        E.export_int_state(nn.Sequential(FancyQuantizer()), tmp_path / "y.safetensors")
    # a UniformQuantizer subclass with its own forward is exported only once frozen onto its grid
    q = NoisyQuantizer(8, symmetric=True)
    q.init_range(torch.randn(100))
    with pytest.raises(DfqError, match="NoisyQuantizer"):
        E.export_onnx(nn.Sequential(q), (8,), tmp_path / "z.onnx")
    q.frozen = True
    E.export_onnx(nn.Sequential(q), (8,), tmp_path / "z.onnx")


def test_soft_rounding_must_be_hardened(fp_model):
    from dfquant.quant.modules import QuantConfig

    ql = QuantLayer(copy.deepcopy(fp_model.conv1), 4, None, QuantConfig())
    ql.enable_soft_rounding(learn_scale=False)
    with pytest.raises(DfqError, match="soft"):
        E.integer_weight(ql, "conv1")
    ql.soft.harden()
    assert E.integer_weight(ql, "conv1")["q"].max() <= 15


def test_cli_export(qmodels, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dfquant.cli import app
    from dfquant.models import registry, source
    from dfquant.quant import checkpoint
    from dfquant.quant.api import make_quant_config

    # the checkpoint holds every weight; do not depend on committed zoo weights
    monkeypatch.setattr(source, "get_model", lambda name, pretrained=True: registry.get_model(name, pretrained=False))
    spec = registry.get_model("fmnist/resnet20", pretrained=False)
    ckpt = tmp_path / "ckpt"
    checkpoint.save_quantized(ckpt, spec.record(), qmodels["w8a8"], make_quant_config("mse", 8, 8),
                              {"algo": "mse", "wbits": 8, "abits": 8, "q_top1": 0.0})
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(ckpt), "--eval-limit", "64", "--speed-runs", "2"])
    assert res.exit_code == 0, res.output
    assert "argmax agreement" in res.output
    assert "smaller" in res.output and "speed-up batch 1:" in res.output and "--fuse-bias" in res.output
    rep = json.loads((ckpt / "export_report.json").read_text())
    assert rep["verify"]["n"] == 64 and rep["verify"]["passed"] and rep["export"]["opset"] == 21
    dep = rep["deployment"]
    assert dep["size_ratio"] > 3 and set(dep["latency"]) == {"1", "32"} and dep["runtime_graph"]["integer"] == 0
    assert (ckpt / "model.onnx").exists()
    res = runner.invoke(app, ["export", str(ckpt), "--format", "int-state", "--out", str(tmp_path / "w.safetensors")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "w.safetensors").exists() and (tmp_path / "export_report.json").exists()
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "int.onnx"), "--integer-residual",
                              "--int8-weights", "--eval-limit", "64", "--speed-runs", "2"])
    rep = json.loads((tmp_path / "export_report.json").read_text())
    assert "approximate export" in res.output and rep["verify"]["approximate"], res.output
    cpu = rep["deployment"]["cpu"]  # integer kernels ran: the CPU note appears exactly where VNNI and AMX are missing
    assert cpu == E.cpu_integer_support()
    assert ("no VNNI or AMX" in res.output) == bool(cpu.get("x86") and not (cpu["vnni"] or cpu["amx"])), res.output
    assert res.exit_code == (0 if rep["verify"]["passed"] else 2), res.output
    assert rep["deployment"]["runtime_graph"]["float"] == 1 and rep["export"]["integer_residual"]["calibration_images"] == 64
    # the exact integer-kernel form: which Convs keep float because of their int32 bias, printed and reported
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "fused.onnx"), "--fuse-bias",
                              "--eval-limit", "64", "--speed-runs", "0"])
    assert res.exit_code == 0, res.output
    biases = json.loads((tmp_path / "export_report.json").read_text())["export"]["int32_biases"]
    assert biases["calibration_images"] == 64 and biases["integer_kernels"] == 9, biases
    assert f"int32 biases of 9 integer kernels: {len(biases['exact'])} reproduce" in res.output
    assert f"{len(biases['kept_float'])} kept float (measured on 64 calibration images)" in res.output
    assert all(name in res.output for name in biases["kept_float"])
    res = runner.invoke(app, ["export", str(ckpt), "--format", "tflite"])
    assert isinstance(res.exception, DfqError) and "onnx, int-state" in str(res.exception)


def _checkpoint(qmodel, tmp_path, monkeypatch):
    """A quantized fmnist/resnet20 checkpoint folder of ``qmodel`` (every weight in the folder: no zoo weights)."""
    from dfquant.models import registry, source
    from dfquant.quant import checkpoint
    from dfquant.quant.api import make_quant_config

    monkeypatch.setattr(source, "get_model", lambda name, pretrained=True: registry.get_model(name, pretrained=False))
    ckpt = tmp_path / "ckpt"
    checkpoint.save_quantized(ckpt, registry.get_model("fmnist/resnet20", pretrained=False).record(), qmodel,
                              make_quant_config("mse", 8, 8), {"algo": "mse", "wbits": 8, "abits": 8, "q_top1": 0.0})
    return ckpt


def test_failed_verification_keeps_no_model(qmodels, tmp_path, monkeypatch):
    """``dfq export`` writes the ONNX file next to the output under a temporary name and moves it into place only
    once it passed verification: a failed verification (onnxruntime made to miss one image more than the bound)
    leaves no new model and no temporary file, and the report says why and that it was not kept (with and without
    raising); an error half-way leaves nothing either; a passing export lands at the output."""
    from dfquant.jobs import run_export

    ckpt = _checkpoint(qmodels["w8a8"], tmp_path, monkeypatch)
    out = tmp_path / "deploy" / "m.onnx"
    real = E.verify_onnx

    def failing(*a, **k):
        rep = real(*a, **k)
        rep["top1_diff_images"] = rep["top1_tolerance_images"] + 1
        rep["passed"] = E.verification_passed(rep)
        return rep

    monkeypatch.setattr(E, "verify_onnx", failing)
    with pytest.raises(DfqError, match="onnxruntime disagrees") as exc:
        run_export(ckpt, out=out, n=32, speed_runs=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["export_report.json"]
    rep = json.loads((out.parent / "export_report.json").read_text())
    assert rep["kept"] is False and rep["error"] == str(exc.value) and "deployment" not in rep
    assert f"The export was not kept ({out} was not written)" in rep["error"]
    assert "(--eval-limit 1000)" in rep["error"] and rep["tolerance"]["top1_diff_images"] == 1
    # the CLI's way: no raise; the error it then asks for names the flag, from the report
    rep = run_export(ckpt, out=out, n=32, speed_runs=0, raise_on_failure=False)
    assert not out.exists() and rep["kept"] is False
    assert "(--eval-limit 1000)" in str(E.verification_error(rep))
    # an error half-way (here in onnxruntime): no file at all
    (out.parent / "export_report.json").unlink()

    def broken(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(E, "verify_onnx", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_export(ckpt, out=out, n=32, speed_runs=0)
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(E, "verify_onnx", real)
    rep = run_export(ckpt, out=out, n=32, speed_runs=0)
    assert rep["kept"] and rep["verify"]["passed"] and "error" not in rep
    assert sorted(p.name for p in out.parent.iterdir()) == ["export_report.json", "m.onnx"]
    assert rep["export"]["path"] == str(out) and rep["export"]["bytes"] == out.stat().st_size
    onnx.checker.check_model(onnx.load(str(out)))
    # a later failing export leaves the earlier, verified file as it was
    before = out.read_bytes()
    monkeypatch.setattr(E, "verify_onnx", failing)
    rep = run_export(ckpt, out=out, n=32, speed_runs=0, raise_on_failure=False)
    assert rep["kept"] is False and out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["export_report.json", "m.onnx"]


def test_vit_export_runs_in_default_onnxruntime(data, tmp_path):
    """RepQ-ViT W4A4 (log-sqrt2 softmax, asymmetric reparameterized inputs) at opset 21 loads
    in a default onnxruntime session (no signed DequantizeLinear feeding a Transpose)."""
    from dfquant.models import zoo
    from dfquant.quant.api import quantize

    torch.manual_seed(0)
    qmodel, _ = quantize(zoo.vit(), data[0][:32], "repq-vit", 4, 4, iters=0, progress=False)
    path = tmp_path / "vit.onnx"
    E.export_onnx(qmodel, INPUT, path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert {"QuantizeLinear", "DequantizeLinear", "Log", "Pow", "Where"} <= set(ops)
    report = E.verify_onnx(qmodel, path, data[1][:64], data[2][:64])
    assert report["mean_rel_diff"] <= E.LOGIT_MEAN_TOLERANCE and report["argmax_agreement"] >= 99.0, report
    # the integer-kernel form: every linear layer and the q.k^T product run as integer MatMuls; the
    # attention-times-value MatMuls stay float (log-sqrt2 softmax grid), as do the patch embedding
    # (its output is not quantized) and the head (float logits)
    summary = E.export_onnx(qmodel, INPUT, path, fuse_bias=True)
    rt = E.runtime_graph(path)
    depth = len(qmodel.blocks)
    assert rt["ops"].get("MatMulIntegerToFloat", 0) + rt["ops"].get("QLinearMatMul", 0) == 5 * depth, rt["ops"]
    assert rt["integer"] == 5 * depth and rt["float"] == depth + 2, rt
    assert sum("log-sqrt2" in why for why in summary["float_kernels"].values()) == depth
    report = E.verify_onnx(qmodel, path, data[1][:64], data[2][:64])
    assert report["mean_rel_diff"] <= E.LOGIT_MEAN_TOLERANCE and report["argmax_agreement"] >= 98.0, report


def test_verification_error_names_the_fix():
    report = {"export": {"fused_bias": False}, "report_path": "x/export_report.json",
              "verify": {"n": 256, "passed": False, "top1_onnx": 93.75, "top1_torch": 94.14, "mean_rel_diff": 2e-4,
                         "disagreements": [{"torch_top2_margin": 0.006}]}}
    err = E.verification_error(report)
    # the library names its own parameter, not a CLI flag, unless its caller says what the knob is called
    assert isinstance(err, DfqError) and "eval_limit 1000" in str(err) and "--eval-limit" not in str(err)
    assert "0.006" in str(err) and "\n" not in str(err)
    assert "(--eval-limit 1000)" in str(E.verification_error(report, limit_name="--eval-limit"))
    report["verify"]["passed"] = True
    assert E.verification_error(report) is None


@pytest.mark.parametrize("n, used, advised", [(256, None, 1000), (1000, None, 2000), (1000, 1500, 1500),
                                              (5000, None, 10000), (800, 800, None)])
def test_verification_error_advises_more_images_than_used(n, used, advised):
    """The advice names a larger image count than the one verified on (max(1000, 2 n), capped by the test set's
    size when known, here from the report as ``dfq export`` records it), and none when the whole set was used."""
    report = {"export": {"fused_bias": False}, "report_path": "r.json",
              "verify_limit": {"name": "--eval-limit", "set_size": used},
              "verify": {"n": n, "passed": False, "top1_onnx": 90.0, "top1_torch": 90.3, "mean_rel_diff": 2e-4,
                         "disagreements": [{"torch_top2_margin": 0.01}]}}
    msg = str(E.verification_error(report))
    assert f"at --eval-limit {n}:" in msg
    assert f"(--eval-limit {n})" not in msg
    if advised is None:
        assert "verify on more images" not in msg and f"the {n} images are the whole test set" in msg
    else:
        assert f"verify on more images (--eval-limit {advised})" in msg


def test_top1_tolerance_counts_images():
    """The top-1 rule counts images: the correct counts may differ by max(1, floor(n * 0.1 / 100)) (1 point for
    approximate exports), so a one-image difference on 1000 images passes even when its percentage comes out a
    hair above 0.1 (a user saw 0.10000467), and the same difference is judged alike at every n."""
    assert [E.top1_tolerance_images(n) for n in (10, 256, 1000, 1999, 2000, 3000, 10000)] == [1, 1, 1, 1, 2, 3, 10]
    assert [E.top1_tolerance_images(n, approximate=True) for n in (64, 128, 1000, 3000)] == [1, 1, 10, 30]

    def report(n, diff, approximate=False, rel=1e-4, points=None):
        return {"n": n, "top1_diff_images": diff, "top1_diff_points": 100 * diff / n if points is None else points,
                "mean_rel_diff": rel, "approximate": approximate}

    assert E.verification_passed(report(1000, 1, points=0.10000467))
    assert not E.verification_passed(report(1000, 2))
    assert E.verification_passed(report(256, 1)) and not E.verification_passed(report(256, 2))
    assert E.verification_passed(report(3000, 3)) and not E.verification_passed(report(3000, 4))
    assert not E.verification_passed(report(1000, 0, rel=2 * E.LOGIT_MEAN_TOLERANCE))  # the logit bound stays
    assert E.verification_passed(report(1000, 10, approximate=True, rel=0.5))
    assert not E.verification_passed(report(1000, 11, approximate=True))
    old = report(1000, 1, points=0.10000467)
    del old["top1_diff_images"]  # a report written before counts were recorded
    assert E.verification_passed(old)


def _mobilenet(data) -> nn.Module:
    """A tiny random-weight torchvision MobileNetV2 (depthwise convs, ReLU6, inverted residuals) whose
    BatchNorm scales span three decades, as trained depthwise layers' do, with running statistics
    measured on real images."""
    from torchvision.models.mobilenetv2 import MobileNetV2

    torch.manual_seed(0)
    model = MobileNetV2(num_classes=10, inverted_residual_setting=[[1, 8, 1, 1], [6, 16, 2, 2], [6, 16, 1, 1]])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 10 ** torch.empty_like(m.weight).uniform_(-3.0, 0.0)
            m.bias.data.uniform_(-0.2, 0.2)
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(data[0])
    return model.eval()


def test_fused_mobilenet_export_agrees_with_simulation(data, tmp_path):
    """Regression (fmnist/mobilenetv2 deployed at chance): with fused biases, a Conv that onnxruntime
    runs in float although its input is dequantized and its output reaches a QuantizeLinear must keep
    dfquant's per-channel DequantizeLinear weight and a float bias. Handed a float weight,
    onnxruntime's WeightBiasQuantization re-quantizes it per tensor to int8 (small depthwise
    channels vanish); handed a bias input, it rounds it to int32 for a kernel that stays float."""
    from dfquant.quant.api import quantize

    qmodel, _ = quantize(_mobilenet(data), data[0][:32], "minmax", 8, 8, iters=1, batch_size=32, progress=False)
    path = tmp_path / "mbv2.onnx"
    summary = E.export_onnx(qmodel, INPUT, path, fuse_bias=True)
    rt = E.runtime_graph(path)
    assert rt["float"] == len(summary["float_kernels"]) and rt["integer"] + rt["float"] == 14, (rt, summary)
    report = E.verify_onnx(qmodel, path, data[1][:128], data[2][:128])
    assert report["argmax_agreement"] >= 97.0 and report["mean_rel_diff"] <= E.LOGIT_MEAN_TOLERANCE, report


def _ort_outputs(path, x: torch.Tensor, optimize: bool) -> torch.Tensor:
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def test_fused_form_folds_relu6_and_writes_uint8_grids_exactly(data, tmp_path):
    """W4A4 MobileNetV2: the ReLU6 Clips in front of 4-bit grids (which reach past 6 in their uint8
    container) fold into the integer clip after QuantizeLinear and every int8 activation grid is
    rewritten in uint8 (zero point + 128): as written (optimizations off) the graph still computes
    the simulation exactly, and onnxruntime runs every Conv with a quantized input and output as
    QLinearConv: all but the stem (float image), the classifier, and the convs feeding the float
    residual Adds and pooling."""
    from dfquant.quant.api import quantize

    qmodel, _ = quantize(_mobilenet(data), data[0][:32], "minmax", 4, 4, iters=1, batch_size=32, progress=False)
    path = tmp_path / "mbv2.onnx"
    summary = E.export_onnx(qmodel, INPUT, path, fuse_bias=True, calib=data[0][32:])
    graph = onnx.load(str(path)).graph
    prod = {o: n for n in graph.node for o in n.output}
    assert summary["folded_activation_clips"] >= 8
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and prod.get(n.input[0]) is not None
                and prod[n.input[0]].op_type in ("Clip", "Relu")]
    zps = {t.name: t.data_type for t in graph.initializer}
    assert {zps[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"} == {onnx.TensorProto.UINT8}
    x = data[1][:64]
    with torch.no_grad():
        ref = qmodel(x)
    assert (_ort_outputs(path, x, optimize=False) - ref).abs().max() <= 1e-4 * ref.abs().max()
    rt = E.runtime_graph(path)
    assert rt["integer"] == 9 and rt["float"] == 5, rt
    assert sorted(rt["float_nodes"].values()) == ["input not quantized (float activations)",
                                                  "output is a model output (float logits)",
                                                  "output not quantized (feeds Add in float)",
                                                  "output not quantized (feeds Add in float)",
                                                  "output not quantized (feeds GlobalAveragePool in float)"]


def test_exact_bias_window_keeps_every_output_integer():
    """Any bias offset c inside the window gives every reachable accumulator A the output integer of
    the exact offset t, and the window is tight: just outside a finite end some output changes
    (brute force over all A, 4-bit output grid with zero point 3)."""
    rng = np.random.default_rng(0)
    z, lo, hi = 3, 0, 15
    levels = np.arange(lo + 1, hi + 1) - 0.5 - z
    t = rng.uniform(-50, 50, 200)
    m = 10 ** rng.uniform(-2, 2.5, 200)
    a_min, a_max = -rng.integers(0, 400, 200).astype(float), rng.integers(0, 400, 200).astype(float)
    left, right = _exact_bias_window(t, m, a_min, a_max, levels)
    for i in range(200):
        acc = np.arange(a_min[i], a_max[i] + 1)
        out = lambda c: np.clip(np.round((acc + c) * m[i]) + z, lo, hi)  # noqa: E731
        assert left[i] <= t[i] < right[i]
        inside = np.linspace(max(left[i], t[i] - 5), min(right[i], t[i] + 5), 9)[1:-1]  # the ends are ties
        assert all((out(c) == out(t[i])).all() for c in inside), i
        eps = 1e-7 * max(1.0, abs(t[i]))
        for end in (left[i] - eps, right[i] + eps):
            if np.isfinite(end):
                assert (out(end) != out(t[i])).any(), i


def test_fused_w4a4_mobilenet_int32_biases_reproduce_the_simulation(data, tmp_path):
    """Regression (fmnist/mobilenetv2 W4A4 deployed at 20% top-1 against 61.5% simulated): QLinearConv
    rounds each bias to int32 on the step s_x s_w, which for BN-folded 4-bit depthwise convolutions
    is not small against the output grid's step; here it changed the class of a quarter of the
    images. Per channel the exporter picks a weight multiplier and an int32 bias that give the
    simulation's output integer for every accumulator; Convs where some channel has none run in
    float (no calibration images) or only where calibration images show they move the logits."""
    from dfquant.quant.api import quantize

    qmodel, _ = quantize(_mobilenet(data), data[0][:32], "minmax", 4, 4, iters=1, batch_size=32, progress=False)
    x = data[1]
    with torch.no_grad():
        ref = qmodel(x)
    path = tmp_path / "strict.onnx"
    summary = E.export_onnx(qmodel, INPUT, path, fuse_bias=True)
    out = _ort_outputs(path, x, optimize=True)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() == 1.0 and (out - ref).abs().mean() <= 1e-5 * ref.abs().max()
    biases, rt = summary["int32_biases"], E.runtime_graph(path)
    assert biases["exact"] and rt["integer"] == len(biases["exact"]), (biases, rt)
    assert len(biases["kept_float"]) == biases["integer_kernels"] - len(biases["exact"]) and not biases["rounded"]
    assert all(summary["float_kernels"][n].startswith("int32 bias rounding changes") for n in biases["kept_float"])
    path = tmp_path / "measured.onnx"
    summary = E.export_onnx(qmodel, INPUT, path, fuse_bias=True, calib=data[0][32:])
    assert E.runtime_graph(path)["integer"] > rt["integer"]
    report = E.verify_onnx(qmodel, path, x, data[2])
    assert report["passed"] and report["argmax_agreement"] == 100.0, report


@pytest.mark.parametrize("arch", ["resnet20", "mobilenet"])
def test_integer_residual_runs_every_conv_as_integer_kernel(fp_model, data, tmp_path, arch):
    """--integer-residual (approximate): 8-bit quantizers on the residual branches and sums, the image
    input and pooled outputs, calibrated on images, leave no float Conv in onnxruntime's optimized
    graph; only the classifier (float logits) stays float. --int8-weights writes the 8-bit
    asymmetric weight grids as symmetric int8 (no zero points). The deployed top-1 is reported
    next to the simulated one, not asserted equal."""
    from dfquant.quant.api import quantize

    model = copy.deepcopy(fp_model) if arch == "resnet20" else _mobilenet(data)
    qmodel, _ = quantize(model, data[0][:32], "minmax", 8, 8, iters=1, batch_size=32, progress=False)
    path = tmp_path / "int.onnx"
    with pytest.raises(DfqError, match="calibration images"):
        E.export_onnx(qmodel, INPUT, path, integer_residual=True)
    assert not path.exists()
    summary = E.export_onnx(qmodel, INPUT, path, integer_residual=True, calib=data[0][32:], int8_weights=True)
    assert summary["fused_bias"] and summary["integer_residual"]["points"] >= 3
    assert summary["reround_weights"] and not any("zero points" in w for w in summary["weights"].values())
    rt = E.runtime_graph(path)
    assert not any(op in rt["ops"] for op in ("Conv", "FusedConv")), rt
    assert rt["float"] == 1 and list(rt["float_nodes"].values()) == ["output is a model output (float logits)"], rt
    report = E.verify_onnx(qmodel, path, data[1][:128], data[2][:128], approximate=True)
    assert report["approximate"] and report["argmax_agreement"] >= 80.0, report
    assert report["top1_diff_images"] == abs(report["correct_torch"] - report["correct_onnx"])
    assert report["top1_tolerance_images"] == 1  # 1 point of 128 images, at least one image
    assert E.verification_passed(report) == (report["top1_diff_images"] <= 1)


def test_int32_biases_stay_inside_int32(data, tmp_path):
    """A BN-folded channel with a vanishing scale and a large shift (gamma 1e-9, beta 5) needs a bias of
    ~1e10 steps s_x s_w: no int32 holds it, so its Conv must not be called exact with a wrapped bias; the
    export still computes the simulation."""
    from dfquant.quant.api import quantize

    model = _mobilenet(data)
    dw_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][4]
    dw_bn.weight.data[0], dw_bn.bias.data[0] = 1e-9, 5.0
    qmodel, _ = quantize(model, data[0][:32], "minmax", 4, 4, iters=1, batch_size=32, progress=False)
    for calib in (None, data[0][32:]):
        path = tmp_path / f"big_bias_{calib is None}.onnx"
        E.export_onnx(qmodel, INPUT, path, fuse_bias=True, calib=calib)
        report = E.verify_onnx(qmodel, path, data[1], data[2])
        assert report["passed"] and report["argmax_agreement"] == 100.0, report


def test_uint8_weight_grid_with_zero_zero_points_is_not_rewritten_as_int8(data, tmp_path):
    """An 8-bit asymmetric weight grid of non-negative weights has zero points 0 but lives in uint8 (0..255):
    the int32-bias search must not treat it as the int8 form (values above 127 would wrap)."""
    model = _chain(data, 8, 8)
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.layer.weight.data.abs_()
            m.wq.init_range(m.layer.weight)
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.abs_()
    assert any(m.wq.zero_point.eq(0).all() and m.wq.qrange == (0, 255) for m in model.modules() if isinstance(m, QuantLayer))
    path = tmp_path / "u8.onnx"
    E.export_onnx(model, INPUT, path, fuse_bias=True, calib=data[0])
    report = E.verify_onnx(model, path, data[1][:128], data[2][:128])
    assert report["passed"], report


def test_bad_calibration_images_are_refused_before_writing(data, tmp_path):
    model = _chain(data, 8, 8)
    path = tmp_path / "bad.onnx"
    for calib in (data[0][:0], data[0][:, :1], data[0][:, :, :16]):
        with pytest.raises(DfqError, match=r"calibration images must be a non-empty batch of shape \(N, 3, 32, 32\)"):
            E.export_onnx(model, INPUT, path, fuse_bias=True, calib=calib)
    assert not path.exists()


def test_export_calibration_images_follow_the_verification_ones(tmp_path):
    """``dfq export``'s calibration images come after the ``n`` verification images (embedded set: the next 64; an
    image folder: points n.. of an (n + 64)-point spread, which may meet the n-point spread of verification), decoded
    alone, the same with or without --verify; a set with fewer than skip + n images gives its last n."""
    from PIL import Image

    from dfquant.models.evaluate import test_tensors
    from dfquant.jobs import _verify_images
    from dfquant.models.registry import get_model

    spec = get_model("fmnist/resnet20")
    x, y = _verify_images(spec, 64, None, skip=10)
    ref_x, ref_y = test_tensors(spec, 74)
    assert torch.equal(x, ref_x[10:]) and torch.equal(y, ref_y[10:])
    for c in range(10):
        (tmp_path / f"c{c}").mkdir()
        for i in range(2):
            Image.new("L", (28, 28), 20 * c + i).save(tmp_path / f"c{c}" / f"{i}.png")
    after, _ = _verify_images(spec, 4, tmp_path, skip=6)
    spread, _ = _verify_images(spec, 10, tmp_path)
    assert torch.equal(after, spread[6:])
    last4, _ = _verify_images(spec, 20, tmp_path)
    for skip in (18, 30):  # 20 images: fewer than skip + 4, so the last 4
        assert torch.equal(_verify_images(spec, 4, tmp_path, skip=skip)[0], last4[-4:])
    assert len(_verify_images(spec, 64, None, skip=9990)[0]) == 64


def test_cpu_integer_support_reads_the_flags_that_decide_int8_speed():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert E.cpu_integer_support(avx2) == {"x86": True, "vnni": False, "amx": False}
    xeon = "flags\t\t: sse2 avx2 avx512f avx512_vnni amx_tile amx_int8\n"
    assert E.cpu_integer_support(xeon) == {"x86": True, "vnni": True, "amx": True}
    assert E.cpu_integer_support("Features\t: fp asimd asimddp\n") == {}  # no x86 flags line (e.g. ARM)
