"""Deployment benchmark (issue 30): what a dfquant ONNX export buys in onnxruntime on this machine's CPU, next to
onnxruntime's own static quantization.

One row per (model, bits, form) in ``<out>.csv``, forms:

* ``fp32`` — the float model exported as ONNX (one row per model, bits ``FP32``): the reference of every speed-up;
* ``target`` — quantized under ``quant={"target": "onnxruntime"}`` (the simulation computes what onnxruntime's
  integer kernels compute) and exported as is: it should run every Conv/Gemm/MatMul but the classifier as an
  integer kernel and equal the simulation;
* ``paper-exact`` — quantized under the papers' conventions (the default) and exported exactly
  (``export_onnx(..., fuse_bias=True, calib=...)``, ``dfq export --fuse-bias``): what the simulation keeps in float
  stays float;
* ``approx`` — the same paper-convention model exported with ``integer_residual=True, int8_weights=True``
  (``dfq export --integer-residual --int8-weights``): every Conv integer, but another function than the simulated
  one;
* ``ort-static`` (W8A8 only; one row per ``calib`` method MinMax, Entropy, Percentile, each with
  ``reduce_range=False`` and, as ``<method> reduce_range``, ``True``: ``--ort-reduce-range``) — the anchor a user
  would pick instead: ``onnxruntime.quantization.quantize_static`` on the FP32 ONNX (after its
  ``quant_pre_process``), ``QuantFormat.QDQ``, ``per_channel=True``, uint8 activations, int8 weights, on the same
  calibration images.

Bits: W8A8 and W4A4 for the dfquant forms (weights of <= 4 bits stored packed as INT4 on disk: ``size_ratio`` is
FP32 bytes / file bytes). Per row: file size; onnxruntime latency at batch 1 and 32 (median of ``--runs``
rounds, all forms of one model interleaved in one process, speed-up = FP32 median / this median from the same
run; intra-op threads = torch's thread count = OMP_NUM_THREADS); the Conv/Gemm/MatMul kernels of the graph
onnxruntime runs (integer vs float, and why each float one stayed float); on the evaluation images top-1 of the
simulation (fake-quantized PyTorch) and of the deployed file, their argmax agreement and mean |logit difference|,
the same agreement with the file run without onnxruntime's integer fusions (``qdq_agree``: the graph's own
semantics, which tells a wrong graph from integer-kernel arithmetic), and the deployed file's argmax agreement
with the FP32 model.

Models: torchvision ResNet-18, ResNet-50, MobileNetV2 (random weights with BatchNorm statistics measured on
random images, :func:`realistic_batchnorm`; 224 px: speed and agreement only; 16 random calibration images,
``--n-random`` other random evaluation images); the zoo's Fashion-MNIST ResNet-20,
MobileNetV2 and ViT (trained: 64 real split-A calibration images, top-1 on the first ``--n`` test images); and
``realworld/resnet20``: akamaster's pretrained CIFAR-10 ResNet-20 from ``../shared/realworld`` (its
``resnet.py`` and ``.th`` weights, ToTensor + ImageNet Normalize at 32 px; 64 calibration images from
``cifar10/train``, top-1 on ``--n`` class-balanced ``cifar10/test`` JPEGs), skipped with a note when that folder
is absent.

Quantization for the dfquant forms: range initialization only by default (``--algo minmax``; the ViT with
``--vit-algo repq-vit`` at 0 iterations), under the target too; ``--algo``/``--vit-algo``/``--iters`` change it.

Rows are appended to the CSV as they are measured, and a run resumes where one stopped (rows already in the CSV
are skipped; the missing rows of a model are timed with its FP32 export in their own interleaved run).
``--update --models ...`` drops those models' rows and measures them again. ``<out>.md`` and ``<out>.png`` are
written from the CSV after each model (``--report-only`` only rewrites them); every invocation is logged in
``<out>.commands.txt`` and listed in the report.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/deploy.py --runs 20 --n 1000
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resumable_csv import append_row, open_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RW = (ROOT / ".." / "shared" / "realworld").resolve()
MODELS = ["torchvision/resnet18", "torchvision/resnet50", "torchvision/mobilenet_v2", "fmnist/resnet20",
          "fmnist/mobilenetv2", "fmnist/vit", "realworld/resnet20"]
SPEED_GOAL_MODELS = ["torchvision/resnet18", "torchvision/resnet50", "torchvision/mobilenet_v2"]
BITS = {"W8A8": (8, 8), "W4A4": (4, 4)}
FORMS = ["target", "paper-exact", "approx"]
ORT_CALIBS = ["MinMax", "Entropy", "Percentile"]
ORT_BITS = "W8A8"
SPEEDUP_GOAL = 2.0
FIELDS = ["model", "bits", "form", "calib", "algo", "calib_images", "eval_images", "bytes", "size_ratio",
          "b1_ms", "b1_speedup", "b32_ms", "b32_speedup", "int_kernels", "float_kernels", "float_reasons",
          "float_nodes", "top1_sim", "top1_deployed", "argmax_agree", "qdq_agree", "fp_agree", "mean_rel_diff", "runs",
          "timing_run", "seconds", "commit"]
FORM_ORDER = ["fp32", "target", "paper-exact", "approx", "ort-static"]
BITS_ORDER = ["FP32", "W8A8", "W4A4"]
CLASSIFIER_REASON = "output is a model output (float logits)"


def key(r: dict) -> tuple:
    return r["model"], r["bits"], r["form"], r["calib"]


def ort_variants(reduce_range: str = "both") -> dict[str, tuple[str, bool]]:
    """The ort-static rows: ``calib`` label -> (calibration method, reduce_range)."""
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[reduce_range]
    return {m + (" reduce_range" if rr else ""): (m, rr) for rr in modes for m in ORT_CALIBS}


def wanted_keys(model: str, reduce_range: str = "both", forms: list[str] | None = None) -> list[tuple]:
    """The rows one model gets, in measuring order (``forms``: only those; the fp32 row, every speed-up's
    reference, always)."""
    out = [(model, "FP32", "fp32", "")]
    out += [(model, b, f, "") for b in BITS for f in FORMS]
    out += [(model, ORT_BITS, "ort-static", c) for c in ort_variants(reduce_range)]
    return [k for k in out if forms is None or k[2] in forms or k[2] == "fp32"]


# ----------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------
def cpu_info() -> dict:
    """Model name, logical CPUs and the SIMD flags that decide int8 speed (AVX2 vs AVX-512 / VNNI / AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"name": platform.processor() or "?", "cpus": os.cpu_count(), "flags": []}
    from dfquant.quant.export import cpu_flags

    lines = text.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = cpu_flags(text) or []
    keep = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")) or "vnni" in f)
    return {"name": name, "cpus": sum(ln.startswith("processor") for ln in lines), "flags": keep}


