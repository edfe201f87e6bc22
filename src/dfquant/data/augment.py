"""Pixel-level Mixup and CutMix of a calibration set: the baselines the mixup-class paper compares its
prompt-level fusion against (arXiv 2507.21947, Table "prompt vs pixel mixing").

Both pair every image ``i`` with a partner ``j`` and a mixing weight ``lambda ~ Beta(alpha, alpha)``; the pair
and the weight depend only on ``(seed, i)``, so an augmented set is reproducible image by image, whatever the
batch size or order in which it is built, and a resumed run gets the same images.

* ``mixup``: ``lambda * x_i + (1 - lambda) * x_j`` (Zhang et al., 2018);
* ``cutmix``: a box of area ``(1 - lambda)`` of the image (same aspect ratio as the image) is copied from
  ``x_j`` into ``x_i`` at the same place (Yun et al., 2019). Its centre is uniform, then shifted so the whole
  box lies inside the image: the pasted area is exactly ``1 - lambda``, which CutMix's clipping would shrink.

The images are mixed in the model's normalised input space; normalisation is affine per channel, so Mixup
there equals Mixup of the pixels followed by normalisation, and CutMix copies pixels either way.
"""

from __future__ import annotations

import math

import torch

from dfquant.errors import DfqError

METHODS = ("mixup", "cutmix")
AUGMENTS = ("none", *METHODS)  # the values of --augment / the run config's ``augment``


def _draw(seed: int, index: int, n: int, alpha: float) -> tuple[int, float, float, float]:
    """Partner (never ``index`` itself when ``n > 1``), lambda, and the box centre (fractions) for image ``index``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    partner = index if n == 1 else (index + 1 + int(torch.randint(0, n - 1, (1,), generator=g))) % n
    lam = _beta(g, alpha)
    cy, cx = torch.rand(2, generator=g).tolist()
    return partner, lam, cy, cx


def _beta(g: torch.Generator, alpha: float) -> float:
    """Beta(alpha, alpha) from two Gamma(alpha) draws of generator ``g`` (torch's Beta has no generator argument)."""
    a, b = torch._standard_gamma(torch.full((2,), float(alpha)), generator=g).tolist()
    return a / (a + b) if a + b > 0 else 0.5


def augment(images: torch.Tensor, method: str, alpha: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Mix every image of ``images`` (N, C, H, W) with a partner from the same set; returns a new tensor."""
    if method not in METHODS:
        raise DfqError(f"unknown augmentation {method!r}; use one of {', '.join(METHODS)}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise DfqError(f"--augment-alpha must be a positive number (Beta(alpha, alpha)), got {alpha}")
    n, _, h, w = images.shape
    out = images.clone()
    for i in range(n):
        j, lam, cy, cx = _draw(seed, i, n, alpha)
        if method == "mixup":
            out[i] = lam * images[i] + (1 - lam) * images[j]
            continue
        cut = math.sqrt(1 - lam)  # side fraction of a box with area 1 - lambda
        bh, bw = round(h * cut), round(w * cut)
        y0, x0 = min(max(round(cy * h - bh / 2), 0), h - bh), min(max(round(cx * w - bw / 2), 0), w - bw)
        out[i, :, y0:y0 + bh, x0:x0 + bw] = images[j, :, y0:y0 + bh, x0:x0 + bw]
    return out


def save_grid(before: torch.Tensor, after: torch.Tensor, path, mean, std, count: int = 16) -> None:
    """A PNG of the first ``count`` images (top row) above their augmented versions (bottom row), in pixel space."""
    from torchvision.utils import make_grid

    from dfquant.io import atomic_path

    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    k = min(count, len(before))
    pixels = torch.cat([before[:k], after[:k]]) * s + m
    grid = make_grid(pixels.clamp(0, 1), nrow=k, padding=2, pad_value=1.0)
    from PIL import Image

    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    if img.width < 512:  # tiny images: enlarge so the boxes and blends can be seen
        img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
