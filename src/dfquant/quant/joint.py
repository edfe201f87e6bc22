"""Joint end-to-end PTQ (after block-wise initialization), as in arXiv 2602.18861.

Block reconstruction optimizes each block against its own FP output and so cannot undo
errors that accumulate across blocks. Here every quantization parameter of the whole
network (weight steps, activation steps, and the soft rounding where it is still soft)
is optimized together against the FP model — logit distillation (KL) plus the squared
error of every reconstruction unit's output — with no labels. Checkpoints every
``save_every`` steps make a long run (the paper: 24k iterations at batch 32) resumable.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfquant.errors import DfqError
from dfquant.io import load_torch
from dfquant.quant.modules import QuantLayer, act_quantizers, set_quant_state, train_keep_bn
from dfquant.quant.transform import recon_units


def joint_params(qmodel: nn.Module) -> list[nn.Parameter]:
    """All learnable quantization parameters: weight/activation steps and unhardened rounding."""
    params = []
    for m in qmodel.modules():
        if isinstance(m, QuantLayer):
            m.wq.scale.requires_grad_(True)
            params.append(m.wq.scale)
            if m.soft is not None and not m.soft.hard:
                params.append(m.soft.V)
    params += [q.scale for q in act_quantizers(qmodel) if isinstance(q.scale, nn.Parameter)]
    return params


def joint_finetune(qmodel: nn.Module, calib: torch.Tensor, iters: int, batch_size: int = 32, lr: float = 1e-5,
                   feature_weight: float = 1.0, temperature: float = 1.0, seed: int = 0,
                   resume: Path | None = None, save_every: int = 1000, max_steps: int | None = None,
                   progress: bool = True) -> list[float]:
    """Optimize all quantization parameters of ``qmodel`` jointly; return the per-step total loss.

    ``max_steps`` stops after that many steps of this call (a time-boxed slice of a long run);
    calling again with the same ``resume`` path continues where it stopped.
    """
    if len(calib) < batch_size:
        raise DfqError(f"calibration set has {len(calib)} images, fewer than the batch size {batch_size}")
    fp = copy.deepcopy(qmodel)
    set_quant_state(fp, False, False)
    fp.eval()
    for p in fp.parameters():
        p.requires_grad_(False)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    params = joint_params(qmodel)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters))
    units = recon_units(qmodel)
    feats: dict[str, list[torch.Tensor]] = {"q": [], "fp": []}
    hooks = [m.get_submodule(u).register_forward_hook(lambda mod, a, out, k=k: feats[k].append(out))
             for k, m in (("q", qmodel), ("fp", fp)) for u in units[:-1]]
    gen = torch.Generator().manual_seed(seed)
    start, losses = 0, []
    if resume is not None and resume.exists():
        state = load_torch(resume)
        qmodel.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"]); start, losses = state["step"], state["losses"]
    train_keep_bn(qmodel)
    try:
        stop = iters if max_steps is None else min(iters, start + max_steps)
        for step in tqdm(range(start, stop), desc="joint PTQ", disable=not progress, initial=start, total=iters):
            idx = torch.randint(0, len(calib), (batch_size,), generator=gen)
            x = calib[idx]
            feats["q"].clear(); feats["fp"].clear()
            with torch.no_grad():
                t_logits = fp(x)
            s_logits = qmodel(x)
            kl = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.softmax(t_logits / temperature, -1),
                          reduction="batchmean") * temperature**2
            feat = sum(((a - b) ** 2).flatten(1).mean(1).mean() for a, b in zip(feats["q"], feats["fp"]))
            loss = kl + feature_weight * feat
            if not torch.isfinite(loss):
                raise DfqError(f"joint PTQ loss became {loss.item()} at step {step}; lower lr={lr:g}", params=("lr",))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
            for m in qmodel.modules():
                if isinstance(m, QuantLayer):
                    m.wq.scale.data.clamp_(min=1e-8)
            for q in act_quantizers(qmodel):
                if isinstance(q.scale, nn.Parameter):
                    q.scale.data.clamp_(min=1e-8)
            losses.append(loss.item())
            if resume is not None and ((step + 1) % save_every == 0 or step + 1 == stop):
                from dfquant.io import atomic_path

                with atomic_path(resume) as tmp:
                    torch.save({"model": qmodel.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                "gen": gen.get_state(), "step": step + 1, "losses": losses}, tmp)
    finally:
        for h in hooks:
            h.remove()
        qmodel.eval()
    return losses
