"""BN-statistics inversion: calibration images with no data, from a model's BatchNorm statistics.

Three methods (``METHODS``):

* ``"genie"``: Genie-D, as SamsungLabs/Genie's ``distill.py`` computes it. A small generator
  (``GenieGenerator``: linear -> BN -> 2x upsample -> conv -> BN -> LeakyReLU -> 2x upsample -> conv -> Tanh ->
  affine-free BN) maps per-image latents to images; Adam at lr 0.1 on the latents (ReduceLROnPlateau, patience 100,
  min_lr 1e-4) and 0.01 on the generator (ExponentialLR 0.95 every 100 steps), 4000 steps per batch of 128. The
  loss sums, over every BatchNorm2d input, ``||running_mean - mean||^2 / C + ||sqrt(running_var + 1e-6) - std||^2 / C``
  (``mean``/``std`` of the batch over N, H, W; unbiased std) and, for the images themselves, each image's
  per-channel mean and std (over H, W) against 0 and 1 (squared norm / batch size). During distillation every strided
  Conv2d reads its input reflect-padded by 1 and cropped at a random offset of 0..2 ("swing"); this is done with
  temporary forward pre-hooks, removed afterwards. The images returned for a batch are the generator's output of the
  last step, as in the reference.
* ``"zeroq"``: ZeroQ, as amirgholami/ZeroQ's ``getDistilData`` computes it. The pixels of a batch of 32 are the
  parameters, initialized like its ``UniformDataset`` (integers 0..254, minus 127.5, divided by 5418.75), Adam at
  lr 0.5 with ReduceLROnPlateau (patience 100, min_lr 1e-4), 500 steps. Its loss uses *per-image* statistics: for
  every BN input, the per-image, per-channel mean and ``sqrt(var + 1e-6)`` (unbiased var over H, W) against the running
  mean and ``sqrt(running_var + 1e-6)``, squared norm / batch size, plus the same for the input pixels against 0 and 1.
  This is the repository's ``classification/`` version (the one its ``uniform_test.py`` runs, batch size 32); its
  older top-level ``distill_data.py`` used lr 0.1, an input term divided by 1 instead of the batch size, and an early
  stop at a loss of 5 x (BN layers + 1). dfquant's former "zeroq" (batch statistics, biased variance, no input term,
  normal init, plateau factor 0.5 / patience 50) is gone.
* ``"genie-lite"``: dfquant's former "genie", maths unchanged (a 64-channel generator from a 4x4 map, batch
  statistics with biased variance and no per-layer normalization, wrap-around roll of the image as swing, 500 steps);
  it measured as well as the faithful Genie-D on a real ResNet-20 at 8x fewer steps. Only its generator's initial
  weights are now drawn from the seed (they came from the global RNG), so a seed fixes the result.

Where this differs from the references: a last batch smaller than the batch size is made (the references make
``n // batch_size`` full batches); BN statistics are read at each BatchNorm2d's input (ZeroQ reads the outputs of the
first convolutions, which is the same tensor when each BN follows its conv); the images have the model's channel count
(the references assume 3) and Genie's generator is built for the model's input size (the reference always builds it
for 224 px; a side that is not a multiple of 4 is centre-cropped from the next multiple); the model is not deep-copied
(hooks instead of module replacement) and is handed back as it came (mode, ``requires_grad``, device); random numbers
come from per-batch generators seeded by ``seed`` instead of the global RNGs.

Speed (same maths, other float rounding; benchmarks/distill_speed.md): the statistics are taken in two passes
(mean, then squared deviations; faster forward + backward than ``torch.std_mean`` / ``var_mean`` on CPU); every
nearest 2x upsampling + 3x3 convolution pair of the generators runs as one transposed convolution
(``upsample_conv``); the model runs in channels-last layout (``CHANNELS_LAST_MODEL``); the hooks are registered once
per call, the BN targets concatenated once, and the loss of all layers is a few ops on the concatenated statistics;
the only per-step host sync is the ``.item()`` the plateau scheduler needs. Rounding differences grow over Adam's
steps, so results match a plain implementation closely for a few steps, not bit for bit over thousands
(``FUSE_UPSAMPLE_CONV = CHANNELS_LAST_MODEL = False`` gives genie-lite's former ops exactly).

Models without BatchNorm (ViTs) have no statistics to invert: that is an error, not a silent fallback.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfquant.errors import DfqError

# Genie-D (SamsungLabs/Genie distill.py)
GENIE_ITERS = 4000
GENIE_BATCH = 128
GENIE_LATENT = 256
GENIE_C1, GENIE_C2 = 128, 64
GENIE_LR_Z = 0.1       # the latents (the reference's ``lr_g`` argument, passed to the latents' optimizer)
GENIE_LR_G = 0.01      # the generator (the reference's ``lr_z``)
GENIE_G_GAMMA = 0.95   # ExponentialLR on the generator's optimizer ...
GENIE_G_EVERY = 100    # ... stepped every this many steps
GENIE_SWING = 1        # reflect padding of a strided conv's input; crop offset 0..2*GENIE_SWING
# ZeroQ (amirgholami/ZeroQ distill_data.py, uniform_test.py)
ZEROQ_ITERS = 500
ZEROQ_BATCH = 32
ZEROQ_LR = 0.5
# both references
EPS = 1e-6
PLATEAU_PATIENCE = 100
PLATEAU_MIN_LR = 1e-4
# genie-lite (dfquant's former "genie")
LITE_ITERS = 500
LITE_BATCH = 128
LITE_LR_G, LITE_LR_Z = 0.1, 0.01
LITE_CHANNELS = 64

# Memory layout, measured on the development CPU (benchmarks/distill_speed.md): channels-last weights and activations
# make the model's forward + backward a little faster (a few % to 20 %, most for zeroq); for the generators, once
# their upsampling + convolution pairs are fused, it measured within the noise either way (+-10 %), so they stay NCHW.
CHANNELS_LAST_MODEL = True


@dataclass(frozen=True)
class Method:
    """One distillation method: what it is and its reference defaults (``iters`` steps per batch of ``batch_size``)."""

    description: str
    iters: int
    batch_size: int
    lr: str  # the learning rate(s) and what ``lr=`` overrides


METHODS: dict[str, Method] = {
    "genie": Method("Genie-D: a generator and per-image latents, swing on strided convs (SamsungLabs/Genie)",
                    GENIE_ITERS, GENIE_BATCH, f"latents {GENIE_LR_Z}, generator {GENIE_LR_G} (lr= sets the latents', "
                    "the generator's is lr/10)"),
    "zeroq": Method("ZeroQ: the pixels themselves, per-image BN statistics (amirgholami/ZeroQ)",
                    ZEROQ_ITERS, ZEROQ_BATCH, f"pixels {ZEROQ_LR} (lr= sets it)"),
    "genie-lite": Method("dfquant's lighter generator (64 channels from 4x4, batch statistics, roll swing)",
                         LITE_ITERS, LITE_BATCH, f"generator {LITE_LR_G}, latents {LITE_LR_Z} (lr= sets both)"),
}


# ----------------------------------------------------------------------------------------------------------- models

# Nearest 2x upsampling followed by a 3x3 convolution (stride 1, zero padding 1) is one transposed convolution
# (stride 2, padding 1) with a 4x4 kernel: along each axis, output 2p reads x[p-1] * w[-1] + x[p] * (w[0] + w[1]) and
# output 2p+1 reads x[p] * (w[-1] + w[0]) + x[p+1] * w[1], i.e. the 1-D kernel (w[1], w[0]+w[1], w[-1]+w[0], w[-1]).
# Same function and gradients (up to float rounding), 16 instead of 36 multiply-adds per low-resolution pixel and no
# upsampled copy: forward + backward 2-10x faster on CPU (benchmarks/distill_speed.md, design measurements).
_UP2 = torch.tensor([[0.0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
FUSE_UPSAMPLE_CONV = True


def _fusable(up: nn.Module, conv: nn.Module) -> bool:
    return (isinstance(up, nn.Upsample) and up.mode == "nearest" and up.size is None
            and up.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)) and type(conv) is nn.Conv2d
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


_UP2_ON: dict = {}


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` as one transposed convolution."""
    key = (conv.weight.device, conv.weight.dtype)
    k = _UP2_ON.get(key)
    if k is None:
        k = _UP2_ON[key] = _UP2.to(device=key[0], dtype=key[1])
    w = torch.einsum("pk,ql,oikl->iopq", k, k, conv.weight)
    return F.conv_transpose2d(x, w, conv.bias, stride=2, padding=1)


