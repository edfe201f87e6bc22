"""benchmarks/gpu/bench.py stays runnable: it exits 0 without a GPU and its code paths run at toy sizes."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_gpu_says_so_and_writes_nothing(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path / "gpu")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_smoke_runs_every_part(bench, tmp_path):
    out = tmp_path / "gpu"
    assert bench.main(["--smoke", "--gen-steps", "1", "--gen-batch", "2", "--gen-batches", "1", "--compile", "off",
                       "--family-batch", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    gen = [r for r in rows if r["part"] == "generate"]
    recon = [r for r in rows if r["part"] == "recon"]
    assert len(gen) == 1 and float(gen[0]["value"]) > 0
    families = [r["setting"].split()[0] for r in rows if r["part"] == "families" and float(r["value"]) > 0]
    assert families == ["sd15", "sd-turbo", "sdxl-turbo", "sd35-medium", "pixart-sigma", "sana", "flux-schnell",
                        "flux2-klein"]
    blocks = [r for r in recon if "layer" in r["setting"]]
    assert len(blocks) == 8  # resnet18: 4 stages x 2 BasicBlocks
    assert any("peak host RSS" in r["setting"] and float(r["value"]) > 0 for r in recon)
    assert "Command: `python" in out.with_suffix(".md").read_text()
