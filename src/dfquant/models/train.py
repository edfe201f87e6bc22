"""Train the Fashion-MNIST zoo on split A (reproduces the committed checkpoints).

Recipe: SGD (Nesterov, momentum 0.9, wd 5e-4) with cosine LR for CNNs, AdamW (wd 0.05)
for the ViT; augmentation = random translation by up to 2 px + horizontal flip.
An epoch checkpoint next to the output makes an interrupted run resumable.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dfquant.data import fmnist
from dfquant.models.evaluate import top1_tensors
from dfquant.io import load_torch, save_tensors, versions, write_json
from dfquant.models import zoo
from dfquant.models.spec import FMNIST_MEAN, FMNIST_STD
from dfquant.io import check_finite


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + 32, dx : dx + 32]


def train_classifier(arch: str, out_dir: Path, epochs: int, batch_size: int = 128, lr: float | None = None,
                     seed: int = 0, symreg: float = 0.0, satnl: bool = False, satnl_bound: float = 4.0,
                     satnl_mode: str = "tanh") -> dict:
    """Train ``fmnist/<arch>`` on split A; write ``fmnist_<arch>.safetensors`` and its model card JSON.

    Robust variants (:mod:`dfquant.models.robust`): ``symreg > 0`` adds ``symreg * symreg_loss(model)``
    to the cross-entropy; ``satnl`` replaces every ReLU by a saturating nonlinearity (recorded in the
    card, so :func:`dfquant.models.registry.get_model` rebuilds it). The defaults train the plain model
    exactly as before (same computation, same card keys).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = zoo.ARCHS[arch](num_classes=10)
    robust: dict = {}
    if satnl:
        from dfquant.models.robust import apply_satnl

        apply_satnl(model, satnl_bound, satnl_mode)
        robust["satnl"] = {"bound": satnl_bound, "mode": satnl_mode}
    if symreg > 0:
        from dfquant.models.robust import symreg_loss

        robust["symreg"] = symreg
    is_vit = arch == "vit"
    lr = lr if lr is not None else (1e-3 if is_vit else 0.1)
    params = model.parameters()
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.05) if is_vit
           else torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4))
    mean = torch.tensor(FMNIST_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(FMNIST_STD).view(1, 3, 1, 1)
    x_train, y_train = fmnist.load_split("A")
    x_train = (x_train - mean) / std
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch if is_vit else 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f".fmnist_{arch}.resume.pt"
    start = 0
    if ckpt.exists():
        state = load_torch(ckpt)
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"]); start = state["epoch"]
    t0 = time.time()
    for epoch in range(start, epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"{arch} epoch {epoch + 1}/{epochs}")
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(model(_augment(x_train[idx], gen)), y_train[idx])
            if symreg > 0:
                loss = loss + symreg * symreg_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "epoch": epoch + 1}, ckpt)
    x_test, y_test = fmnist.load_split("test")
    acc = top1_tensors(model.eval(), (x_test - mean) / std, y_test)
    card = {
        "model": f"fmnist/{arch}", "data": "Fashion-MNIST split A (30,000 images; see dfquant.data.fmnist)",
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "optimizer": "AdamW wd 0.05, 1 warm-up epoch" if is_vit else "SGD nesterov m0.9 wd 5e-4",
        "schedule": "cosine", "augmentation": "random 2px translation + horizontal flip",
        "test_top1": round(acc, 2), "params": sum(p.numel() for p in model.parameters()),
        "train_seconds_this_run": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
        "command": "dfq " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("dfq") else " ".join(sys.argv),
        "versions": versions(),
        **robust,
    }
    check_finite(model.state_dict().items(), f"the trained fmnist/{arch}", "nothing was written; lower --lr")
    save_tensors(out_dir / f"fmnist_{arch}.safetensors", model.state_dict())
    write_json(out_dir / f"fmnist_{arch}.json", card)
    ckpt.unlink(missing_ok=True)
    return card
