"""benchmarks/deploy.py's bookkeeping: the rows a model gets, and the report's goal verdicts computed from the CSV."""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import deploy  # noqa: E402


def _row(model, bits, form, calib="", **kw):
    base = {f: "" for f in deploy.FIELDS}
    base.update(model=model, bits=bits, form=form, calib=calib, bytes=1000, size_ratio=1.0, b1_ms=1.0,
                b1_speedup=1.0, b32_ms=10.0, b32_speedup=1.0, int_kernels=0, float_kernels=1, fp_agree=100.0,
                runs=3, algo="" if form in ("fp32", "ort-static") else "minmax")
    base.update(kw)
    return base


def test_each_model_gets_fp32_three_forms_at_two_bit_widths_and_three_ort_calibrations():
    keys = deploy.wanted_keys("fmnist/resnet20")
    assert keys[0] == ("fmnist/resnet20", "FP32", "fp32", "")
    assert len(keys) == 1 + 2 * 3 + 6 and len(set(keys)) == len(keys)
    assert [k[3] for k in keys if k[2] == "ort-static"][:3] == ["MinMax", "Entropy", "Percentile"]
    assert {k[1] for k in keys if k[2] == "ort-static"} == {"W8A8"} and "MinMax reduce_range" in [k[3] for k in keys]
    assert len(deploy.wanted_keys("m", "off")) == 1 + 2 * 3 + 3


def test_report_computes_the_goals_from_the_rows(tmp_path):
    pytest.importorskip("onnxruntime")
    classifier = f"1x {deploy.CLASSIFIER_REASON}"
    rows = [_row("torchvision/resnet18", "FP32", "fp32", float_kernels=21)]
    for bits in ("W8A8", "W4A4"):
        rows.append(_row("torchvision/resnet18", bits, "target", b1_speedup=2.5, b32_speedup=2.2 if bits == "W8A8"
                         else 1.7, int_kernels=20, float_reasons=classifier, argmax_agree=100.0, mean_rel_diff=1e-6,
                         fp_agree=90.0, size_ratio=4.0 if bits == "W8A8" else 7.5, qdq_agree=100.0))
    rows += [_row("torchvision/resnet18", "W8A8", "ort-static", c, b1_speedup=s, b32_speedup=s, int_kernels=21,
                  float_kernels=0, fp_agree=a) for c, s, a in (("MinMax", 2.0, 95.0), ("Entropy", 2.6, 80.0),
                                                                ("Percentile", 1.5, 85.0))]
    rows.append(_row("fmnist/resnet20", "W8A8", "target", int_kernels=19, float_kernels=3, argmax_agree=99.5,
                     qdq_agree=100.0,
                     float_reasons="2x output not quantized (feeds Add in float); " + classifier,
                     top1_sim=92.0, top1_deployed=91.9))
    out = tmp_path / "deploy"
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, deploy.FIELDS)
        w.writeheader()
        w.writerows(rows)
    deploy.report(out.with_suffix(".csv"), out, ["OMP_NUM_THREADS=1 python benchmarks/deploy.py"], ["x (absent)"])
    md = out.with_suffix(".md").read_text()
    assert ("**not met** for 1 of 3 target rows: fmnist/resnet20 W8A8 99.5% (the same file without integer "
            "fusions: 100.0%)") in md
    assert "1 of these 1 files equal the simulation" in md
    assert "an integer kernel except the classifier** (target form): **not met** for 1 of 3" in md
    assert "resnet18 W4A4 2.50x / 1.70x (**below**)" in md and "not measured: torchvision/resnet50 W8A8" in md
    assert "target agreement with FP32 90.00% vs ort-static MinMax 95.00%" in md and "**less accurate**" in md
    assert "**slower** than Entropy at b1 or b32" in md
    assert "Not measured: x (absent); torchvision/resnet50, " in md
    assert "`OMP_NUM_THREADS=1 python benchmarks/deploy.py`" in md
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").exists()


def test_kernel_ceiling_separates_convolution_kernels_from_the_rest(tmp_path):
    import kernel_ceiling as kc

    def r(form, op, ms, wall):
        return {"model": "m", "batch": "1", "form": form, "op_type": op, "ms": ms, "nodes": 2, "wall_ms": wall}

    rows = [r("fp32", "Conv", 8.0, 10.0), r("fp32", "Conv group>1", 1.0, 10.0), r("fp32", "MaxPool", 0.5, 10.0),
            r("target", "QLinearConv", 3.0, 5.0), r("target", "QLinearConv group>1", 1.0, 5.0),
            r("target", "QLinearAdd", 0.6, 5.0), r("target", "Gemm", 0.2, 5.0)]
    by_form = {s["form"]: s for s in kc.summary(rows)}
    assert by_form["target"]["conv_speedup"] == pytest.approx(9.0 / 4.0)
    assert by_form["target"]["grouped_speedup"] == pytest.approx(1.0) and by_form["target"]["grouped_nodes"] == 2
    assert by_form["target"]["speedup"] == pytest.approx(2.0)
    assert by_form["target"]["other_ms"] == pytest.approx(0.8) and by_form["target"]["conv_nodes"] == 4
    path = tmp_path / "kc.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, kc.FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    kc.report(path, tmp_path / "kc", ["python benchmarks/kernel_ceiling.py"])
    md = (tmp_path / "kc.md").read_text()
    assert "| m | 1 | target | 5.0 | 2.00x | 4.0 (4) | 2.25x | 1.0 (2) | 1.00x | 0.80 |" in md
    assert "2.25x (m, batch 1)" in md


def test_forms_restrict_the_rows_but_keep_the_fp32_reference():
    keys = deploy.wanted_keys("m", "on", ["target", "ort-static"])
    assert keys[0][2] == "fp32" and {k[2] for k in keys} == {"fp32", "target", "ort-static"}
    assert len(keys) == 1 + 2 + 3