def _run(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)``, with each (nearest 2x Upsample, 3x3 Conv2d) pair computed by ``upsample_conv``."""
    mods, i = list(seq), 0
    while i < len(mods):
        if FUSE_UPSAMPLE_CONV and i + 1 < len(mods) and _fusable(mods[i], mods[i + 1]):
            x = upsample_conv(x, mods[i + 1])
            i += 2
        else:
            x = mods[i](x)
            i += 1
    return x


class GenieGenerator(nn.Module):
    """Genie-D's generator: latent -> ``c1`` x H/4 x W/4 -> BN -> up -> conv -> BN -> LeakyReLU -> up -> conv -> Tanh
    -> affine-free BN."""

    def __init__(self, image_size: int | tuple[int, int] = 224, latent_dim: int = GENIE_LATENT, c1: int = GENIE_C1,
                 c2: int = GENIE_C2, channels: int = 3):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.size = (h, w)
        self.init_size = (-(-h // 4), -(-w // 4))
        self.c1 = c1
        self.linear = nn.Linear(latent_dim, c1 * self.init_size[0] * self.init_size[1])
        self.conv_layers = nn.Sequential(
            nn.BatchNorm2d(c1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, stride=1, padding=1),
            nn.BatchNorm2d(c2),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c2, channels, 3, stride=1, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = _run(self.conv_layers, self.linear(z).view(len(z), self.c1, *self.init_size))
        (h, w), (hh, ww) = self.size, x.shape[-2:]
        if (hh, ww) != (h, w):
            x = x[:, :, (hh - h) // 2:(hh - h) // 2 + h, (ww - w) // 2:(ww - w) // 2 + w]
        return x


class _LiteGenerator(nn.Module):
    """genie-lite's generator: latent -> 4x4 feature map -> upsampling convs -> image."""

    def __init__(self, latent_dim: int, size: int, channels: int = LITE_CHANNELS, out_channels: int = 3):
        super().__init__()
        self.fc = nn.Linear(latent_dim, channels * 16)
        ups = []
        s = 4
        while s < size:
            ups += [nn.Upsample(scale_factor=2), nn.Conv2d(channels, channels, 3, padding=1),
                    nn.BatchNorm2d(channels), nn.LeakyReLU(0.2)]
            s *= 2
        self.body = nn.Sequential(nn.BatchNorm2d(channels), *ups, nn.Conv2d(channels, out_channels, 3, padding=1),
                                  nn.BatchNorm2d(out_channels, affine=False))
        self.size = size
        self.channels = channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), self.channels, 4, 4)
        x = _run(self.body, x)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False) if x.shape[-1] != self.size else x