def cpu_sentence(info: dict) -> str:
    flags = info["flags"]
    vnni = [f for f in flags if "vnni" in f]
    avx512 = [f for f in flags if f.startswith("avx512")]
    amx = [f for f in flags if f.startswith("amx")]
    if not (vnni or avx512 or amx):
        simd = ("**AVX2 only: no AVX-512, no VNNI (neither AVX-VNNI nor AVX512-VNNI), no AMX**, so onnxruntime's "
                "u8s8 integer kernels run on AVX2 (onnxruntime's quantization guide advises reduce_range=True for "
                "`quantize_static` on CPUs without VNNI, against 16-bit saturation of the u8·s8 pair sums)")
    else:
        simd = (f"integer dot-product support: {' '.join(vnni) or 'no VNNI'}; {'AVX-512' if avx512 else 'no AVX-512'}; "
                f"{' '.join(amx) or 'no AMX'}")
    return f"{info['name']}, {info['cpus']} logical CPUs; SIMD flags: {' '.join(flags) or '?'}; {simd}."


def saturation_probe() -> dict | None:
    """Whether this CPU's u8s8 integer kernels saturate: one Q/DQ Conv (uint8 input 255, int8 weight 127, 16 input
    channels, output scale 4096) run by onnxruntime with its integer fusion (QLinearConv) and without it (float).
    Without VNNI the u8·s8 products are summed pairwise into int16 (255·127·2 > 32767), so the integer result is
    smaller; with VNNI both agree."""
    try:
        import numpy as np
        from onnx import TensorProto, helper
        from onnx import numpy_helper as nh

        from dfquant.quant.export.onnx_graph import _ort_session
    except ImportError:
        return None
    c = 16
    inits = [nh.from_array(np.array(1.0, np.float32), "s"), nh.from_array(np.array(0, np.uint8), "z"),
             nh.from_array(np.full((1, c, 1, 1), 127, np.int8), "w"), nh.from_array(np.ones(1, np.float32), "sw"),
             nh.from_array(np.zeros(1, np.int8), "zw"), nh.from_array(np.array(4096.0, np.float32), "so")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "so", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "so", "z"], ["out"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.full((1, c, 2, 2), 255.0, np.float32)
    got = {lvl: float(_ort_session(model, lvl).run(None, {"x": x})[0].ravel()[0]) for lvl in ("none", "all")}
    return {"exact": 255 * 127 * c, "float": got["none"], "integer": got["all"]}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def log_command(out: Path, record: bool) -> list[str]:
    """Append this invocation (with its OMP_NUM_THREADS) to ``<out>.commands.txt``; return the whole log."""
    path = out.with_suffix(".commands.txt")
    if record:
        env = "".join(f"{k}={os.environ[k]} " for k in ("PYTHONPATH",) if k in os.environ)
        cmd = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} {env}python "
               + " ".join(shlex.quote(a) for a in sys.argv))
        with open(path, "a") as fh:
            fh.write(cmd + "\n")
    return path.read_text().splitlines() if path.exists() else []


# ----------------------------------------------------------------------------------------------------------------
# models, calibration and evaluation images
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    spec: object
    calib: torch.Tensor
    calib_desc: str
    x: torch.Tensor  # evaluation images, normalized
    y: torch.Tensor | None  # their labels (None: random images of a random-weight model)
    eval_desc: str


