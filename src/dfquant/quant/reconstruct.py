"""One block-reconstruction loop that BRECQ, AdaRound, QDrop and Genie-M configure.

For each unit (residual block, conv-norm-act stack, or single layer) in forward order:
  1. cache the unit's input in the partly quantized model (x_q), and its input and output
     in the full-precision model (x_fp, y_fp);
  2. initialize the unit's activation quantizers on x_q (range search);
  3. optimize ``||unit_q(x) - y_fp||^2`` per sample + the AdaRound rounding term, where
     ``x = x_q``, or with QDrop an element-wise random mix of x_q and x_fp and random
     drop of activation quantization inside the unit;
  4. harden the rounding and move on.
The algorithm presets differ only in what is learned and the mixing probability.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dfquant.errors import DfqError
from dfquant.quant.cache import DEFAULT_BUDGET_GB, capture, capture_all, io_bytes_per_image, plan_chunks
from dfquant.quant.modules import act_quantizers, quant_layers, set_quant_state, train_keep_bn
from dfquant.quant.transform import recon_units

ALGOS = ("minmax", "mse", "adaround", "brecq", "qdrop", "genie-m")


@dataclass
class ReconConfig:
    """What a reconstruction run learns, and how long."""

    algo: str = "genie-m"
    iters: int = 20000               # per unit (paper default; CPU runs use fewer, stated)
    batch_size: int = 32
    drop_prob: float = 0.0           # QDrop mixing probability
    learn_weight_scale: bool = False  # Genie-M: step size learned jointly with rounding
    learn_rounding: bool = True
    granularity: str = "block"       # block | layer (AdaRound)
    lr_rounding: float = 1e-3
    lr_weight_scale: float = 1e-4
    lr_act_scale: float = 4e-5
    round_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    act_init_images: int = 256
    cache_ram_gb: float = DEFAULT_BUDGET_GB
    device: str = "cpu"
    seed: int = 0

    @classmethod
    def preset(cls, algo: str, **overrides) -> "ReconConfig":
        base = {
            "minmax": dict(learn_rounding=False), "mse": dict(learn_rounding=False),
            "adaround": dict(granularity="layer", lr_act_scale=4e-4),
            "brecq": dict(lr_act_scale=4e-4),
            "qdrop": dict(drop_prob=0.5, lr_act_scale=4e-4),
            "genie-m": dict(drop_prob=0.5, learn_weight_scale=True, lr_weight_scale=1e-4, lr_act_scale=4e-5),
        }
        if algo not in base:
            raise DfqError(f"unknown algorithm {algo!r}; use one of {', '.join(ALGOS)}")
        return cls(algo=algo, **{**base[algo], **overrides})


class _Beta:
    """AdaRound temperature: no rounding loss during warm-up, then beta decays linearly 20 -> 2."""

    def __init__(self, iters: int, warmup: float, start: float, end: float):
        self.iters, self.start_it, self.b0, self.b1 = iters, int(warmup * iters), start, end

    def __call__(self, it: int) -> float | None:
        if it < self.start_it:
            return None
        frac = (it - self.start_it) / max(1, self.iters - self.start_it)
        return self.b1 + (self.b0 - self.b1) * max(0.0, 1 - frac)


def _per_sample_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).flatten(1).sum(1).mean()


def reconstruct_unit(unit: nn.Module, x_q, x_fp, y_fp, cfg: ReconConfig, name: str = "unit",
                     trace: list | None = None) -> dict:
    """Initialize and (optionally) optimize one unit in place; return its loss summary."""
    dev = torch.device(cfg.device)
    n = len(x_q)
    n_init = min(cfg.act_init_images, n)
    unit.eval()
    with torch.no_grad():  # lazy range init of activation quantizers on x_q
        unit(x_q[:n_init].to(dev))
    gen = torch.Generator().manual_seed(cfg.seed)

    def eval_loss() -> float:
        with torch.no_grad():
            idx = torch.arange(min(n, 256))
            return _per_sample_mse(unit(x_q[idx].to(dev)), y_fp[idx].to(dev)).item()

    before = eval_loss()
    if not cfg.learn_rounding or cfg.iters <= 0:
        return {"unit": name, "loss_before": before, "loss_after": before, "iters": 0}
    layers = quant_layers(unit)
    softs = [ql.enable_soft_rounding(cfg.learn_weight_scale) for ql in layers]
    aqs = [q for q in act_quantizers(unit) if isinstance(q, nn.Module) and getattr(q, "scale", None) is not None
           and isinstance(q.scale, nn.Parameter)]
    groups = [{"params": [s.V for s in softs], "lr": cfg.lr_rounding}]
    if cfg.learn_weight_scale:
        groups.append({"params": [s.q.scale for s in softs], "lr": cfg.lr_weight_scale})
    if aqs:
        groups.append({"params": [q.scale for q in aqs], "lr": cfg.lr_act_scale})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
    beta = _Beta(cfg.iters, cfg.warmup, *cfg.beta)
    for q in aqs:
        q.drop_prob = cfg.drop_prob
    train_keep_bn(unit)
    bar = tqdm(range(cfg.iters), desc=f"recon {name}", leave=False, mininterval=1.0)
    try:
        for it in bar:
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
            xq, y = x_q[idx].to(dev), y_fp[idx].to(dev)
            if cfg.drop_prob > 0:
                xf = x_fp[idx].to(dev)
                xq = torch.where(torch.rand_like(xq) < cfg.drop_prob, xf, xq)
            rec = _per_sample_mse(unit(xq), y)
            b = beta(it)
            rnd = cfg.round_weight * sum(s.rounding_loss(b) for s in softs) if b is not None else torch.zeros(())
            loss = rec + rnd
            if not torch.isfinite(loss):
                raise DfqError(f"reconstruction loss became {loss.item()} in block {name} at iteration {it}; "
                               "lower the learning rates or check the calibration images (nothing was written)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if trace is not None:
                trace.append({"unit": name, "iter": it, "rec_loss": rec.item(), "grad_norm": _grad_norm(groups)})
            opt.step()
            sched.step()
            for s in softs:  # keep learned steps positive
                s.q.scale.data.clamp_(min=1e-8)
            for q in aqs:
                q.scale.data.clamp_(min=1e-8)
            if it % 50 == 0:
                bar.set_postfix(rec=f"{rec.item():.4g}", rnd=f"{float(rnd.detach()):.3g}")
    finally:
        bar.close()
        for q in aqs:
            q.drop_prob = 0.0
        unit.eval()
    for s in softs:
        s.harden()
    return {"unit": name, "loss_before": before, "loss_after": eval_loss(), "iters": cfg.iters}


def _grad_norm(groups: list[dict]) -> float:
    sq = [p.grad.pow(2).sum() for g in groups for p in g["params"] if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def reconstruct(qmodel: nn.Module, calib: torch.Tensor, cfg: ReconConfig,
                trace: list | None = None, progress: bool = True) -> list[dict]:
    """Calibrate/reconstruct ``qmodel`` unit by unit on ``calib`` (in place).

    The full-precision target is a copy of ``qmodel`` with quantization switched off, so
    both share module names, BN folding and patched attention by construction.
    """
    if len(calib) < cfg.batch_size:
        raise DfqError(f"calibration set has {len(calib)} images, fewer than the batch size {cfg.batch_size}; "
                       "add images or lower --batch-size")
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    qmodel.to(dev).eval()
    fp_model = copy.deepcopy(qmodel)
    set_quant_state(fp_model, weights=False, acts=False)
    set_quant_state(qmodel, weights=True, acts=True)
    units = recon_units(qmodel, cfg.granularity)
    fp_units = {u: fp_model.get_submodule(u) for u in units}
    # FP targets for as many upcoming units as fit half the RAM budget, one (early-stopped) pass per chunk
    chunks = plan_chunks(units, {k: v * len(calib) for k, v in io_bytes_per_image(fp_model, fp_units, calib[:1].to(dev)).items()},
                         cfg.cache_ram_gb * 2**30 / 2)
    fp_caches: dict = {}
    summary = []
    t0 = time.time()
    bar = tqdm(units, desc=f"{cfg.algo}", disable=not progress)
    for name in bar:
        t_unit = time.time()
        if name not in fp_caches:
            chunk = next(c for c in chunks if name in c)
            fp_caches = capture_all(fp_model, {u: fp_units[u] for u in chunk}, calib, 64, dev, cfg.cache_ram_gb)
        unit = qmodel.get_submodule(name)
        x_q, _ = capture(qmodel, unit, calib, 64, outputs=False, device=dev, budget_gb=cfg.cache_ram_gb)
        x_fp, y_fp = fp_caches.pop(name)
        s = reconstruct_unit(unit, x_q, x_fp, y_fp, cfg, name, trace)
        del x_q, x_fp, y_fp
        s["seconds"] = round(time.time() - t_unit, 2)  # capture of the unit's input + its optimization
        summary.append(s)
        bar.set_postfix(unit=name, loss=f"{s['loss_after']:.4g}")
    for s in summary:
        s["seconds_total"] = round(time.time() - t0, 1)
    return summary
