import json

import torch

from dfquant.analysis.studies import generalization_gap, gradnorm_study, tsne_study
from dfquant.data import fmnist


def test_analyses_write_numbers_and_pngs(resnet20, tmp_path):
    x, y = fmnist.load_split("A", limit=96, seed=3)
    real = resnet20.normalize(x)
    noise = torch.randn_like(real)
    res = gradnorm_study(resnet20.model, {"real": real[:64], "noise": noise[:64]}, tmp_path, iters=4)
    assert set(res) == {"real", "noise"} and all(r["steps"] == 4 * 11 and r["mean_grad_norm"] > 0 for r in res.values())
    assert (tmp_path / "gradnorm.png").stat().st_size > 1000

    from dfquant.quant.api import quantize

    q, _ = quantize(resnet20.model, real[:64], "mse", 4, 4, iters=0, progress=False)
    gap = generalization_gap(q, real[:64], real[64:])
    assert gap["loss_calib"] > 0 and gap["gap"] == gap["loss_heldout_real"] - gap["loss_calib"]

    xt, yt = fmnist.load_split("test", limit=200)
    stats = tsne_study(resnet20.model, resnet20.normalize(xt), yt,
                       {"real-A": (real, [[int(c)] for c in y]), "noise": (noise, [[int(c)] for c in y])},
                       list(fmnist.CLASS_NAMES), tmp_path, per_set=96)
    # real split-A images sit closer to the real test centroids than noise does
    assert stats["real-A"]["mean_class_centroid_distance"] < stats["noise"]["mean_class_centroid_distance"]
    assert json.loads((tmp_path / "tsne.json").read_text()) == stats and (tmp_path / "tsne.png").exists()