def load(name: str, n: int, n_random: int) -> Loaded:
    if name.startswith("fmnist/"):
        from dfquant.data import fmnist
        from dfquant.models.evaluate import test_tensors
        from dfquant.models.registry import get_model

        spec = get_model(name, pretrained=True)
        xa, _ = fmnist.load_split("A", limit=64)
        x, y = test_tensors(spec, n)
        return Loaded(spec, spec.normalize(xa), "64 real Fashion-MNIST split-A images", x, y,
                      f"first {len(x)} Fashion-MNIST test images")
    if name.startswith("torchvision/"):
        from dfquant.models.registry import get_model

        torch.manual_seed(0)
        spec = get_model(name, pretrained=False)
        realistic_batchnorm(spec.model, spec.input_size)
        torch.manual_seed(0)
        calib = torch.randn(16, *spec.input_size)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n_random, *spec.input_size, generator=g)
        return Loaded(spec, calib, "16 random N(0,1) images", x, None, f"{n_random} other random images")
    if name == "realworld/resnet20":
        from dfquant.data.folders import load_folder_images
        from dfquant.models.evaluate import folder_dataset
        from dfquant.models.source import apply_preprocess, custom_spec

        spec = custom_spec(f"{RW}/akamaster/resnet.py:resnet20",
                           RW / "akamaster/pretrained_models/resnet20-12fca82f.th")
        spec = apply_preprocess(spec, size=32)  # ToTensor + ImageNet Normalize at 32 px: the authors' preprocessing
        calib = load_folder_images(RW / "cifar10/train", spec.transform(), limit=64, size=32)
        ds = folder_dataset(RW / "cifar10/test", spec.transform(), 10, limit=n)
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return Loaded(spec, calib, "64 class-balanced CIFAR-10 train JPEGs", torch.stack(xs), torch.tensor(ys),
                      f"{len(xs)} class-balanced CIFAR-10 test JPEGs")
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def realistic_batchnorm(model: torch.nn.Module, input_size: tuple[int, ...]) -> None:
    """Give a random-weight torchvision model BatchNorm layers like a trained one's: a random affine and running
    statistics measured on 64 random images (its own, not the calibration or evaluation images).

    Why: at torchvision's initialization (BN identity, running stats 0/1) the activations of MobileNetV2 and
    ResNet-50 shrink layer after layer; their logits on random images are ~1e-10 and their argmax is rounding
    noise, so argmax agreement with FP32 read 0% for any quantization (measured: MobileNetV2 logits' spread over
    images 6e-11; the paper conventions and the target both 0%). With measured statistics the logits are O(0.1)
    and depend on the image."""
    from dfquant.quant.bn import reestimate_bn

    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.2, 0.2, generator=g)
    reestimate_bn(model, torch.randn(64, *input_size, generator=g), batch_size=32)


def available(name: str) -> str | None:
    """Why ``name`` cannot be measured here, or None."""
    if name.startswith("realworld/") and not (RW / "akamaster" / "resnet.py").is_file():
        return f"{RW} is absent (the real-world corpus, ../shared/realworld)"
    return None


def range_init_only(algo: str) -> bool:
    from dfquant.quant.algorithms import get_algorithm

    recon = get_algorithm(algo).recon
    return recon is not None and recon.get("learn_rounding") is False


def algo_of(spec, args) -> tuple[str, int]:
    if spec.is_vit:
        return args.vit_algo, (args.iters if args.iters is not None else 0)
    return args.algo, (args.iters if args.iters is not None else (1 if range_init_only(args.algo) else 100))


def algo_label(spec, args) -> str:
    algo, iters = algo_of(spec, args)
    return algo if not spec.is_vit and range_init_only(algo) else f"{algo} iters={iters}"


def quantized(spec, calib: torch.Tensor, wbits: int, abits: int, target: bool, args):
    from dfquant.quant.api import quantize

    algo, iters = algo_of(spec, args)
    quant = {"target": "onnxruntime"} if target else None
    kw = {} if spec.is_vit else {"batch_size": len(calib)}
    return quantize(copy.deepcopy(spec.model), calib, algo, wbits, abits, iters=iters, progress=False, quant=quant,
                    **kw)[0]


# ----------------------------------------------------------------------------------------------------------------
# onnxruntime's own static quantization (the anchor)
# ----------------------------------------------------------------------------------------------------------------
def ort_static(fp32: Path, out: Path, calib: torch.Tensor, method: str, tmp: Path, preprocess: bool,
               reduce_range: bool, activations: str = "uint8") -> None:
    """``quantize_static`` of ``fp32`` into ``out`` (QDQ, per channel, int8 weights, ``activations`` uint8 or int8)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    src = fp32
    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src = tmp / "fp32_pre.onnx"
        if not src.exists():
            quant_pre_process(str(fp32), str(src))

    class Reader(CalibrationDataReader):
        def __init__(self):
            import onnx

            self.name = onnx.load(str(src), load_external_data=False).graph.input[0].name
            self.batches = iter([calib[i:i + 8].numpy() for i in range(0, len(calib), 8)])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {self.name: b}

    cwd = os.getcwd()
    os.chdir(tmp)  # the calibrator writes its augmented model into the working directory
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # one "Axis 1 is out-of-range" warning per LayerNorm weight (per_channel)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators' progress prints
            quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method),
                            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8)
    finally:
        os.chdir(cwd)
        root.setLevel(level)


# ----------------------------------------------------------------------------------------------------------------
# one model
# ----------------------------------------------------------------------------------------------------------------
def float_kernel_nodes(path: Path, rt: dict, own: bool) -> dict[str, str]:
    """Float Conv/Gemm/MatMul nodes -> why: the exporter's record (``own``: dfquant wrote the file), or, for
    quantize_static's files (which keep the FP32 export's metadata), the same analysis run on the file."""
    if own or not rt["float"]:
        return rt["float_nodes"] if own else {}
    try:
        import onnx

        from dfquant.quant.export.kernels import _float_reason, _runtime_integer_nodes

        model = onnx.load(str(path))
        integer = _runtime_integer_nodes(model)
        return {n.name: _float_reason(model.graph, n) or "onnxruntime does not fuse it into an integer kernel"
                for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in integer}
    except Exception as exc:  # noqa: BLE001 - the reasons are a courtesy, the counts come from runtime_graph
        return {"?": f"not analysed ({type(exc).__name__})"}


@torch.no_grad()
def logits_torch(model, x: torch.Tensor, bs: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + bs]).float() for i in range(0, len(x), bs)])


def logits_ort(path: Path, x: torch.Tensor, bs: int = 64, level: str = "all") -> torch.Tensor:
    """onnxruntime's logits; ``level="none"``: the file as written, without the fusions into integer kernels
    (Q/DQ and Conv/MatMul computed in float: the QDQ graph's own semantics)."""
    from dfquant.quant.export.onnx_graph import _ort_session

    sess = _ort_session(path, level)
    name = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(sess.run(None, {name: x[i:i + bs].contiguous().numpy()})[0]).float()
                      for i in range(0, len(x), bs)])