def _seeded(seed: int, build):
    """``build()`` with the global CPU RNG seeded by ``seed`` (for nn default inits), leaving the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ------------------------------------------------------------------------------------------------- optimizers

def genie_optimizers(z: torch.Tensor, generator: nn.Module, lr_z: float = GENIE_LR_Z, lr_g: float = GENIE_LR_G):
    """Genie-D's optimizers: ``(opt_z, sched_z, opt_g, sched_g)``. ``sched_z`` is stepped with the loss every step,
    ``sched_g`` every ``GENIE_G_EVERY`` steps."""
    opt_z = torch.optim.Adam([z], lr=lr_z)
    sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, min_lr=PLATEAU_MIN_LR, patience=PLATEAU_PATIENCE)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=GENIE_G_GAMMA)
    return opt_z, sched_z, opt_g, sched_g


def zeroq_optimizer(x: torch.Tensor, lr: float = ZEROQ_LR):
    """ZeroQ's optimizer on the pixels and its plateau scheduler (stepped with the loss every step)."""
    opt = torch.optim.Adam([x], lr=lr)
    return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=PLATEAU_MIN_LR, patience=PLATEAU_PATIENCE)


# ------------------------------------------------------------------------------------------------- BN statistics

def _bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    if not bns:
        raise DfqError("the model has no BatchNorm layers, so BN-statistics inversion (distill) cannot run; "
                       "calibrate on generated or real images instead")
    return bns


