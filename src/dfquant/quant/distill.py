"""BN-statistics inversion: calibration images with no generator and no data.

ZeroQ (Cai et al. 2020) optimizes the pixels of a random batch so that the statistics of
every BatchNorm input match the layer's running mean/variance. Genie-D (Jeon et al. 2023)
instead learns a small convolutional generator and per-image latent codes, with a random
"swing" shift of the images each step. Both are offered (``method='zeroq'|'genie'``).
Models without BatchNorm (ViTs) have no statistics to invert: that is an error, not a
silent fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfquant.errors import DfqError


class _Generator(nn.Module):
    """Genie-D style generator: latent -> 4x4 feature map -> upsampling convs -> image."""

    def __init__(self, latent_dim: int, size: int, channels: int = 64):
        super().__init__()
        self.init = 4
        self.fc = nn.Linear(latent_dim, channels * 16)
        ups = []
        s = 4
        while s < size:
            ups += [nn.Upsample(scale_factor=2), nn.Conv2d(channels, channels, 3, padding=1),
                    nn.BatchNorm2d(channels), nn.LeakyReLU(0.2)]
            s *= 2
        self.body = nn.Sequential(nn.BatchNorm2d(channels), *ups, nn.Conv2d(channels, 3, 3, padding=1), nn.BatchNorm2d(3, affine=False))
        self.size = size
        self.channels = channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), self.channels, 4, 4)
        x = self.body(x)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False) if x.shape[-1] != self.size else x


def _bn_hooks(model: nn.Module, losses: list):
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise DfqError("the model has no BatchNorm layers, so BN-statistics inversion (distill) cannot run; "
                       "use generated images (dfq generate) or real images for calibration")

    def hook(m, args):
        x = args[0]
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3), unbiased=False)
        losses.append((mean - m.running_mean).pow(2).sum() + (var.sqrt() - m.running_var.sqrt()).pow(2).sum())

    return [b.register_forward_pre_hook(hook) for b in bns]


def distill(model: nn.Module, n: int, input_size: tuple[int, int, int], method: str = "genie", iters: int = 500,
            batch_size: int = 128, lr: float | None = None, seed: int = 0, device: str = "cpu",
            progress: bool = True) -> torch.Tensor:
    """Return ``n`` images (in the model's normalized input space) matching its BN statistics."""
    if method not in ("zeroq", "genie"):
        raise DfqError(f"unknown distill method {method!r}; use zeroq or genie")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    losses: list = []
    handles = _bn_hooks(model, losses)
    out = []
    try:
        for b0 in range(0, n, batch_size):
            bs = min(batch_size, n - b0)
            g = torch.Generator().manual_seed(seed * 100003 + b0)
            if method == "genie":
                gen = _Generator(256, input_size[-1]).to(device)
                z = torch.randn(bs, 256, generator=g).to(device).requires_grad_(True)
                opt = torch.optim.Adam([{"params": gen.parameters(), "lr": lr or 0.1}, {"params": [z], "lr": lr or 0.01}])
                make = lambda: gen(z)  # noqa: E731
            else:
                x = torch.randn(bs, *input_size, generator=g).to(device).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr or 0.5)
                make = lambda: x  # noqa: E731
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=50)
            bar = tqdm(range(iters), desc=f"distill {method} {b0 // batch_size + 1}/{-(-n // batch_size)}",
                       leave=False, disable=not progress)
            for _ in bar:
                img = make()
                if method == "genie":  # swing: random shift by up to 1/16 of the side, wrap-around padding
                    m = max(1, input_size[-1] // 16)
                    dx, dy = torch.randint(-m, m + 1, (2,), generator=g).tolist()
                    img = torch.roll(img, shifts=(dy, dx), dims=(2, 3))
                losses.clear()
                model(img)
                loss = torch.stack(losses).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step(loss.item())
                bar.set_postfix(bn_loss=f"{loss.item():.4f}")
            with torch.no_grad():
                out.append(make().detach().cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)
