"""benchmarks/target_cost.py (issue 30, item 4): its grid, its resumable CSV and the report made from it."""

import csv
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import target_cost  # noqa: E402


def _args(**kw):
    base = dict(models=["fmnist/resnet20", "fmnist/vit", "realworld/resnet20"], algos=["genie-m", "brecq", "repq-vit"],
                bits=["W8A8", "W4A4", "W2A4"], conventions=["paper", "target"], seeds=[0], more_seeds=[1, 2],
                more_seeds_for=["fmnist/resnet20:genie-m:W4A4"], iters=60, vit_iters=0, n=256, eval_limit=2000,
                rw_n=500, rw_eval_limit=0)
    return SimpleNamespace(**{**base, **kw})


def test_grid_pairs_conventions_fits_algorithms_to_models_and_adds_seeds_where_asked():
    rows = target_cost.grid(_args())
    # CNNs x (genie-m, brecq), the ViT x repq-vit, 3 bit settings, both conventions; + 2 seeds x 1 cell x 2
    assert len(rows) == (2 * 2 * 3 + 1 * 3) * 2 + 2 * 2
    assert {(r["model"], r["algo"]) for r in rows} == {
        ("fmnist/resnet20", "genie-m"), ("fmnist/resnet20", "brecq"), ("fmnist/vit", "repq-vit"),
        ("realworld/resnet20", "genie-m"), ("realworld/resnet20", "brecq")}
    assert [r["convention"] for r in rows[:2]] == ["paper", "target"] and rows[0]["bits"] == rows[1]["bits"]
    assert {r["iters"] for r in rows if r["model"] == "fmnist/vit"} == {0}
    assert {(r["n_calib"], r["eval_limit"]) for r in rows if r["model"] == "realworld/resnet20"} == {(500, "")}
    extra = [r for r in rows if r["seed"] != 0]
    assert {(r["model"], r["algo"], r["bits"], r["seed"]) for r in extra} == {
        ("fmnist/resnet20", "genie-m", "W4A4", 1), ("fmnist/resnet20", "genie-m", "W4A4", 2)}


def test_report_pairs_seeds_and_writes_table_and_plot(tmp_path):
    out = tmp_path / "target_cost"
    rows = []
    for seed, paper, target in ((0, 92.0, 91.0), (1, 92.5, 91.0), (2, 91.5, 91.0)):
        for conv, top1 in (("paper", paper), ("target", target)):
            rows.append({"model": "fmnist/resnet20", "algo": "genie-m", "bits": "W4A4", "convention": conv, "seed": seed,
                         "iters": 60, "n_calib": 256, "eval_limit": 2000, "top1": top1, "fp_top1": 93.6,
                         "eval_images": 2000, "quant_seconds": 50, "seconds": 70, "warnings": "",
                         "command": f"dfq quantize fmnist/resnet20 --seed {seed}"})
    rows.append({**rows[0], "model": "fmnist/vit", "algo": "repq-vit", "iters": 0, "top1": 80.7})  # paper only
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, target_cost.FIELDS)
        w.writeheader()
        w.writerows(rows)
    target_cost.report(out, "- `python benchmarks/target_cost.py`\n")
    md = out.with_suffix(".md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| fmnist/resnet20 "))
    assert "| 92.00 ± 0.50 | 91.00 ± 0.00 | -1.00 ± 0.50 | 3 |" in line
    assert "| fmnist/vit | repq-vit | W4A4 | 0 | 256 | 2000 | 93.6 | 80.70 | – | – | 1 |" in md
    assert "python benchmarks/target_cost.py" in md and "\n\n\n" not in md
    assert out.with_suffix(".png").stat().st_size > 0