def accuracy_fields(ort: torch.Tensor, sim: torch.Tensor | None, fp: torch.Tensor, y: torch.Tensor | None) -> dict:
    def pct(a, b):  # from the count, so 167 of 200 is 83.5, not 83.4999...
        return 100.0 * int((a.argmax(1) == (b if b.dim() == 1 else b.argmax(1))).sum()) / len(a)

    row = {"fp_agree": pct(ort, fp)}
    if y is not None:
        row["top1_deployed"] = pct(ort, y)
    if sim is not None:
        row["argmax_agree"] = pct(ort, sim)
        row["mean_rel_diff"] = (ort - sim).abs().mean().item() / max(sim.abs().max().item(), 1e-12)
        if y is not None:
            row["top1_sim"] = pct(sim, y)
    return row


def measure(name: str, missing: list[tuple], args, tmp: Path, csv_path: Path, commit: str, algos: set[str]) -> None:
    from dfquant.quant import export as E

    t0 = time.time()
    d = load(name, args.n, args.n_random)
    spec, size = d.spec, d.spec.input_size
    label = algo_label(spec, args)
    if algos - {label}:
        raise SystemExit(f"{csv_path} holds {name} rows quantized with {', '.join(sorted(algos))}, not {label}: "
                         "pass --update to re-measure them, or another --out")
    log(f"{name}: loaded ({time.time() - t0:.0f}s)")
    paths = {("FP32", "fp32", ""): tmp / "fp32.onnx"}
    seconds = {}
    t = time.time()
    E.export_onnx(spec.model, size, paths[("FP32", "fp32", "")])
    seconds[("FP32", "fp32", "")] = time.time() - t
    want = {k[1:] for k in missing}
    qmodels = {}  # (bits, form) -> the simulated model the file is compared with
    for bits, (w, a) in BITS.items():
        if (bits, "target", "") in want:
            t = time.time()
            qmodels[(bits, "target")] = q = quantized(spec, d.calib, w, a, True, args)
            paths[(bits, "target", "")] = tmp / f"{bits}_target.onnx"
            E.export_onnx(q, size, paths[(bits, "target", "")])
            seconds[(bits, "target", "")] = time.time() - t
            log(f"{name}: {bits} target quantized and exported ({time.time() - t:.0f}s)")
        if {(bits, "paper-exact", ""), (bits, "approx", "")} & want:
            t = t_paper = time.time()
            q = quantized(spec, d.calib, w, a, False, args)
            tq = time.time() - t
            for form, opts in (("paper-exact", dict(fuse_bias=True)),
                               ("approx", dict(integer_residual=True, int8_weights=True))):
                if (bits, form, "") in want:
                    t = time.time()
                    qmodels[(bits, form)] = q
                    paths[(bits, form, "")] = tmp / f"{bits}_{form}.onnx"
                    E.export_onnx(q, size, paths[(bits, form, "")], calib=d.calib, **opts)
                    seconds[(bits, form, "")] = tq + time.time() - t
            log(f"{name}: {bits} paper conventions quantized and exported ({time.time() - t_paper:.0f}s)")
    for calib, (method, rr) in ort_variants(args.ort_reduce_range).items():
        k = (ORT_BITS, "ort-static", calib)
        if k in want:
            t = time.time()
            paths[k] = tmp / f"ort_static_{method}{'_rr' if rr else ''}.onnx"
            ort_static(paths[("FP32", "fp32", "")], paths[k], d.calib, method, tmp, not args.no_ort_preprocess, rr)
            seconds[k] = time.time() - t
            log(f"{name}: quantize_static {calib} ({seconds[k]:.0f}s)")
    t = time.time()
    labels = {"/".join(filter(None, k)): p for k, p in paths.items()}
    lat = E.measure_latency(labels, size, (1, 32), args.runs)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    log(f"{name}: timed {len(paths)} files interleaved, {args.runs} rounds ({time.time() - t:.0f}s)")
    fp = logits_torch(spec.model, d.x)
    sims: dict[int, torch.Tensor] = {}
    fp_bytes = paths[("FP32", "fp32", "")].stat().st_size
    for k, path in paths.items():
        if (name, *k) not in missing:
            continue
        bits, form, calib = k
        lab = "/".join(filter(None, k))
        rt = E.runtime_graph(path)
        nodes = float_kernel_nodes(path, rt, form != "ort-static")
        reasons = Counter(nodes.values())
        q = qmodels.get((bits, form))
        sim = None
        if q is not None:
            if id(q) not in sims:
                sims[id(q)] = logits_torch(q, d.x)
            sim = sims[id(q)]
        row = {"model": name, "bits": bits, "form": form, "calib": calib,
               "algo": {"fp32": "", "ort-static": "quantize_static"}.get(form, label),
               "calib_images": "" if form == "fp32" else d.calib_desc, "eval_images": d.eval_desc,
               "bytes": path.stat().st_size, "size_ratio": fp_bytes / path.stat().st_size,
               "b1_ms": lat[1][lab]["median_ms"], "b1_speedup": lat[1][lab]["ratio"],
               "b32_ms": lat[32][lab]["median_ms"], "b32_speedup": lat[32][lab]["ratio"],
               "int_kernels": rt["integer"], "float_kernels": rt["float"],
               "float_reasons": "; ".join(f"{c}x {r}" for r, c in reasons.most_common()),
               "float_nodes": " ".join(nodes), "runs": args.runs, "timing_run": run_id,
               "seconds": round(seconds[k], 1), "commit": commit}
        row.update(accuracy_fields(logits_ort(path, d.x), sim, fp, d.y))
        if sim is not None:
            row["qdq_agree"] = accuracy_fields(logits_ort(path, d.x, level="none"), sim, fp, None)["argmax_agree"]
        if form == "fp32":
            row["argmax_agree"] = row["fp_agree"]  # onnxruntime FP32 vs PyTorch FP32
        append_row(csv_path, FIELDS, row)
        log(f"{name}: {lab}: {row['b1_speedup']:.2f}x / {row['b32_speedup']:.2f}x, {row['int_kernels']} int / "
            f"{row['float_kernels']} float kernels, agree {row.get('argmax_agree', float('nan')):.1f}%, "
            f"top-1 {row.get('top1_deployed', float('nan')):.2f}")


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def probe_sentence(p: dict | None) -> str:
    if p is None:
        return ""
    how = ("**the integer kernels saturate** on this CPU" if p["integer"] < p["float"] else
           "no saturation on this CPU")
    return (f"u8s8 probe (`saturation_probe`, run when the report was written): a Q/DQ Conv summing 16 products "
            f"255 × 127 (exact {p['exact']}) gives {p['integer']:.0f} as onnxruntime's integer kernel and "
            f"{p['float']:.0f} computed in float (output step 4096): {how}. Weights with |w| <= 64 next to uint8 "
            "activations cannot saturate (255 · 64 · 2 < 32768).")


