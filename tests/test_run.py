"""End to end: prompts -> generate -> quantize -> evaluate -> report, with stage caching."""

import json

import pytest

from dfquant.errors import DfqError
from dfquant.run import RunConfig, parse_bits, run


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    from dfquant.generate.mini import build_pipeline

    path = tmp_path_factory.mktemp("gen") / "tiny"
    build_pipeline("tiny", seed=0).save_pretrained(path, safe_serialization=True)
    return str(path)


def test_end_to_end_with_caching_and_report(tiny_generator, tmp_path, capsys):
    # batch 16: Genie-M initialises the activation ranges on the first batch, the bulk of each quantize stage here
    cfg = RunConfig(model="fmnist/resnet20", source="generated", strategy="mixup", n=32, generator=tiny_generator,
                    steps=2, bits=["W4A4", "W8A8"], iters=3, batch_size=16, eval_limit=200, out=str(tmp_path / "run"))
    rows = run(cfg, progress=False)
    d = tmp_path / "run"
    assert [r["bits"] for r in rows] == ["W4A4", "W8A8"]
    assert all(0 <= r["q_top1"] <= 100 for r in rows) and rows[0]["strategy"] == "mixup-random-k2"
    assert len(list((d / "images").glob("*.png"))) == 32
    prompts = [json.loads(line) for line in (d / "prompts.jsonl").read_text().splitlines()]
    assert all(len(p["classes"]) == 2 and " and a " in p["prompt"] for p in prompts)
    for f in ("config.yaml", "versions.json", "run.log", "results.md", "quant/W4A4/model.safetensors",
              "quant/W4A4/quant_config.json"):
        assert (d / f).exists(), f
    stages = json.loads((d / "stages.json").read_text())
    assert set(stages) == {"prompts", "generate", "fp_eval", "quant_W4A4", "quant_W8A8"}
    mtimes = {p: p.stat().st_mtime_ns for p in [d / "images" / "000000.png", d / "quant/W4A4/model.safetensors"]}
    capsys.readouterr()
    rows2 = run(cfg, progress=False)
    log = capsys.readouterr().out
    assert rows2 == rows and "W4A4: cached" in log and "generate:" not in log
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    # a new bit setting only runs the new stage
    run(RunConfig(**{**cfg.__dict__, "bits": ["W4A4", "W3A3"]}), progress=False)
    assert "quant_W3A3" in json.loads((d / "stages.json").read_text())
    from dfquant.report import write_report

    (d / "analysis").mkdir()  # what `dfq analyze --out RUN/analysis` leaves there: its numbers join the report
    (d / "analysis" / "gradnorm.json").write_text(json.dumps({"mixup": {"mean_grad_norm": 42.0, "median_grad_norm": 7.0}}))
    md = write_report([d], tmp_path / "report")
    text = md.read_text()
    assert "accuracy_vs_bits.png" in text and "mixup-random-k2" in text and (tmp_path / "report" / "accuracy_vs_bits.png").exists()
    assert "| mixup | 42 | 7 |" in text


def test_real_source_and_bad_config(tmp_path):
    with pytest.raises(DfqError, match="unknown key"):
        (tmp_path / "c.yaml").write_text("modle: x\n")
        RunConfig.load(tmp_path / "c.yaml")
    with pytest.raises(DfqError, match="W4A4"):
        parse_bits("4bit")
    assert parse_bits("w1.58a8") == (1.58, 8.0)
    with pytest.raises(DfqError, match="bn_recalib='yes' is not one of relative"):
        run(RunConfig(bn_recalib="yes", out=str(tmp_path / "bad")), progress=False)
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    # 32 real images: mse range-searches every activation on all of them (W8A8 within 0.1 points from 32 to 128)
    rows = run(RunConfig(source="real", n=32, bits=["W8A8"], algo="mse", iters=0, eval_limit=300,
                         out=str(tmp_path / "real")), progress=False)
    assert rows[0]["strategy"] == "real" and abs(rows[0]["fp_top1"] - rows[0]["q_top1"]) < 2.0


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        cfg = RunConfig.load(path)
        assert all(parse_bits(b) for b in cfg.bits) and cfg.n == 1024 and cfg.batch_size == 32


def test_paired_comparison_pairs_seeds_and_counts_wins():
    from dfquant.report import paired_comparison

    rows = [dict(model="m", algo="genie-m", bits="W2A4", strategy=s, seed=seed, q_top1=acc)
            for s, seed, acc in [("mixup", 0, 80.0), ("single", 0, 78.0), ("mixup", 1, 70.0), ("single", 1, 71.0),
                                 ("mixup", 2, 75.0)]]  # seed 2 has no single row: left out, not paired
    table = paired_comparison(rows, "mixup", "single")
    assert "| m | genie-m | W2A4 | +0.50 ± 2.12 | 1/2 |" in table
    assert paired_comparison(rows, "mixup", "real") == ""


def test_pivot_table_puts_sources_down_and_settings_across():
    from dfquant.report import aggregate, pivot_table

    rows = [dict(model="m", algo="genie-m", bits=b, strategy=s, seed=seed, q_top1=acc, fp_top1=90.0, quant_seconds=1)
            for s, b, seed, acc in [("single", "W4A4", 0, 88.0), ("single", "W4A4", 1, 86.0), ("real", "W2A4", 0, 70.0)]]
    table = pivot_table(aggregate(rows), ["real", "single"])
    lines = table.splitlines()
    assert lines[0] == "| calibration | m genie-m W4A4 | m genie-m W2A4 |"  # higher bits first
    assert lines[2] == "| real | – | 70.00 (1) |"  # caller's order, missing cell marked
    assert lines[3] == "| single | 87.00 ± 1.41 (2) | – |"
    assert pivot_table([], None) == ""
