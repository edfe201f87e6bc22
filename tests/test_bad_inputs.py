"""Issue 19: every bad input gets one ``error:`` line and exit code 2, leaves no file behind, and is
never accepted silently. The command-line probes are those of ``benchmarks/reliability.py`` (which
records what a user sees, before and after), run here in-process against the current code."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dfquant.cli import main
from dfquant.errors import DfqError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from reliability import PROBES, QUICK, make_fixtures, snapshot  # noqa: E402


def dfq(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the ``dfq`` entry point in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    old = sys.argv
    sys.argv = ["dfq", *argv]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    from dfquant.models.registry import zoo_dir

    root = tmp_path_factory.mktemp("bad_inputs")

    def run(argv: list[str]) -> None:
        old = sys.argv
        sys.argv = ["dfq", *argv]
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), f"fixture command failed: {argv}"
        finally:
            sys.argv = old

    make_fixtures(root, zoo_dir(), run)
    return root


@pytest.mark.parametrize("probe", PROBES, ids=[p.id for p in PROBES])
def test_bad_input_is_one_line_and_leaves_nothing(probe, fixtures, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(fixtures)
    argv = [a.replace("{F}", str(fixtures)).replace("{W}", str(work)) for a in probe.argv]
    code, _, err = dfq(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == probe.rc, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert probe.must in lines[0], lines[0]
    assert snapshot(work) == set() and snapshot(fixtures) == before


def test_requantizing_removes_stale_exports_and_refuses_nan(fixtures, tmp_path):
    from dfquant.io import read_json
    from dfquant.models.source import load_quantized_spec
    from dfquant.quant.checkpoint import EXPORT_FILES, save_quantized
    from dfquant.quant.modules import QuantConfig

    ckpt = tmp_path / "ckpt"
    shutil.copytree(fixtures / "ckpt", ckpt)
    for name in EXPORT_FILES:
        (ckpt / name).write_text("from an earlier export")
    spec, qmodel = load_quantized_spec(ckpt)
    meta = read_json(ckpt / "quant_config.json")
    qcfg = QuantConfig(**meta.pop("quant"))
    meta.pop("quantizers")
    save_quantized(ckpt, spec.record(), qmodel, qcfg, meta)
    assert not any((ckpt / name).exists() for name in EXPORT_FILES)
    assert (ckpt / "model.safetensors").exists()

    name, param = next(iter(qmodel.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    fresh = tmp_path / "fresh"
    with pytest.raises(DfqError, match=f"tensor {name};.*nothing was written"):
        save_quantized(fresh, spec.record(), qmodel, qcfg, meta)
    assert not fresh.exists()


def test_resume_rerenders_a_truncated_png(tmp_path):
    from dfquant.data.fmnist import CLASS_NAMES
    from dfquant.generate import pipeline as gp
    from dfquant.generate.mini import build_pipeline
    from dfquant.prompts import make_manifest

    pipe = build_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    rows = make_manifest(list(CLASS_NAMES), 2, "single", seed=0)
    small = dict(steps=1, guidance=1.0, height=32, width=32, generator_id="tiny", progress=False)
    gp.generate(rows, pipe, tmp_path, **small)
    png = tmp_path / "000001.png"
    whole = png.read_bytes()
    png.write_bytes(whole[: len(whole) // 2])  # a truncated file under its final name
    (tmp_path / gp.MANIFEST).unlink()
    gp.generate(rows, pipe, tmp_path, **small)
    assert png.read_bytes() == whole


def test_ctrl_c_prints_the_resume_line(monkeypatch, capsys):
    import dfquant.models.source as source  # where the CLI resolves registry names

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(source, "get_model", interrupted)
    code, _, err = dfq(["eval", "fmnist/resnet20"], capsys)
    assert code == 130 and err.strip() == "interrupted; re-run the same command to resume"


def test_quantize_off_a_terminal_has_no_bar_codes_and_estimates_time(tmp_path, capsys):
    code, out, err = dfq(["quantize", "fmnist/resnet20", "--calib", "real:A", "--iters", "24", "--n", "4",
                          "--batch-size", "2", "--eval-limit", "8", "--out", str(tmp_path / "q")], capsys)
    assert code == 0, err
    assert "\r" not in err and "\x1b[" not in err
    assert [ln for ln in err.splitlines() if ln.strip()] == [next(ln for ln in err.splitlines() if ln.strip())]
    assert err.startswith("estimated reconstruction time: ") and "11 units x 24 iterations" in err


def test_time_estimate_leaves_results_unchanged(resnet20):
    from dfquant.data.calib import load_calibration
    from dfquant.quant.api import quantize

    calib = load_calibration("real:A", resnet20, 4)
    runs = [quantize(resnet20.model, calib, "genie-m", 4, 4, iters=24, batch_size=2, progress=p)[0].state_dict()
            for p in (True, False)]
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("argv, old, new", [
    (["eval", "fmnist/resnet20", "--limit", "0"], "--limit", "--eval-limit"),
    (["export", "{ckpt}", "--n", "0"], "--n", "--eval-limit"),
    (["grid", "{ckpt}", "--n", "0"], "--n", "--per-sheet"),
    (["qat", "fmnist/resnet20", "--calib", "real:A", "--bn-stats", "both", "--out", "{tmp}/qat"], "--bn-stats", "--bn-recalib"),
], ids=["eval-limit", "export-n", "grid-n", "qat-bn-stats"])
def test_old_option_names_still_work_with_a_deprecation_line(argv, old, new, fixtures, tmp_path, capsys):
    argv = [a.replace("{ckpt}", str(fixtures / "ckpt")).replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = dfq(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # the old spelling reaches the same check as the new one (its value is out of range / not a mode)
    assert code == 2 and len(lines) == 2, err
    assert lines[0] == f"warning: {old} is deprecated; use {new}"
    assert lines[1].startswith("error: ") and (new in lines[1] or "both" in lines[1]), lines[1]


def test_one_name_per_concept_in_help(capsys):
    for cmd in ("eval", "quantize", "qat", "run", "export"):
        code, out, _ = dfq([cmd, "--help"], capsys)
        assert code == 0 and "--eval-limit" in out, cmd
    for cmd in ("quantize", "qat", "run"):
        assert "--bn-recalib" in dfq([cmd, "--help"], capsys)[1]
    for cmd in ("eval", "grid", "report"):
        assert "--threads" in dfq([cmd, "--help"], capsys)[1]
    assert "learned" in dfq(["run", "--help"], capsys)[1]


def test_hub_goes_offline_without_network(monkeypatch):
    from dfquant import hub

    assert not hub.reachable("http://127.0.0.1:9", timeout=1.0)  # the discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=2.0: False)
    hub.offline.cache_clear()
    try:
        assert hub.offline() and os.environ["HF_HUB_OFFLINE"] == "1"
    finally:
        hub.offline.cache_clear()
    assert hub.download_hint("stabilityai/sd-turbo") == "`hf download stabilityai/sd-turbo`"


def test_damaged_resume_file_names_itself(tmp_path):
    from dfquant.io import load_torch

    path = tmp_path / "qat_resume.pt"
    torch.save({"step": 3}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DfqError, match=f"{path} is damaged.*delete it to start over"):
        load_torch(path)


def test_val_folder_with_a_bad_image_is_one_line(fixtures, tmp_path, capsys):
    """A val image that fails inside a DataLoader worker still ends as one line."""
    val = tmp_path / "val"
    for c in range(10):
        shutil.copytree(fixtures / "three_png", val / f"c{c}")
    (val / "c3" / "1.png").write_text("not an image")
    code, _, err = dfq(["eval", "fmnist/resnet20", "--val", str(val)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "c3/1.png is not a readable image" in lines[0], err


def test_iters_0_is_range_init_only_for_algorithms_that_learn_nothing(tmp_path, capsys):
    """RepQ-ViT as published runs no reconstruction: `--iters 0` is accepted for it (and minmax / mse), refused with
    one line for an algorithm that learns (it would silently become another one), on `dfq run` before any output."""
    code, out, err = dfq(["quantize", "fmnist/vit", "--algo", "repq-vit", "--calib", "real:A", "--n", "8", "--iters", "0",
                          "--wbits", "8", "--abits", "8", "--eval-limit", "20", "--out", str(tmp_path / "vit")], capsys)
    assert code == 0 and "repq-vit" in out and (tmp_path / "vit" / "model.safetensors").exists(), err
    code, out, err = dfq(["run", "--model", "fmnist/resnet20", "--source", "real", "--algo", "brecq", "--iters", "0",
                          "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: --iters 0 must be at least 1 for brecq (block reconstruction); 0 is range initialization only: "
        "--algo repq-vit as published, or minmax / mse"]
    assert not (tmp_path / "run").exists()