def num(v) -> float | None:
    return None if v in ("", None) else float(v)


def fmt(v, spec: str, suffix: str = "") -> str:
    x = num(v)
    return "" if x is None else format(x, spec) + suffix


def sort_rows(rows: list[dict]) -> list[dict]:
    def order(seq, v):
        return seq.index(v) if v in seq else len(seq)

    return sorted(rows, key=lambda r: (order(MODELS, r["model"]), r["model"], order(BITS_ORDER, r["bits"]),
                                       order(FORM_ORDER, r["form"]), order(list(ort_variants("both")), r["calib"])))


def classifier_only(r: dict) -> bool:
    """Every Conv/Gemm/MatMul an integer kernel except one float one, the classifier (float logits)."""
    return num(r["float_kernels"]) == 1 and r["float_reasons"] == f"1x {CLASSIFIER_REASON}"


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, computed from the rows."""
    out = []
    target = [r for r in rows if r["form"] == "target"]
    if target:
        bad = [r for r in target if num(r["argmax_agree"]) is None or num(r["argmax_agree"]) < 100.0]
        worst = max(target, key=lambda r: num(r["mean_rel_diff"]) or 0.0)
        out.append(
            f"* **Target form equals the simulation** (argmax agreement 100% on the evaluation images): "
            + ("**met** for all " if not bad else f"**not met** for {len(bad)} of ") + f"{len(target)} target rows"
            + ("" if not bad else ": " + ", ".join(
                f"{r['model']} {r['bits']} {fmt(r['argmax_agree'], '.1f')}%"
                + (f" (the same file without integer fusions: {fmt(r['qdq_agree'], '.1f')}%)"
                   if num(r.get("qdq_agree")) is not None else "") for r in bad))
            + f"; largest mean |logit diff| / max |logit|: {fmt(worst['mean_rel_diff'], '.1e')} "
              f"({worst['model']} {worst['bits']}).")
        qdq_ok = [r for r in bad if num(r.get("qdq_agree")) == 100.0] if bad else []
        if qdq_ok:
            out.append(f"  * {len(qdq_ok)} of these {len(bad)} files equal the simulation when onnxruntime runs them "
                       "without its integer fusions (*agree QDQ* 100%): the graph is the simulated model, the "
                       "difference comes from the integer kernels' arithmetic on this CPU (see the u8s8 probe above).")
        bad = [r for r in target if not classifier_only(r)]
        out.append(
            "* **Every Conv/Gemm/MatMul an integer kernel except the classifier** (target form): "
            + ("**met** for all " if not bad else f"**not met** for {len(bad)} of ") + f"{len(target)} target rows"
            + ("." if not bad else ": " + "; ".join(
                f"{r['model']} {r['bits']} ({r['int_kernels']} int / {r['float_kernels']} float: {r['float_reasons']})"
                for r in bad) + "."))
    cells, met, missing = [], True, []
    for m in SPEED_GOAL_MODELS:
        for b in BITS:
            r = next((r for r in target if r["model"] == m and r["bits"] == b), None)
            if r is None:
                missing.append(f"{m} {b}")
                met = False
                continue
            ok = num(r["b1_speedup"]) >= SPEEDUP_GOAL and num(r["b32_speedup"]) >= SPEEDUP_GOAL
            met &= ok
            cells.append(f"{m.split('/')[1]} {b} {fmt(r['b1_speedup'], '.2f')}x / {fmt(r['b32_speedup'], '.2f')}x"
                         + ("" if ok else " (**below**)"))
    out.append(f"* **>= {SPEEDUP_GOAL:g}x FP32 at batch 1 and batch 32** (target form, torchvision ResNet-18/50, "
               f"MobileNetV2, W8A8 and W4A4; b1 / b32): " + ("**met**" if met else "**not met**") + ": "
               + "; ".join(cells + ([f"not measured: {', '.join(missing)}"] if missing else [])) + "."
               + ("" if met else " What bounds it on this CPU, kernel by kernel: `kernel_ceiling.md` "
                  "(`benchmarks/kernel_ceiling.py`)."))
    vit = [r for r in target if r["model"] == "fmnist/vit"]
    if vit:
        out.append("* **Zoo ViT** (target form, measured figure): " + "; ".join(
            f"{r['bits']} {fmt(r['b1_speedup'], '.2f')}x / {fmt(r['b32_speedup'], '.2f')}x FP32 (b1 / b32), "
            f"{r['int_kernels']} int / {r['float_kernels']} float kernels" for r in vit) + ".")
    small = [r for r in target if r["bits"] == "W4A4"]
    if small:
        out.append("* **W4 weights packed** (target W4A4 file size vs FP32): " + "; ".join(
            f"{r['model']} {fmt(r['size_ratio'], '.1f')}x" for r in small) + ".")
    lines = []
    for m in dict.fromkeys(r["model"] for r in rows):
        t = next((r for r in target if r["model"] == m and r["bits"] == ORT_BITS), None)
        ort = [r for r in rows if r["model"] == m and r["form"] == "ort-static"]
        if t is None or not ort:
            continue
        acc_key = "top1_deployed" if num(t["top1_deployed"]) is not None else "fp_agree"
        acc_name = "top-1" if acc_key == "top1_deployed" else "agreement with FP32"
        best = max(ort, key=lambda r: num(r[acc_key]) or -1)
        acc_ok = num(t[acc_key]) >= num(best[acc_key])
        fast = [r for r in ort if num(r["b1_speedup"]) > num(t["b1_speedup"]) or
                num(r["b32_speedup"]) > num(t["b32_speedup"])]
        lines.append(
            f"  * {m}: target {acc_name} {fmt(t[acc_key], '.2f')}% vs ort-static "
            + ", ".join(f"{r['calib']} {fmt(r[acc_key], '.2f')}%" for r in ort)
            + f" → {'at least as accurate as' if acc_ok else '**less accurate** than'} the best ({best['calib']}); "
            f"speed-up b1 / b32: target {fmt(t['b1_speedup'], '.2f')}x / {fmt(t['b32_speedup'], '.2f')}x vs "
            + ", ".join(f"{r['calib']} {fmt(r['b1_speedup'], '.2f')}x / {fmt(r['b32_speedup'], '.2f')}x" for r in ort)
            + (" → at least as fast as every calibration" if not fast else
               f" → **slower** than {', '.join(r['calib'] for r in fast)} at b1 or b32")
            + f"; size {fmt(t['size_ratio'], '.1f')}x vs {fmt(ort[0]['size_ratio'], '.1f')}x.")
    if lines:
        out.append(f"* **ort-static vs dfquant target at {ORT_BITS}** (accuracy: top-1 on the evaluation images, or "
                   "for random-weight models argmax agreement with FP32; speed: same interleaved run):")
        out += lines
    return out


def report(csv_path: Path, out: Path, commands: list[str], missing_notes: list[str]) -> None:
    with open(csv_path) as fh:
        rows = sort_rows(list(csv.DictReader(fh)))
    import onnxruntime

    from dfquant.io import write_text

    runs = sorted({r["runs"] for r in rows if r.get("runs")})
    commits = sorted({r["commit"] for r in rows if r.get("commit")})
    algos = sorted({f"{r['model']}: {r['algo']}" for r in rows if r["form"] in FORMS})
    algo_line = ", ".join(sorted({r["algo"] for r in rows if r["form"] in FORMS})) or "-"
    lines = [
        "# Deployment benchmark: dfquant ONNX exports and onnxruntime's static quantization (CPU)", "",
        "Made by `benchmarks/deploy.py` (issue 30). Commands, in order (each run skips the rows the CSV already "
        "holds; `--update` re-measures the rows of its `--models`):", "",
        *(f"- `{c}`" for c in commands), "",
        f"CPU: {cpu_sentence(cpu_info())}", "",
        probe_sentence(saturation_probe()), "",
        f"Versions: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnx "
        f"{__import__('onnx').__version__}, Python {platform.python_version()}; dfquant commit(s) "
        f"{', '.join(commits) or '?'}. onnxruntime intra-op threads = torch threads = OMP_NUM_THREADS of the "
        f"command, CPU execution provider, all graph optimizations.", "",
        f"Latency: median of {', '.join(runs) or '?'} rounds per batch size (1 and 32), all files of one model "
        "interleaved in one process (each round times every file once, in a rotating order), so load from other "
        "processes on the shared machine hits them alike; each speed-up is FP32 median / this median from the "
        "same run (`timing_run` in the CSV says which rows shared one).", "",
        f"Quantization of the dfquant forms: {algo_line} (range initialization only unless stated; the ViT with "
        "RepQ-ViT's initialization without reconstruction), the same under the target and the papers' conventions. "
        "ort-static: `quantize_static(QuantFormat.QDQ, per_channel=True, activation_type=QUInt8, "
        "weight_type=QInt8)` on the FP32 ONNX after `quant_pre_process` (shape inference and onnxruntime's graph "
        "optimizations: the documented preparation step, kept because it does not hurt: in a separate check on the zoo "
        "ResNet-20 and MobileNetV2, MinMax, 500 test images, 15 rounds, it left top-1 unchanged (91.0 / 84.8) and the "
        "speed-ups within noise, and cut MobileNetV2's quantized graph from 373 to 303 nodes; `--no-ort-preprocess` "
        "skips it), one row per calibration "
        "method, with `reduce_range=False` and (rows `... reduce_range`) with `reduce_range=True`, the 7-bit weights "
        "onnxruntime's guide advises for CPUs without VNNI; it has no answer below 8 bits, so it has W8A8 rows "
        "only. Calibration images per model are the same for every form "
        "(`calib_images` in the CSV).", "",
        "Forms: **target** = quantized with `quant={\"target\": \"onnxruntime\"}` and exported as is; "
        "**paper-exact** = papers' conventions, exact export with `--fuse-bias`; **approx** = the same model with "
        "`--integer-residual --int8-weights` (another function than the simulated one); **ort-static** = "
        "onnxruntime's tool; **fp32** = the float model (the reference).", "",
        "Columns: *int / float* = Conv/Gemm/MatMul kernels in the graph onnxruntime runs (integer: QLinearConv, "
        "QGemm, MatMulIntegerToFloat, ...; float: Conv incl. NCHWc, Gemm, MatMul); *top-1 sim → deployed* on the "
        "labelled evaluation images (trained models); *agree sim* = argmax agreement of the deployed file with the "
        "simulation (fake-quantized PyTorch); *agree QDQ* = the same, with the file run by onnxruntime without its "
        "fusions into integer kernels (optimizations off: Q/DQ and Conv/MatMul in float, the graph's own "
        "semantics), which separates a wrong graph from integer-kernel arithmetic; *agree FP32* = argmax agreement "
        "of the deployed file with the FP32 "
        "PyTorch model (for the random-weight torchvision models the only accuracy proxy: their BatchNorm layers get a "
        "random affine and statistics measured on 64 random images, without which MobileNetV2's and ResNet-50's "
        "logits are ~1e-10 and any quantization agrees on 0%); *rel diff* = mean "
        "|logit difference| / max |logit| of deployed vs simulated.", "",
        "| model | bits | form | calib | size MiB | size ratio | b1 ms | b1 speed-up | b32 ms | b32 speed-up "
        "| int / float | top-1 sim → deployed | agree sim | agree QDQ | agree FP32 | rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = (f"{fmt(r['top1_sim'], '.2f')} → {fmt(r['top1_deployed'], '.2f')}" if num(r["top1_sim"]) is not None
                else fmt(r["top1_deployed"], ".2f"))
        lines.append(
            f"| {r['model']} | {r['bits']} | {r['form']} | {r['calib']} | {int(r['bytes']) / 2**20:.2f} "
            f"| {fmt(r['size_ratio'], '.1f', 'x')} | {fmt(r['b1_ms'], '.1f')} | {fmt(r['b1_speedup'], '.2f', 'x')} "
            f"| {fmt(r['b32_ms'], '.0f')} | {fmt(r['b32_speedup'], '.2f', 'x')} "
            f"| {r['int_kernels']} / {r['float_kernels']} | {top1} | {fmt(r['argmax_agree'], '.1f')} "
            f"| {fmt(r.get('qdq_agree'), '.1f')} | {fmt(r['fp_agree'], '.1f')} "
            f"| {fmt(r['mean_rel_diff'], '.1e') if r['form'] != 'fp32' else ''} |")
    lines += ["", "Why the float kernels stayed float (quantized forms; the exporter's record, or the same analysis "
              "on quantize_static's files):", "",
              "| model | bits | form | calib | float kernels: why |", "|---|---|---|---|---|"]
    for r in rows:
        if r["form"] != "fp32" and r["float_reasons"]:
            lines.append(f"| {r['model']} | {r['bits']} | {r['form']} | {r['calib']} | {r['float_reasons']} |")
    lines += ["", "## Reading the table", "", "Computed from the CSV by `deploy.py --report-only`:", ""]
    lines += goals(rows)
    lines += ["", "* The speed-ups and the integer kernels' arithmetic are this CPU's (above); the earlier table in "
              "`pre_target/deploy.md` was measured on an Intel Xeon with AVX-512 VNNI and AMX, so its ratios are "
              "not comparable with these.",
              "* paper-exact keeps float what the papers' simulation keeps float (residual sums, pooling inputs, the "
              "image, logits), so the Convs around them stay float and onnxruntime adds layout changes and "
              "Q/DQ between float and integer kernels; approx runs integer kernels but computes another model "
              "(compare its *agree sim* and top-1 with the simulated one)."]
    if len(algos) > len({r["model"] for r in rows if r["form"] in FORMS}):
        lines += ["", "**Check:** the CSV mixes quantization settings for one model: " + ", ".join(algos) + "."]
    absent = [m for m in MODELS if m not in {r["model"] for r in rows}
              and not any(n.startswith(m + " ") for n in missing_notes)]
    notes = missing_notes + ([f"{', '.join(absent)} (not in the CSV yet)"] if absent else [])
    if notes:
        lines += ["", "Not measured: " + "; ".join(notes) + "."]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return
    markers = {"target": "o", "paper-exact": "s", "approx": "^", "ort-static": "D"}
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    q = [r for r in rows if r["form"] in markers and num(r["b32_speedup"]) is not None]
    trained = [r for r in q if num(r["top1_deployed"]) is not None]
    random_w = [r for r in q if num(r["top1_deployed"]) is None]
    panels = [(p, k, t) for p, k, t in ((trained, "top1_deployed", "trained models: top-1 of the deployed file (%)"),
                                         (random_w, "fp_agree", "random-weight models: argmax agreement with FP32 (%)"))
              if p]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(8.5 * len(panels), 5), squeeze=False)
    for ax, (pts, k, title) in zip(axes[0], panels):
        for r in pts:
            filled = r["bits"] == "W8A8"
            ax.scatter(num(r[k]), num(r["b32_speedup"]), marker=markers[r["form"]], s=55,
                       facecolors=colors[r["model"]] if filled else "none", edgecolors=colors[r["model"]],
                       linewidths=1.3)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(SPEEDUP_GOAL, color="r", lw=0.8, ls="--")
        ax.set_xlabel(title, fontsize=9)
        ax.set_ylabel("onnxruntime speed-up over FP32, batch 32", fontsize=9)
        fps = ([r for r in rows if r["form"] == "fp32" and num(r["top1_deployed"]) is not None]
               if k == "top1_deployed" else [])
        for r in fps:
            ax.axvline(num(r["top1_deployed"]), color=colors[r["model"]], lw=0.6, ls=":")
        handles = [Line2D([], [], ls="", marker=mk, color="grey", label=f) for f, mk in markers.items()]
        handles += [Line2D([], [], ls="", marker="o", color=colors[m], label=m)
                    for m in dict.fromkeys(r["model"] for r in pts)]
        handles += [Line2D([], [], ls="", marker="o", color="grey", label="W8A8 (filled)"),
                    Line2D([], [], ls="", marker="o", color="grey", markerfacecolor="none", label="W4A4 (hollow)"),
                    Line2D([], [], color="r", ls="--", label=f"{SPEEDUP_GOAL:g}x goal")]
        if fps:
            handles.append(Line2D([], [], color="grey", ls=":", label="FP32 top-1"))
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle("dfquant exports vs onnxruntime quantize_static (one marker per form)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--runs", type=int, default=20, help="timed rounds per batch size")
    ap.add_argument("--n", type=int, default=1000, help="labelled test images for top-1 (zoo and real-world models)")
    ap.add_argument("--n-random", type=int, default=64,
                    help="random evaluation images for the random-weight torchvision models")
    ap.add_argument("--algo", default="minmax", help="dfquant algorithm for the CNNs (default: range init only)")
    ap.add_argument("--vit-algo", default="repq-vit", help="dfquant algorithm for the ViT")
    ap.add_argument("--iters", type=int, default=None,
                    help="reconstruction iterations (default: 1 for range-init-only algorithms, 0 for the ViT, "
                         "100 otherwise)")
    ap.add_argument("--no-ort-preprocess", action="store_true",
                    help="run quantize_static on the FP32 file without quant_pre_process")
    ap.add_argument("--ort-reduce-range", choices=["off", "on", "both"], default="both",
                    help="ort-static rows with reduce_range=False, True (7-bit weights: onnxruntime's advice for CPUs "
                         "without VNNI) or both (default)")
    ap.add_argument("--forms", nargs="+", choices=FORM_ORDER[1:], default=None,
                    help="measure only these forms (default: all; fp32 always)")
    ap.add_argument("--out", default="benchmarks/results/deploy")
    ap.add_argument("--report-only", action="store_true", help="rewrite <out>.md and <out>.png from the CSV")
    ap.add_argument("--update", action="store_true",
                    help="drop the rows of --models from the CSV and measure them again")
    args = ap.parse_args()
    out = Path(args.out)
    csv_path = out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    unavailable = {m: why for m in MODELS + args.models if (why := available(m))}
    if args.report_only:
        if not csv_path.exists():
            ap.error(f"{csv_path} is missing; measure first")
        report(csv_path, out, log_command(out, False), [f"{m} ({why})" for m, why in unavailable.items()])
        return
    commands = log_command(out, True)
    done = open_results(csv_path, FIELDS, key)
    if args.update:
        with open(csv_path) as fh:
            kept = [r for r in csv.DictReader(fh) if r["model"] not in args.models]
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        done = {key(r) for r in kept}
    with open(csv_path) as fh:
        old = [r for r in csv.DictReader(fh) if key(r) in done]
    commit = git_commit()
    for name in args.models:
        if name in unavailable:
            log(f"{name}: skipped: {unavailable[name]}")
            continue
        missing = [k for k in wanted_keys(name, args.ort_reduce_range, args.forms) if k not in done]
        if not missing:
            log(f"{name}: all its rows are in {csv_path}; skipped (--update to re-measure)")
            continue
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            measure(name, missing, args, Path(tmp), csv_path, commit,
                    {r["algo"] for r in old if r["model"] == name and r["form"] in FORMS})
        log(f"{name}: {len(missing)} rows in {time.time() - t0:.0f}s")
        report(csv_path, out, commands, [f"{m} ({why})" for m, why in unavailable.items()])
    report(csv_path, out, commands, [f"{m} ({why})" for m, why in unavailable.items()])


if __name__ == "__main__":
    main()
