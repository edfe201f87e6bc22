"""Analyses from the mixup-class prompting paper, each writing numbers (JSON) and a PNG.

* :func:`gradnorm_study` — gradient norm of the quantization parameters during block
  reconstruction, per calibration set (lower = flatter = better generalization);
* :func:`generalization_gap` — reconstruction loss on the calibration set vs on held-out
  real images, summed over blocks, for a quantized model;
* :func:`tsne_study` — t-SNE of penultimate features of real test images and each
  synthetic set, plus the per-class distance of synthetic to real feature centroids.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dfquant.analysis.features import penultimate  # noqa: E402
from dfquant.io import atomic_path, write_json  # noqa: E402


def _savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def gradnorm_study(model, calib_sets: dict[str, torch.Tensor], out: Path, wbits: float = 2, abits: float = 4,
                   iters: int = 200, algo: str = "genie-m", seed: int = 0) -> dict:
    """Reconstruct ``model`` once per calibration set, recording the quantization-parameter gradient norm."""
    from dfquant.quant.api import quantize

    result = {}
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, calib in calib_sets.items():
        trace: list = []
        quantize(model, calib, algo, wbits, abits, iters=iters, seed=seed, trace=trace, progress=False)
        g = np.array([t["grad_norm"] for t in trace])
        result[label] = {"mean_grad_norm": float(g.mean()), "median_grad_norm": float(np.median(g)), "steps": len(g)}
        w = max(1, len(g) // 100)
        ax.plot(np.convolve(g, np.ones(w) / w, mode="valid"), label=f"{label} (mean {g.mean():.3g})", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("reconstruction step (all blocks in order)")
    ax.set_ylabel("grad norm of quantization params")
    ax.set_title(f"Gradient norm during {algo} W{wbits:g}A{abits:g} calibration")
    ax.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    _savefig(fig, out / "gradnorm.png")
    write_json(out / "gradnorm.json", result)
    return result


@torch.no_grad()
def block_losses(qmodel, images: torch.Tensor, batch_size: int = 128) -> float:
    """Sum over reconstruction units of the per-sample squared error vs the FP copy, on ``images``."""
    import copy

    from dfquant.quant.cache import capture
    from dfquant.quant.modules import set_quant_state
    from dfquant.quant.transform import recon_units

    fp = copy.deepcopy(qmodel)
    set_quant_state(fp, False, False)
    total = 0.0
    for name in recon_units(qmodel):
        x_q, _ = capture(qmodel, qmodel.get_submodule(name), images, batch_size, outputs=False)
        _, y = capture(fp, fp.get_submodule(name), images, batch_size, outputs=True)
        out = torch.cat([qmodel.get_submodule(name)(x_q[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        total += (out - y[:]).pow(2).flatten(1).sum(1).mean().item()
    return total


def generalization_gap(qmodel, calib: torch.Tensor, heldout: torch.Tensor) -> dict:
    on_calib, on_real = block_losses(qmodel, calib), block_losses(qmodel, heldout)
    return {"loss_calib": on_calib, "loss_heldout_real": on_real, "gap": on_real - on_calib}


def tsne_study(model, real: torch.Tensor, real_labels: torch.Tensor, synthetic: dict[str, tuple[torch.Tensor, list[list[int]]]],
               class_names: list[str], out: Path, seed: int = 0, per_set: int = 500) -> dict:
    """t-SNE of penultimate features; per-class centroid distance of each synthetic set to real data."""
    from sklearn.manifold import TSNE

    rng = np.random.Generator(np.random.PCG64(seed))
    ridx = rng.choice(len(real), size=min(per_set, len(real)), replace=False)
    f_real = penultimate(model, real[ridx]).numpy()
    y_real = real_labels[ridx].numpy()
    test_label = "test set (real)"
    blocks, owners = [f_real], [test_label] * len(f_real)
    stats: dict = {}
    centroids = {c: f_real[y_real == c].mean(0) for c in range(len(class_names))}
    scale = float(np.linalg.norm(f_real - f_real.mean(0), axis=1).mean())
    for label, (imgs, classes) in synthetic.items():
        sidx = rng.choice(len(imgs), size=min(per_set, len(imgs)), replace=False)
        f = penultimate(model, imgs[sidx]).numpy()
        blocks.append(f)
        owners += [label] * len(f)
        dists = {}
        for c in range(len(class_names)):
            mask = np.array([c in classes[i] for i in sidx])
            if mask.any():
                dists[class_names[c]] = float(np.linalg.norm(f[mask].mean(0) - centroids[c]) / scale)
        stats[label] = {"mean_class_centroid_distance": float(np.mean(list(dists.values()))), "per_class": dists}
    emb = TSNE(n_components=2, random_state=seed, init="pca", perplexity=30).fit_transform(np.concatenate(blocks))
    fig, ax = plt.subplots(figsize=(7, 6))
    owners_arr = np.array(owners)
    for i, label in enumerate([test_label, *synthetic]):
        m = owners_arr == label
        ax.scatter(emb[m, 0], emb[m, 1], s=4, alpha=0.6, label=label, c=f"C{i}")
    ax.legend(markerscale=4, fontsize=8)
    ax.set_title("t-SNE of penultimate features: real test images vs synthetic sets")
    ax.set_xticks([]); ax.set_yticks([])
    out.mkdir(parents=True, exist_ok=True)
    _savefig(fig, out / "tsne.png")
    write_json(out / "tsne.json", stats)
    return stats