def _mean_var(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over ``dims`` (what ``torch.std_mean`` / ``torch.var_mean`` give), in two passes:
    forward + backward measured 2-3x faster than those fused Welford kernels on CPU, and as accurate (the squared
    deviations are taken from the mean, not from a running sum of squares)."""
    mu = x.mean(dims, keepdim=True)
    m = x.numel() // mu.numel()
    # the variance's gradient through mu is -2 * sum(x - mu) / (m - 1) = 0 exactly: skip that path
    v = (x - mu.detach()).square().sum(dims) / (m - 1)
    return mu.flatten(1) if len(dims) == 2 else mu.flatten(), v


class _BNTap:
    """Forward pre-hooks on every BatchNorm2d, registered once per ``distill`` call: each forward records the mean and
    spread of every BN input; ``loss()`` then scores them all at once against the running statistics.

    ``kind``: ``"genie"`` (batch mean / unbiased std over N, H, W), ``"zeroq"`` (per-image mean / sqrt(unbiased var +
    eps) over H, W) or ``"genie-lite"`` (batch mean / sqrt of the biased variance)."""

    def __init__(self, model: nn.Module, kind: str):
        self.kind = kind
        self.bns = _bn_layers(model)
        self.means: list[torch.Tensor] = []
        self.spreads: list[torch.Tensor] = []
        self.order: list[int] = []
        self._targets: tuple | None = None
        self.handles = [bn.register_forward_pre_hook(partial(self._hook, i)) for i, bn in enumerate(self.bns)]

    def _hook(self, i: int, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if self.kind == "genie":
            mu, v = _mean_var(x, (0, 2, 3))
            s = v.sqrt()
        elif self.kind == "zeroq":
            mu, v = _mean_var(x, (2, 3))
            s = (v + EPS).sqrt()
        else:  # genie-lite: dfquant's former ops, one term per layer
            mu = x.mean((0, 2, 3))
            s = x.var((0, 2, 3), unbiased=False).sqrt()
        self.means.append(mu)
        self.spreads.append(s)
        self.order.append(i)

    def clear(self) -> None:
        self.means.clear()
        self.spreads.clear()
        self.order.clear()

    def _target(self) -> tuple:
        key = tuple(self.order)
        if self._targets is None or self._targets[0] != key:
            bns = [self.bns[i] for i in key]
            rm = torch.cat([b.running_mean.detach().float() for b in bns])
            rv = torch.cat([b.running_var.detach().float() for b in bns])
            rs = (rv + EPS).sqrt()
            w = torch.cat([torch.full((b.num_features,), 1.0 / b.num_features, device=rm.device) for b in bns])
            self._targets = (key, rm, rs, w)
        return self._targets[1:]

    def loss(self) -> torch.Tensor:
        if not self.order:
            raise DfqError("the model's forward did not run any of its BatchNorm layers, so there are no statistics "
                           "to invert")
        if self.kind == "genie-lite":
            return self._lite_loss()
        rm, rs, w = self._target()
        dim = 1 if self.kind == "zeroq" else 0
        mu, s = torch.cat(self.means, dim), torch.cat(self.spreads, dim)
        if self.kind == "genie":  # sum over layers of ||.||^2 / C
            return (((mu - rm).square() + (s - rs).square()) * w).sum()
        return ((mu - rm).square() + (s - rs).square()).sum() / mu.shape[0]  # zeroq: per-image, sum / N

    def _lite_loss(self) -> torch.Tensor:  # dfquant's former loss, op for op
        return torch.stack([(mu - self.bns[i].running_mean).pow(2).sum() + (s - self.bns[i].running_var.sqrt()).pow(2).sum()
                            for i, mu, s in zip(self.order, self.means, self.spreads)]).sum()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _image_term(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The references' input term: each image's per-channel mean and std (over H, W) against 0 and 1, / batch size."""
    mu, v = _mean_var(x, (2, 3))
    s = v.sqrt() if kind == "genie" else (v + EPS).sqrt()
    return (mu.square().sum() + (s - 1).square().sum()) / x.shape[0]


class _Swing:
    """Genie-D's SwingConv2d as temporary forward pre-hooks on every strided Conv2d: the input is reflect-padded by
    ``GENIE_SWING`` and cropped back to its size at a random offset. Offsets come from ``self.rng`` (set per batch)."""

    def __init__(self, model: nn.Module):
        self.rng = random.Random(0)
        self.convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1)]
        self.handles = [c.register_forward_pre_hook(self._hook) for c in self.convs]

    def _hook(self, module: nn.Module, args: tuple):
        x = args[0]
        h, w = x.shape[-2:]
        j = GENIE_SWING
        if h <= j or w <= j:  # too small to reflect
            return None
        oy, ox = self.rng.randrange(2 * j + 1), self.rng.randrange(2 * j + 1)
        x = F.pad(x, (j, j, j, j), mode="reflect")[:, :, oy:oy + h, ox:ox + w]
        return (x, *args[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def distill_loss(model: nn.Module, images: torch.Tensor, method: str = "genie") -> torch.Tensor:
    """The method's loss for ``images`` through ``model`` as it stands (eval mode, no swing): the quantity ``distill``
    minimizes (for genie before the random swing). For inspection and tests."""
    _check_method(method)
    tap = _BNTap(model, method)
    try:
        tap.clear()
        model(images)
        return _loss(tap, images)
    finally:
        tap.remove()


def _loss(tap: _BNTap, images: torch.Tensor) -> torch.Tensor:
    """The loss of the forward ``tap`` just recorded, ``images`` being what the generator / pixels gave."""
    loss = tap.loss()
    return loss if tap.kind == "genie-lite" else loss + _image_term(images, tap.kind)


# --------------------------------------------------------------------------------------------------- batches

def _to_model(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST_MODEL and x.dim() == 4 else x


def _channels_last(model: nn.Module):
    """Switch the model's 4-D parameters and buffers to channels-last in place; return a function that puts back
    the layout of each one that changed."""
    changed = []
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
            changed.append((t, t.data))
            t.data = t.data.contiguous(memory_format=torch.channels_last)

    def restore() -> None:  # the original tensors (the values do not change during distill)
        for t, old in changed:
            t.data = old

    return restore


def _bar(iters: int, desc: str, progress: bool):
    return tqdm(range(iters), desc=desc, leave=False, disable=not progress, mininterval=1.0)


def _genie_batch(model, tap, swing, bs, input_size, iters, lr, bseed, device, desc, progress):
    c, h, w = input_size
    g = torch.Generator().manual_seed(bseed)
    gen = _seeded(bseed, lambda: GenieGenerator((h, w), channels=c)).to(device).train()
    z = torch.randn(bs, GENIE_LATENT, generator=g).to(device).requires_grad_(True)
    lr_z = GENIE_LR_Z if lr is None else lr
    opt_z, sched_z, opt_g, sched_g = genie_optimizers(z, gen, lr_z, lr_z * GENIE_LR_G / GENIE_LR_Z)
    swing.rng.seed(bseed)
    bar = _bar(iters, desc, progress)
    for it in bar:
        x = gen(z)
        tap.clear()
        model(_to_model(x))
        loss = _loss(tap, x)
        opt_z.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_z.step()
        opt_g.step()
        value = loss.item()  # the plateau scheduler needs the number
        sched_z.step(value)
        if (it + 1) % GENIE_G_EVERY == 0:
            sched_g.step()
        if progress and it % 50 == 0:
            bar.set_postfix(bn_loss=f"{value:.4f}", refresh=False)
    return x.detach()  # the last step's images, as the reference keeps them


def _plateau_step(model, tap, images, opt, sched, bar=None) -> None:
    """One inversion step of ``images`` (through ``tap``'s BN statistics) with a plateau scheduler on the loss;
    ``bar``: the progress bar to show the loss on."""
    tap.clear()
    model(_to_model(images))
    loss = _loss(tap, images)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    value = loss.item()
    sched.step(value)
    if bar is not None:
        bar.set_postfix(bn_loss=f"{value:.4f}", refresh=False)


def _zeroq_batch(model, tap, bs, input_size, iters, lr, bseed, device, desc, progress):
    g = torch.Generator().manual_seed(bseed)
    x = ((torch.randint(0, 255, (bs, *input_size), generator=g).float() - 127.5) / 5418.75).to(device)
    x.requires_grad_(True)
    opt, sched = zeroq_optimizer(x, ZEROQ_LR if lr is None else lr)
    bar = _bar(iters, desc, progress)
    for it in bar:
        _plateau_step(model, tap, x, opt, sched, bar if progress and it % 50 == 0 else None)
    return x.detach()


def _lite_batch(model, tap, bs, input_size, iters, lr, bseed, device, desc, progress):
    g = torch.Generator().manual_seed(bseed)
    gen = _seeded(bseed, lambda: _LiteGenerator(256, input_size[-1], out_channels=input_size[0])).to(device)
    z = torch.randn(bs, 256, generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([{"params": gen.parameters(), "lr": lr or LITE_LR_G}, {"params": [z], "lr": lr or LITE_LR_Z}])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=50)
    m = max(1, input_size[-1] // 16)
    bar = _bar(iters, desc, progress)
    for it in bar:
        img = gen(z)
        dx, dy = torch.randint(-m, m + 1, (2,), generator=g).tolist()  # swing: wrap-around shift by up to side/16
        img = torch.roll(img, shifts=(dy, dx), dims=(2, 3))
        _plateau_step(model, tap, img, opt, sched, bar if progress and it % 50 == 0 else None)
    with torch.no_grad():
        return gen(z).detach()


# ------------------------------------------------------------------------------------------------------ resume

def _fingerprint(model: nn.Module) -> str:
    """A short hash of the model's BN running statistics (what the images are inverted from)."""
    h = hashlib.sha1()
    for bn in _bn_layers(model):
        for t in (bn.running_mean, bn.running_var):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_resume(resume: Path, key: dict) -> list[torch.Tensor]:
    from dfquant.io import load_torch

    if not resume.exists():
        return []
    state = load_torch(resume, fix="delete it to start the distillation over")
    if not isinstance(state, dict) or state.get("kind") != "dfquant.distill" or not isinstance(state.get("key"), dict):
        raise DfqError(f"{resume} is not a distill resume file; delete it or pass another resume path")
    old = state["key"]
    diff = [f"{k}={old.get(k)!r} there, {k}={v!r} now" for k, v in key.items() if old.get(k) != v]
    if diff:
        raise DfqError(f"{resume} holds batches of a distill run with other arguments ({'; '.join(diff)}); "
                       "pass the same arguments to continue it, or delete it to start over")
    return list(state["batches"])


def _save_resume(resume: Path, key: dict, batches: list[torch.Tensor]) -> None:
    from dfquant.io import atomic_path

    with atomic_path(resume) as tmp:
        torch.save({"kind": "dfquant.distill", "key": key, "batches": batches}, tmp)


# --------------------------------------------------------------------------------------------------------- API

def _check_method(method: str) -> None:
    if method not in METHODS:
        raise DfqError(f"method={method!r} is not a distill method; use one of {', '.join(METHODS)}")


def _check_args(n, input_size, method, iters, batch_size, lr) -> tuple[int, int, int]:
    _check_method(method)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DfqError(f"n={n!r} must be a positive number of images")
    for name, v in (("iters", iters), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DfqError(f"{name}={v!r} must be a positive integer (or None for the method's default)")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise DfqError(f"lr={lr!r} must be a positive learning rate (or None for the method's)")
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise DfqError(f"input_size={input_size!r} must be (channels, height, width)")
    if method == "genie" and min(size[1:]) < 4:
        raise DfqError(f"input_size={input_size!r}: genie's generator needs a side of at least 4 pixels")
    return size


def distill(model: nn.Module, n: int, input_size: tuple[int, int, int], method: str = "genie", iters: int | None = None,
            batch_size: int | None = None, lr: float | None = None, seed: int = 0, device: str = "cpu",
            progress: bool = True, resume: Path | None = None) -> torch.Tensor:
    """Return ``n`` images (in the model's normalized input space, on the CPU) matching its BN statistics.

    ``iters`` / ``batch_size`` / ``lr``: None takes the method's reference value (``METHODS[method]``). ``resume``: a
    file that keeps the finished batches (written atomically after each); a re-run with the same arguments continues
    after the last one, other arguments are an error. The same arguments and ``seed`` give the same images.
    The model is returned in the mode, device and ``requires_grad`` state it came in, with no hooks left.
    """
    spec = METHODS.get(method)
    _check_method(method)
    iters = spec.iters if iters is None else iters
    batch_size = spec.batch_size if batch_size is None else batch_size
    input_size = _check_args(n, input_size, method, iters, batch_size, lr)
    resume = Path(resume) if resume is not None else None

    first = next(iter(model.parameters()), None)
    home = first.device if first is not None else None
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    key = None
    if resume is not None:
        key = {"method": method, "n": n, "input_size": list(input_size), "iters": iters, "batch_size": batch_size,
               "lr": lr, "seed": seed, "model": _fingerprint(model)}
    batches = _load_resume(resume, key) if resume is not None else []
    n_batches = -(-n // batch_size)
    if len(batches) >= n_batches:
        return torch.cat(batches)[:n]

    tap = swing = restore_layout = None
    try:
        model.to(device).eval()
        restore_layout = _channels_last(model) if CHANNELS_LAST_MODEL else None
        for p in model.parameters():
            p.requires_grad_(False)
        tap = _BNTap(model, method)
        swing = _Swing(model) if method == "genie" else None
        for bi in range(len(batches), n_batches):
            b0 = bi * batch_size
            bs = min(batch_size, n - b0)
            bseed = seed * 100003 + b0
            desc = f"distill {method} {bi + 1}/{n_batches}"
            if method == "genie":
                out = _genie_batch(model, tap, swing, bs, input_size, iters, lr, bseed, device, desc, progress)
            elif method == "zeroq":
                out = _zeroq_batch(model, tap, bs, input_size, iters, lr, bseed, device, desc, progress)
            else:
                out = _lite_batch(model, tap, bs, input_size, iters, lr, bseed, device, desc, progress)
            batches.append(out.cpu().contiguous())
            if resume is not None:
                _save_resume(resume, key, batches)
    finally:
        for hooks in (tap, swing):
            if hooks is not None:
                hooks.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)
        if restore_layout is not None:
            restore_layout()
        if home is not None:
            model.to(home)
    return torch.cat(batches)
