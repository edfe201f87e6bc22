"""One block-reconstruction loop that BRECQ, AdaRound, QDrop and Genie-M configure.

For each unit (residual block, conv-norm-act stack, or single layer) in forward order:
  1. cache the unit's input in the partly quantized model (x_q), and its input and output
     in the full-precision model (x_fp, y_fp);
  2. initialize the unit's activation quantizers (Genie: on the first calibration batch through the
     soft weights; BRECQ/QDrop: on the first 256 quantized inputs);
  3. optimize ``lp_loss(unit_q(x), y_fp) + round_weight * rounding term``, where the loss sums the
     squared error over channels and averages it over batch and positions (the reference codes'
     ``(y_q - y).pow(2).sum(1).mean()``), ``x = x_q``, or with QDrop an element-wise random mix of
     x_q and x_fp and random drop of activation quantization inside the unit;
  4. harden the rounding and move on.
BRECQ's code runs the loop twice (``stages="weights-then-acts"``): first every unit learns its rounding with
activation quantization off, then the activation steps are initialised through the whole quantized model and a
second pass learns only them, on the FP inputs, with the weights hard-rounded.
The algorithms configure it through :data:`~dfquant.quant.algorithms.ALGORITHMS`: what is learned,
loss weights, schedules, batch sampling and the mixing probability.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dfquant.errors import DfqError
from dfquant.quant import estimate
from dfquant.quant.algorithms import ALGORITHMS, get_algorithm
from dfquant.quant.cache import DEFAULT_BUDGET_GB, capture, capture_all, forward_profile, io_bytes_per_image, plan_chunks
from dfquant.quant.modules import act_quantizers, quant_layers, set_quant_state, train_keep_bn
from dfquant.quant.transform import recon_units



@dataclass
class ReconConfig:
    """What a reconstruction run learns, and how. The defaults are Genie-M's published settings;
    :meth:`preset` fills in each algorithm's own from :data:`~dfquant.quant.algorithms.ALGORITHMS`."""

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
    round_weight: float = 1.0
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    # the reference codes' conventions; the alternatives are the maths dfquant used before (docs/reconstruction.md, fidelity study)
    loss_reduction: str = "channel"   # channel: sum over channels, mean over batch and positions | sample: sum over C*H*W
    rounding_schedule: str = "constant"  # constant (reference) | cosine (the rounding lr decays with the steps')
    sampling: str = "epoch"          # epoch: reshuffle once per pass (Genie) | randperm (BRECQ) | randint (QDrop)
    act_init: str = "first-batch"    # first-batch: first calibration batch through soft weights + QDrop (Genie)
                                     # | images: the first act_init_images quantized inputs, rounded weights
    act_init_images: int = 256
    # BRECQ's main_imagenet.py: weights-then-acts = pass 1 learns the rounding of every unit with activation
    # quantization off; the activation steps are then initialised on the first act_init_images images through
    # the whole quantized model; pass 2 learns only them (weights hard), FP unit inputs (its asym=False), loss
    # exponent act_stage_p, act_stage_frac * iters iterations (the reference's 5000 after 20000) | joint: one pass
    stages: str = "joint"
    act_stage_frac: float = 0.25
    act_stage_p: float = 2.4
    cache_ram_gb: float = DEFAULT_BUDGET_GB
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise DfqError(f"{key} {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.stages == "weights-then-acts" and self.act_init != "images":
            raise DfqError("stages 'weights-then-acts' initialises the activation steps on images through the whole "
                           "model; use act_init 'images' with it (or stages 'joint')")

    @property
    def act_stage_iters(self) -> int:
        """Iterations of the activation pass (``weights-then-acts`` only)."""
        return round(self.act_stage_frac * self.iters) if self.stages == "weights-then-acts" else 0

    @classmethod
    def preset(cls, algo: str, **overrides) -> "ReconConfig":
        recon = get_algorithm(algo).recon
        if recon is None:
            raise DfqError(f"{algo} does not use block reconstruction; pick one of "
                           f"{', '.join(a for a, v in ALGORITHMS.items() if v.recon is not None)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise DfqError(f"unknown reconstruction setting(s) {', '.join(unknown)}; use fields of ReconConfig: "
                           + ", ".join(f.name for f in fields(cls)))
        return cls(algo=algo, **{**recon, **overrides})


_CHOICES = {"loss_reduction": ("channel", "sample"), "rounding_schedule": ("constant", "cosine"),
            "sampling": ("epoch", "randperm", "randint"), "act_init": ("first-batch", "images"),
            "granularity": ("block", "layer"), "stages": ("joint", "weights-then-acts")}


class _Beta:
    """AdaRound temperature as the reference ``LinearTempDecay`` counts it (step ``it + 1``): no rounding
    loss before ``warmup * iters``, then beta decays linearly from 20 to 2."""

    def __init__(self, iters: int, warmup: float, start: float, end: float):
        self.iters, self.start_it, self.b0, self.b1 = iters, warmup * iters, start, end

    def __call__(self, it: int) -> float | None:
        count = it + 1
        if count < self.start_it:
            return None
        frac = (count - self.start_it) / max(1e-12, self.iters - self.start_it)
        return self.b1 + (self.b0 - self.b1) * max(0.0, 1 - frac)


def recon_loss(out: torch.Tensor, target: torch.Tensor, reduction: str = "channel", p: float = 2.0) -> torch.Tensor:
    """Squared (``|.|^p``: BRECQ's activation pass uses p = 2.4) output error of a unit.

    ``channel`` is BRECQ's / Genie's ``lp_loss``: ``(out - target)^2`` summed over the channel axis and
    averaged over the batch and every spatial (or token) position. ``sample`` sums over all of C*H*W
    per image, which is H*W times larger and weakens the rounding term accordingly. The channel axis is
    1 for (N, C, ...) maps and vectors, and the last axis for (N, tokens, D) transformer outputs.
    """
    err = (out - target).pow(2) if p == 2.0 else (out - target).abs().pow(p)
    if reduction == "sample":
        return err.flatten(1).sum(1).mean()
    return err.sum(-1 if err.dim() == 3 else 1).mean()


_RATE_FROM, _RATE_ITERS = 3, 20  # the iterations timed for the run-time estimate (after allocator warm-up)


class _Batches:
    """Batch indices in the reference codes' orders (see :attr:`ReconConfig.sampling`)."""

    def __init__(self, n: int, batch_size: int, mode: str, seed: int):
        self.n, self.bs, self.mode = n, min(batch_size, n), mode
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.empty(0, dtype=torch.long), 0

    def next(self) -> torch.Tensor:
        if self.mode == "randint":
            return torch.randint(0, self.n, (self.bs,), generator=self.gen)
        if self.mode == "randperm":
            return torch.randperm(self.n, generator=self.gen)[: self.bs]
        if self.pos + self.bs > len(self.perm):  # epoch: a new shuffle when the current one is used up
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        self.pos += self.bs
        return self.perm[self.pos - self.bs: self.pos]


def reconstruct_unit(unit: nn.Module, x_q, x_fp, y_fp, cfg: ReconConfig, name: str = "unit",
                     trace: list | None = None, progress: bool = True,
                     on_rate: Callable[[float, float], None] | None = None, stage: str = "joint") -> dict:
    """Initialize and (optionally) optimize one unit in place; return its loss summary.

    ``on_rate`` is called once with the measured seconds per iteration (iterations 3..23) and the seconds the
    activation-range initialisation took (0 without one), so the caller can tell the user early how long the
    whole run will take. ``stage``: ``joint`` learns the rounding and
    the activation steps together; ``weights`` (pass 1 of ``weights-then-acts``) only the rounding, with
    activation quantization off; ``acts`` (pass 2) only the activation steps, on hard-rounded weights and
    ranges the caller initialised, for :attr:`ReconConfig.act_stage_iters` with the loss exponent
    :attr:`ReconConfig.act_stage_p`.

    The summary: ``unit``, ``stage``, ``iters``, and the loss on the first 256 inputs (x_q) in eval mode:
    ``loss_before`` (weights nearest-rounded at the initial steps, activation steps as initialised: the unit
    without reconstruction), ``loss_before_soft`` (the soft weights the optimization starts from, near full
    precision) and ``loss_after`` (the learned rounding hardened, learned steps), so that ``loss_after <
    loss_before`` says the reconstruction helped. Measuring them draws no random numbers and changes no state."""
    dev = torch.device(cfg.device)
    n = len(x_q)
    iters = cfg.act_stage_iters if stage == "acts" else cfg.iters
    p = cfg.act_stage_p if stage == "acts" else 2.0
    batches = _Batches(n, cfg.batch_size, cfg.sampling, cfg.seed)
    unit.eval()

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit's training input (QDrop: element-wise mix of quantized and FP input) and target."""
        xq = x_q.index_select(0, idx).to(dev)  # row copies: several times faster than x_q[idx] on CPU
        if cfg.drop_prob > 0:  # a 0/1 float mask and products: exact, and several times faster than torch.where
            keep = torch.rand_like(xq).lt_(cfg.drop_prob)
            xq = xq.mul_(1.0 - keep).addcmul_(x_fp.index_select(0, idx).to(dev), keep)
        return xq, y_fp.index_select(0, idx).to(dev)

    def eval_loss() -> float:
        with torch.no_grad():
            idx = torch.arange(min(n, 256))
            return recon_loss(unit(x_q[idx].to(dev)), y_fp[idx].to(dev), cfg.loss_reduction, p).item()

    aqs = [] if stage == "weights" else [
        q for q in act_quantizers(unit) if isinstance(q, nn.Module) and getattr(q, "scale", None) is not None
        and isinstance(q.scale, nn.Parameter)]
    learn = cfg.learn_rounding and iters > 0 and (stage != "acts" or bool(aqs))
    t_init = 0.0  # seconds of the activation-range initialisation, for the run-time estimate
    if stage == "joint" and not (learn and cfg.act_init == "first-batch"):
        t0 = time.perf_counter()
        with torch.no_grad():  # lazy range init of activation quantizers on x_q, rounded weights
            unit(x_q[: min(cfg.act_init_images, n)].to(dev))
        t_init = time.perf_counter() - t0
    if not learn:
        before = eval_loss()
        return {"unit": name, "stage": stage, "loss_before": before, "loss_before_soft": before, "loss_after": before,
                "iters": 0}
    soft_layers = [] if stage == "acts" else quant_layers(unit)
    softs = [ql.enable_soft_rounding(cfg.learn_weight_scale) for ql in soft_layers]
    for q in aqs:
        q.drop_prob = cfg.drop_prob
    if stage == "joint" and cfg.act_init == "first-batch":
        # Genie initialises the activation steps while it captures the block's inputs: on the first calibration
        # batch (in order, the quantized input x_q), through the soft (near full-precision) weights with QDrop's
        # random drop inside the block
        t0 = time.perf_counter()
        train_keep_bn(unit)
        with torch.no_grad():
            unit(x_q[: min(cfg.batch_size, n)].to(dev))
        unit.eval()
        t_init = time.perf_counter() - t0
    # loss_before: the unit as it would be without reconstruction (nearest-rounded weights at the initial steps,
    # the activation steps as initialised), the fair comparison with loss_after (hard rounding, learned steps);
    # loss_before_soft: the soft (near full-precision) weights the optimization starts from
    before_soft = eval_loss()
    before = _rounded_loss(eval_loss, soft_layers) if soft_layers else before_soft
    groups, opt, sched = _optimizer(softs, aqs, cfg, iters)
    beta = _Beta(iters, cfg.warmup, *cfg.beta)
    train_keep_bn(unit)
    bar = tqdm(range(iters), desc=f"recon {name}", leave=False, mininterval=1.0, disable=not progress)
    t_rate = 0.0
    try:
        for it in bar:
            if on_rate is not None and it in (_RATE_FROM, _RATE_FROM + _RATE_ITERS):
                if it == _RATE_FROM:
                    t_rate = time.perf_counter()
                else:
                    on_rate((time.perf_counter() - t_rate) / _RATE_ITERS, t_init)
            xq, y = batch(batches.next())
            rec = recon_loss(unit(xq), y, cfg.loss_reduction, p)
            b = beta(it) if softs else None
            rnd = cfg.round_weight * sum(s.rounding_loss(b) for s in softs) if b is not None else torch.zeros(())
            loss = rec + rnd
            if not torch.isfinite(loss):
                raise DfqError(f"reconstruction loss became {loss.item()} in block {name} at iteration {it}; "
                               "lower the learning rates or check the calibration images (nothing was written)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if trace is not None:
                trace.append({"unit": name, "iter": it, "rec_loss": rec.item(), "round_loss": float(rnd.detach()),
                              "grad_norm": _grad_norm(groups)})
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
    return {"unit": name, "stage": stage, "loss_before": before, "loss_before_soft": before_soft,
            "loss_after": eval_loss(), "iters": iters}


def _rounded_loss(eval_loss: Callable[[], float], layers: list) -> float:
    """``eval_loss()`` with the soft rounding of ``layers`` set aside: their weights nearest-rounded at the current
    (initial) steps by their own quantizers, what the model computes without reconstruction. ``eval_loss`` runs in
    eval mode without grad (no QDrop draw); the soft modules are put back as they were."""
    kept = [ql.soft for ql in layers]
    try:
        for ql in layers:
            ql.soft = None
        return eval_loss()
    finally:
        for ql, soft in zip(layers, kept):
            ql.soft = soft


def _optimizer(softs: list, aqs: list, cfg: ReconConfig, iters: int | None = None):
    """Adam over the soft bits V, the weight steps (Genie-M) and the activation steps. As in the reference
    codes, only the step sizes follow a cosine decay to 0 over ``iters`` (default ``cfg.iters``); V keeps its
    learning rate unless ``rounding_schedule="cosine"`` (dfquant's former schedule)."""
    iters = cfg.iters if iters is None else iters
    groups = []
    if softs:
        groups.append({"params": [s.V for s in softs], "lr": cfg.lr_rounding, "decay": cfg.rounding_schedule == "cosine"})
    if softs and cfg.learn_weight_scale:
        groups.append({"params": [s.q.scale for s in softs], "lr": cfg.lr_weight_scale, "decay": True})
    if aqs:
        groups.append({"params": [q.scale for q in aqs], "lr": cfg.lr_act_scale, "decay": True})
    opt = torch.optim.Adam(groups)

    def cosine(it: int) -> float:  # CosineAnnealingLR(T_max=iters, eta_min=0) in closed form
        return 0.5 * (1 + math.cos(math.pi * it / iters))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, [cosine if g["decay"] else (lambda it: 1.0) for g in groups])
    return groups, opt, sched


def _grad_norm(groups: list[dict]) -> float:
    sq = [p.grad.pow(2).sum() for g in groups for p in g["params"] if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def reconstruct(qmodel: nn.Module, calib: torch.Tensor, cfg: ReconConfig,
                trace: list | None = None, progress: bool = True, units: list[str] | None = None) -> list[dict]:
    """Calibrate/reconstruct ``qmodel`` unit by unit on ``calib`` (in place): one pass, or two with
    ``cfg.stages="weights-then-acts"`` (one summary entry per unit and pass, in order).

    ``units``: submodule names to reconstruct, in execution order (default: :func:`recon_units`);
    like Genie's ``reconstruct(teacher, student, data, units)``, the caller may choose them.

    The full-precision target is a copy of ``qmodel`` with quantization switched off, so
    both share module names, BN folding and patched attention by construction.
    """
    if len(calib) < cfg.batch_size:
        raise DfqError(f"calibration set has {len(calib)} images, fewer than batch_size={cfg.batch_size}; "
                       "add images or lower it", params=("batch_size",))
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    qmodel.to(dev).eval()
    fp_model = copy.deepcopy(qmodel)
    set_quant_state(fp_model, weights=False, acts=False)
    set_quant_state(qmodel, weights=True, acts=True)
    units = recon_units(qmodel, cfg.granularity) if units is None else list(units)
    fp_units = {u: fp_model.get_submodule(u) for u in units}
    # FP targets for as many upcoming units as fit half the RAM budget, one (early-stopped) pass per chunk
    unit_bytes = {k: v * len(calib) for k, v in io_bytes_per_image(fp_model, fp_units, calib[:1].to(dev)).items()}
    chunks = plan_chunks(units, unit_bytes, cfg.cache_ram_gb * 2**30 / 2)
    fp_caches: dict = {}
    summary = []
    t0 = time.time()
    stages = ("weights", "acts") if cfg.stages == "weights-then-acts" else ("joint",)
    total_iters = cfg.iters + cfg.act_stage_iters

    # the run-time estimate, said once the second unit has timed its iterations (:mod:`dfquant.quant.estimate`)
    probe = calib[: cfg.batch_size].to(dev)
    profile = forward_profile(fp_model, fp_units, probe) if progress else {}
    work = estimate.unit_profile(fp_model, fp_units, probe) if progress else {}
    timed: dict[str, dict[str, float]] = {}  # unit -> seconds of its input capture, its iterations, init, the rest
    fp_capture_s = 0.0
    # reconstruct_unit evaluates the loss three times (loss_before_soft, loss_before, loss_after) on <= 256 inputs
    eval_batches = 3 * min(len(calib), 256) / len(probe)

    def on_rate(seconds_per_iter: float, init_seconds: float = 0.0) -> None:
        nonlocal rate_cb
        timed.setdefault(name, {}).update(rate=seconds_per_iter, init=init_seconds)
        if len(timed) >= 2 or len(units) == 1:
            rate_cb = None
            total = estimate.estimate_seconds(units, profile, work, timed, total_iters, len(calib) / len(probe),
                                               eval_batches, len(stages), len(chunks) * fp_capture_s)
            tqdm.write(f"estimated reconstruction time: {estimate.duration(total)} ({len(units)} units x {total_iters} "
                       "iterations); fewer iterations per block give a quicker, coarser run", file=sys.stderr)

    rate_cb: Callable[[float, float], None] | None = on_rate if progress else None
    for stage in stages:
        set_quant_state(qmodel, weights=True, acts=stage != "weights")
        if stage == "acts":  # BRECQ: every activation step from one pass of the first images through the model
            with torch.no_grad():
                qmodel(calib[: cfg.act_init_images].to(dev))
        bar = tqdm(units, desc=cfg.algo if stage == "joint" else f"{cfg.algo} ({stage})", disable=not progress)
        for name in bar:
            t_unit = time.time()
            if name not in fp_caches:
                chunk = next(c for c in chunks if name in c)
                t_capture = time.time()
                fp_caches = capture_all(fp_model, {u: fp_units[u] for u in chunk}, calib, 64, dev, cfg.cache_ram_gb)
                fp_capture_s = fp_capture_s or time.time() - t_capture  # the first chunk's, for the estimate
            unit = qmodel.get_submodule(name)
            x_fp, y_fp = fp_caches.pop(name)
            # the activation pass trains on the FP inputs, as BRECQ's (it caches them with asym=False)
            t_capture = time.time()
            x_q = x_fp if stage == "acts" else capture(qmodel, unit, calib, 64, outputs=False, device=dev,
                                                        budget_gb=cfg.cache_ram_gb)[0]
            if rate_cb is not None:
                timed.setdefault(name, {})["capture"] = time.time() - t_capture
            s = reconstruct_unit(unit, x_q, x_fp, y_fp, cfg, name, trace, progress, rate_cb, stage)
            del x_q, x_fp, y_fp
            s["seconds"] = round(time.time() - t_unit, 2)  # capture of the unit's input + its optimization
            if rate_cb is not None and name == units[0] and "rate" in timed.get(name, {}):  # the first unit's rest
                t = timed[name]
                iters = cfg.act_stage_iters if stage == "acts" else cfg.iters
                t["rest"] = max(0.0, time.time() - t_unit - fp_capture_s - t["capture"] - t["rate"] * iters)
            summary.append(s)
            bar.set_postfix(unit=name, loss=f"{s['loss_after']:.4g}")
    for s in summary:
        s["seconds_total"] = round(time.time() - t0, 1)
    return summary
