"""Learned multi-mode prompt embeddings (in the spirit of arXiv 2602.18861).

Instead of hand-written text, each class gets ``modes`` learnable offsets added to the
text encoder's output for "a photo of a {cls}". They are optimized through a few-step,
fully differentiable sampling loop (text embedding -> UNet -> scheduler step -> VAE
decode -> the classifier's own preprocessing) with three terms:
  * class term: cross-entropy of the classifier on the generated images (stay on class);
  * embedding diversity: push the modes of a class apart (mean pairwise cosine similarity);
  * feature diversity: push the classifier features of images from different modes apart.
The result is a tensor ``[classes, modes, seq, dim]`` saved as safetensors and passed to
the diffusers pipeline as ``prompt_embeds``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dfquant.errors import DfqError
from dfquant.models.registry import ModelSpec


@torch.no_grad()
def base_embeddings(pipe, class_names: list[str]) -> torch.Tensor:
    """Text-encoder hidden states of "a photo of a {cls}" for every class: [C, seq, dim]."""
    ids = pipe.tokenizer([f"a photo of a {c}" for c in class_names], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float().cpu()


def sample_differentiable(pipe, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor, steps: int,
                          guidance: float) -> torch.Tensor:
    """Few-step sampling with gradients to ``cond``; returns images in [0, 1], [B, 3, H, W]."""
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    x = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if guidance > 1 else x
        inp = sched.scale_model_input(inp, t)
        ctx = torch.cat([uncond.expand_as(cond), cond]) if guidance > 1 else cond
        eps = pipe.unet(inp, t, encoder_hidden_states=ctx).sample
        if guidance > 1:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        x = sched.step(eps, t, x).prev_sample
    img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)


def _to_classifier(images01: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    size = spec.input_size[-1]
    if images01.shape[-1] != size:
        images01 = F.interpolate(images01, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return spec.normalize(images01)


def learn_prompts(pipe, spec: ModelSpec, modes: int = 4, iters: int = 100, steps: int = 4, guidance: float = 3.5,
                  lr: float = 1e-2, batch_classes: int = 4, w_embed: float = 0.1, w_feat: float = 0.1,
                  seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Optimize ``[C, modes, seq, dim]`` prompt embeddings for ``spec``'s classes (see module docstring)."""
    if modes < 2:
        raise DfqError("--modes must be at least 2 (diversity needs several modes per class)")
    for p in list(pipe.unet.parameters()) + list(pipe.vae.parameters()) + list(spec.model.parameters()):
        p.requires_grad_(False)
    base = base_embeddings(pipe, spec.class_names)
    uncond = base_embeddings(pipe, [""])
    C = len(spec.class_names)
    gen = torch.Generator().manual_seed(seed)
    delta = (0.05 * torch.randn((C, modes, *base.shape[1:]), generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    size = pipe.unet.config.sample_size
    lat_shape = (pipe.unet.config.in_channels, size, size)
    last = [m for m in spec.model.modules() if isinstance(m, torch.nn.Linear)][-1]  # penultimate features feed it
    bar = tqdm(range(iters), desc="learn prompts", disable=not progress)
    for _ in bar:
        cls = torch.randperm(C, generator=gen)[:batch_classes]
        cond = (base[cls].unsqueeze(1) + delta[cls]).flatten(0, 1)  # [b*modes, seq, dim]
        latents = torch.randn((len(cond), *lat_shape), generator=gen)
        imgs = sample_differentiable(pipe, cond, uncond, latents, steps, guidance)
        x = _to_classifier(imgs, spec)
        store: list = []
        h = last.register_forward_pre_hook(lambda m, a: store.append(a[0]))
        logits = spec.model(x)
        h.remove()
        labels = cls.repeat_interleave(modes)
        ce = F.cross_entropy(logits, labels)
        e = F.normalize(delta[cls].flatten(2), dim=-1)           # [b, modes, seq*dim]
        f = F.normalize(store[0].view(len(cls), modes, -1), dim=-1)
        off = ~torch.eye(modes, dtype=torch.bool)
        div_e = (e @ e.transpose(1, 2))[:, off].mean()
        div_f = (f @ f.transpose(1, 2))[:, off].mean()
        loss = ce + w_embed * div_e + w_feat * div_f
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(ce=f"{ce.item():.3f}", sim_e=f"{div_e.item():.3f}", sim_f=f"{div_f.item():.3f}")
    return (base.unsqueeze(1) + delta.detach()).contiguous()


def save_embeddings(path: str | Path, embeds: torch.Tensor, class_names: list[str], meta: dict) -> None:
    from dfquant.io import save_tensors

    save_tensors(path, {"prompt_embeds": embeds}, metadata={"classes": "\n".join(class_names),
                                                            **{k: str(v) for k, v in meta.items()}})


def load_embeddings(path: str | Path) -> torch.Tensor:
    from dfquant.io import load_tensors

    p = Path(path)
    if not p.is_file():
        raise DfqError(f"{p} not found; learn embeddings with `dfq learn-prompts`")
    embeds = load_tensors(p, fix="learn them again with `dfq learn-prompts`").get("prompt_embeds")
    if embeds is None:
        raise DfqError(f"{p} has no 'prompt_embeds' tensor; learn embeddings with `dfq learn-prompts`")
    return embeds


def rows_embeddings(rows, embeds: torch.Tensor) -> torch.Tensor:
    """Per-row prompt embeddings for a ``learned`` manifest: the k-th image of a class uses mode k mod M."""
    modes, seen = embeds.shape[1], {}
    out = []
    for r in rows:
        c = r.classes[0]
        out.append(embeds[c, seen.get(c, 0) % modes])
        seen[c] = seen.get(c, 0) + 1
    return torch.stack(out)
