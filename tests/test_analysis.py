import json

import torch

from dfquant.analysis.studies import generalization_gap, gradnorm_study, tsne_study
from dfquant.data import fmnist


def test_analyses_write_numbers_and_pngs(resnet20, tmp_path):
    x, y = fmnist.load_split("A", limit=96, seed=3)
    real = resnet20.normalize(x)
    noise = torch.randn_like(real)
    # 32-image calibration sets (one batch): the range search of quantize(..., "mse", iters=0) runs on every
    # calibration image, and none of the checks depends on how many there are
    res = gradnorm_study(resnet20.model, {"real": real[:32], "noise": noise[:32]}, tmp_path, iters=4)
    assert set(res) == {"real", "noise"} and all(r["steps"] == 4 * 11 and r["mean_grad_norm"] > 0 for r in res.values())
    assert (tmp_path / "gradnorm.png").stat().st_size > 1000

    from dfquant.quant.api import quantize

    q, _ = quantize(resnet20.model, real[:32], "mse", 4, 4, iters=0, progress=False)
    gap = generalization_gap(q, real[:32], real[64:])
    assert gap["loss_calib"] > 0 and gap["gap"] == gap["loss_heldout_real"] - gap["loss_calib"]

    xt, yt = fmnist.load_split("test", limit=200)
    stats = tsne_study(resnet20.model, resnet20.normalize(xt), yt,
                       {"real-A": (real, [[int(c)] for c in y]), "noise": (noise, [[int(c)] for c in y])},
                       list(fmnist.CLASS_NAMES), tmp_path, per_set=96)
    # real split-A images sit closer to the real test centroids than noise does
    assert stats["real-A"]["mean_class_centroid_distance"] < stats["noise"]["mean_class_centroid_distance"]
    assert json.loads((tmp_path / "tsne.json").read_text()) == stats and (tmp_path / "tsne.png").exists()


def test_analysis_table_aggregates_seeds_and_rejects_empty_folders(tmp_path):
    import pytest

    from dfquant.analysis.summary import analysis_table, has_results
    from dfquant.errors import DfqError

    for seed, (g_single, g_mixup) in enumerate([(4.0, 2.0), (6.0, 3.0)]):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        (d / "gradnorm.json").write_text(json.dumps({
            "single": {"mean_grad_norm": g_single, "median_grad_norm": 1.0, "steps": 8},
            "mixup": {"mean_grad_norm": g_mixup, "median_grad_norm": 1.0, "steps": 8}}))
    (tmp_path / "s1" / "generalization_gap.json").write_text(json.dumps(
        {"mixup": {"loss_calib": 10.0, "loss_heldout_real": 12.5, "gap": 2.5}}))
    table = analysis_table([tmp_path / "s0", tmp_path / "s1"]).splitlines()
    assert table[0].startswith("| calibration | mean grad norm | median grad norm | recon. loss calib")
    assert "tsne" not in table[0] and "centroid" not in table[0]  # no folder ran t-SNE
    single = next(line for line in table if line.startswith("| single |")).strip("| ").split(" | ")
    mixup = next(line for line in table if line.startswith("| mixup |")).strip("| ").split(" | ")
    assert single[1] == "5 ± 1.4 (2)" and mixup[1] == "2.5 ± 0.71 (2)"
    assert mixup[5] == "2.5" and single[5] == "–"  # gap: one folder has it, for mixup only
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")  # other JSON is not a study: dfq report skips the folder
    assert has_results(tmp_path / "s1") and not has_results(tmp_path / "empty")
    with pytest.raises(DfqError, match="no dfq analyze results"):
        analysis_table([tmp_path / "empty"])
