"""A user's own pretrained model, end to end: its preprocessing, its checkpoint file, balanced evaluation subsets,
every command taking the same model arguments, quantized folders that reopen, and honest generated-data checks.

The last tests run on ``../shared/realworld`` (a real pretrained CIFAR-10 ResNet-20) and skip without it."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dfquant
from custom_models import resnet_a
from dfquant.cli import app
from dfquant.errors import DfqError
from dfquant.models.source import ModelArgs, load_weights, resolve_model

MODELS = str(Path(__file__).parent / "custom_models.py")
RW = Path(__file__).resolve().parents[2] / "shared" / "realworld"


def _class_folder(root: Path, classes: int = 10, per_class: int = 3, size: int = 32) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (25 * c, 40 * i, 200 - 20 * c)).save(root / f"c{c}" / f"{i}.png")
    return root


def _invoke(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def test_weights_without_num_batches_tracked_load_and_real_mismatches_name_keys(tmp_path):
    """A checkpoint saved before torch 1.0 (no BN counters, DataParallel prefixes) loads as strict=True would."""
    ref = resnet_a()
    state = {f"module.{k}": v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state}, tmp_path / "old.th")
    model = resnet_a()
    load_weights(model, tmp_path / "old.th")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    del state["module.bn1.weight"]
    torch.save(state, tmp_path / "bad.th")
    with pytest.raises(DfqError, match=r"1 missing keys \(first: bn1.weight\)"):
        load_weights(resnet_a(), tmp_path / "bad.th")


def test_custom_model_default_is_no_crop_and_the_images_decide_the_size(tmp_path):
    """No data config: resize the short side to the size, no crop (a 32x32 image is only normalized)."""
    val = _class_folder(tmp_path / "val", classes=10, per_class=1)
    spec = resolve_model(ModelArgs(f"{MODELS}:resnet_a"))
    assert spec.input_size is None
    from dfquant.models.source import ensure_input_size

    with pytest.warns(UserWarning, match="using the images' size 32"):
        ensure_input_size(spec, val)
    assert spec.input_size == (3, 32, 32) and spec.crop_pct == 1.0
    img = Image.open(val / "c3" / "0.png").convert("RGB")
    from torchvision.transforms.functional import normalize, to_tensor

    plain = normalize(to_tensor(img), spec.mean, spec.std)
    assert torch.equal(spec.transform()(img), plain)
    # the preprocessing flags reach the transform: a 0.875 crop of a textured image differs from no crop
    noisy = Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy())
    cropped = resolve_model(ModelArgs(f"{MODELS}:resnet_a", size=32, crop_pct=0.875, interpolation="bicubic"))
    assert cropped.transform()(noisy).shape == (3, 32, 32)
    assert not torch.allclose(cropped.transform()(noisy), spec.transform()(noisy))
    resized = resolve_model(ModelArgs(f"{MODELS}:resnet_a", size=32, resize=40, mean=(0.5,) * 3, std=(0.25,) * 3))
    assert resized.resize == 40 and resized.mean == (0.5, 0.5, 0.5)
    with pytest.raises(DfqError, match="pass --size"):
        ensure_input_size(resolve_model(ModelArgs(f"{MODELS}:resnet_a")), None)


def test_eval_limit_is_class_balanced_seeded_and_counted(tmp_path):
    from dfquant.data.folders import balanced_indices
    from dfquant.models.evaluate import val_subset

    labels = [c for c in range(5) for _ in range(10)]  # a class-sorted folder
    idx = balanced_indices(labels, 20, seed=0)
    assert sorted({labels[i] for i in idx}) == [0, 1, 2, 3, 4] and len(idx) == 20
    assert all(sum(labels[i] == c for i in idx) == 4 for c in range(5))
    assert balanced_indices(labels, 20, seed=0) == idx and balanced_indices(labels, 20, seed=1) != idx
    odd = balanced_indices(labels, 7, seed=0)
    assert len(odd) == 7 and max(sum(labels[i] == c for i in odd) for c in range(5)) == 2
    val = _class_folder(tmp_path / "val", classes=10, per_class=3)
    spec = resolve_model(ModelArgs(f"{MODELS}:resnet_a", size=32))
    sub = val_subset(spec, val, 10)
    assert sorted(y for _, y in (sub[i] for i in range(len(sub)))) == list(range(10))
    out = _invoke(["eval", f"{MODELS}:resnet_a", "--val", str(val), "--eval-limit", "10"])
    assert re.search(r"top-1 [\d.]+% on 10 images", out)


def test_calibration_subset_of_a_class_folder_spans_the_classes(tmp_path):
    from dfquant.data.folders import load_folder_images

    root = tmp_path / "train"
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (60 * c, 0, 0)).save(root / f"c{c}" / f"{i}.png")
    x = load_folder_images(root, lambda im: torch.tensor(im.getpixel((0, 0))[:1], dtype=torch.float32), limit=8)
    assert sorted(x.flatten().tolist()) == [0, 0, 60, 60, 120, 120, 180, 180]


def test_every_command_takes_the_model_arguments(tmp_path):
    """plan, distill, quantize, eval, export, qat and run all accept a file.py:factory model with its weights and
    preprocessing; the quantized folder records them and reopens in eval and export."""
    torch.save({f"module.{k}": v for k, v in resnet_a().state_dict().items()}, tmp_path / "w.pth")
    model = [f"{MODELS}:resnet_a", "--weights", str(tmp_path / "w.pth"), "--size", "32", "--mean", "0.5,0.5,0.5",
             "--std", "0.25,0.25,0.25", "--interpolation", "bicubic"]
    val = _class_folder(tmp_path / "val", classes=10, per_class=2)
    assert "residual" in _invoke(["plan", *model])
    _invoke(["distill", *model, "--method", "zeroq", "--n", "8", "--iters", "2", "--batch-size", "8",
             "--out", str(tmp_path / "d.safetensors")])
    out = tmp_path / "q"
    text = _invoke(["quantize", *model, "--calib", str(tmp_path / "d.safetensors"), "--n", "8", "--batch-size", "8",
                    "--algo", "minmax", "--wbits", "8", "--abits", "8", "--iters", "1", "--val", str(val),
                    "--out", str(out)])
    assert "(on 20 images)" in text
    pre = json.loads((out / "quant_config.json").read_text())["preprocess"]
    assert pre["input_size"] == [3, 32, 32] and pre["mean"] == [0.5] * 3 and pre["interpolation"] == "bicubic"
    assert re.search(r"quantized\): top-1 [\d.]+% on 20 images", _invoke(["eval", str(out), "--val", str(val)]))
    _invoke(["export", str(out), "--val", str(val), "--eval-limit", "10", "--speed-runs", "0"])
    qat = _invoke(["qat", *model, "--calib", str(tmp_path / "d.safetensors"), "--n", "8", "--batch-size", "8",
                   "--iters", "1", "--wbits", "8", "--abits", "8", "--val", str(val), "--out", str(tmp_path / "qat")])
    assert "after QAT" in qat
    from dfquant.run import RunConfig

    cfg = RunConfig.load(None, model=f"{MODELS}:resnet_a", weights=str(tmp_path / "w.pth"), size=32, mean=[0.5] * 3,
                         std=[0.25] * 3, source=str(val))
    assert cfg.size == 32 and cfg.mean == [0.5] * 3
    with pytest.raises(DfqError, match="interpolation.*is not one of"):
        RunConfig.load(None, interpolation="cubic")


def test_python_save_records_the_model_and_the_commands_reopen_it(tmp_path):
    model = resnet_a().eval()
    qmodel, report = dfquant.quantize(model, torch.randn(8, 3, 32, 32), wbits=8, abits=8, algo="minmax", iters=1,
                                      batch_size=8, progress=False)
    val = _class_folder(tmp_path / "val", classes=10, per_class=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    dfquant.save(tmp_path / "q", qmodel, report, model=f"{MODELS}:resnet_a", size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    top1 = dfquant.evaluate(tmp_path / "q", val)
    assert top1.n == 10 and 0 <= top1 <= 100
    same = dfquant.evaluate(qmodel, val, transform=resolve_model(ModelArgs(f"{MODELS}:resnet_a", size=32, mean=(0.5,) * 3,
                                                                           std=(0.25,) * 3)).transform())
    assert same.correct == top1.correct
    assert re.search(r"top-1 [\d.]+% on 10 images", _invoke(["eval", str(tmp_path / "q"), "--val", str(val)]))
    rep = dfquant.export(tmp_path / "q", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").exists() and rep["export"]["path"]
    dfquant.save(tmp_path / "anon", qmodel, report)  # no model reference: a clear error, not a KeyError
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "anon"), "--val", str(val)])
    assert isinstance(res.exception, DfqError) and "saved from Python without a model reference" in str(res.exception)
    with pytest.raises(DfqError, match="needs input_size"):
        dfquant.export(qmodel, tmp_path / "x.onnx")


def _generated(folder: Path, classes: list[list[str]]) -> Path:
    folder.mkdir()
    rows = [{"index": i, "prompt": " and ".join(c), "classes": [], "class_names": c, "seed": i, "strategy": "mixup"}
            for i, c in enumerate(classes)]
    for i in range(len(rows)):
        Image.new("RGB", (8, 8)).save(folder / f"{i:06d}.png")
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_generated_calibration_check_says_when_the_generator_does_not_know_the_classes(tmp_path):
    """The FP model scores the generated images against their prompts (mixup: either class); below 30% one
    warning line names better sources."""
    from dfquant.data.calib import check_generated
    from dfquant.models.spec import ModelSpec

    class Const(torch.nn.Module):  # always predicts class 0, "a"
        def forward(self, x):
            return torch.tensor([[5.0, 0.0, 0.0]]).expand(len(x), 3)

    spec = ModelSpec("const", Const(), (3, 8, 8), (0.5,) * 3, (0.5,) * 3, ["a", "b", "c"], crop_pct=1.0)
    mixed = _generated(tmp_path / "mixed", [["a", "b"], ["b", "c"], ["c", "a"], ["b"], ["a"], ["c"], ["b", "a"], ["c"]])
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = check_generated(spec, mixed, log=lines.append)
    assert res["images"] == 8 and res["share"] == pytest.approx(50.0)  # "a" is in 4 of the 8 prompts
    assert "50.0% of 8 generated images" in lines[0] and not caught
    other = _generated(tmp_path / "other", [["b"], ["c"], ["b", "c"], ["c"], ["a"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = check_generated(spec, other, log=lines.append)
    assert res["share"] == pytest.approx(20.0)
    assert len(caught) == 1 and "does not know these classes" in str(caught[0].message)
    assert "dfq distill" in str(caught[0].message)
    spec.class_names = ["x", "y", "z"]  # a manifest of other names is not checked
    assert check_generated(spec, other, log=lines.append) is None


def test_split_class_names_warn(tmp_path):
    from dfquant.generate.pipeline import warn_split_class_names

    class Tok:
        def tokenize(self, word):
            return list(word)  # one piece per letter

    pipe = type("P", (), {"tokenizer": Tok()})()
    with pytest.warns(UserWarning, match=r"'zebra' \(5 pieces\)"):
        assert warn_split_class_names(pipe, ["cat", "zebra", "T-shirt/top"]) == ["zebra", "T-shirt/top"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_split_class_names(pipe, ["cat", "dog/top"]) == []


needs_rw = pytest.mark.skipif(not (RW / "akamaster" / "resnet.py").exists(), reason="../shared/realworld is absent")


@needs_rw
def test_realworld_resnet20_scores_as_its_authors_report():
    """The corpus README: 80.45 on its 2,000 test JPEGs with the authors' preprocessing, which are dfq's defaults."""
    out = _invoke(["eval", f"{RW}/akamaster/resnet.py:resnet20", "--weights",
                   f"{RW}/akamaster/pretrained_models/resnet20-12fca82f.th", "--val", f"{RW}/cifar10/test"])
    assert "top-1 80.45% on 2000 images" in out


@needs_rw
def test_realworld_eval_limit_spans_every_class():
    spec = resolve_model(ModelArgs(f"{RW}/akamaster/resnet.py:resnet20", size=32))
    from dfquant.models.evaluate import val_subset

    sub = val_subset(spec, RW / "cifar10" / "test", 100)
    labels = [sub.dataset.samples[i][1] for i in sub.indices]
    assert all(labels.count(c) == 10 for c in range(10))


def test_images_of_another_size_are_resized_and_said_once(tmp_path):
    val = _class_folder(tmp_path / "val", classes=10, per_class=1, size=48)
    spec = resolve_model(ModelArgs(f"{MODELS}:resnet_a", size=32))
    from dfquant.models.evaluate import evaluate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(spec, val_dir=val, progress=False)
        evaluate(spec, val_dir=val, progress=False)
    said = [w for w in caught if "are 48x48" in str(w.message)]
    assert len(said) == 1 and "not the model's 32x32" in str(said[0].message)
