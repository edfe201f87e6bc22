"""Learned multi-mode prompt embeddings (in the spirit of arXiv 2602.18861).

Instead of hand-written text, each class gets ``modes`` learnable offsets added to the
text encoder's output (the family's own ``encode_prompt``) for "a photo of a {cls}". They are
optimized through a few-step, fully differentiable run of the pipeline itself (its
``__call__`` without the ``no_grad`` wrapper: text embedding -> denoiser -> scheduler step ->
VAE decode), then the classifier's own preprocessing, with three terms:
  * class term: cross-entropy of the classifier on the generated images (stay on class);
  * embedding diversity: push the modes of a class apart (mean pairwise cosine similarity);
  * feature diversity: push the classifier features of images from different modes apart.
The result is a tensor ``[classes, modes, seq, dim]`` saved as safetensors and passed to
the diffusers pipeline as ``prompt_embeds``; the family's other text inputs (pooled
embeddings, attention masks) stay those of the class's plain prompt.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dfquant.errors import DfqError
from dfquant.generate.pipeline import call_kwargs, denoiser, encode, native_size
from dfquant.models.spec import ModelSpec


def _class_prompts(class_names: list[str]) -> list[str]:
    return [f"a photo of a {c}" for c in class_names]


@torch.no_grad()
def base_embeddings(pipe, class_names: list[str], call: dict[str, Any] | None = None) -> torch.Tensor:
    """The family's ``prompt_embeds`` of "a photo of a {cls}" for every class: [C, seq, dim]."""
    return encode(pipe, _class_prompts(class_names), call)["prompt_embeds"].float().cpu()


def sample_differentiable(pipe, text: dict[str, torch.Tensor], generators: list[torch.Generator], steps: int,
                          guidance: float, size: int, call: dict[str, Any] | None = None) -> torch.Tensor:
    """The pipeline's own sampling with gradients to the text inputs; images in [0, 1], [B, 3, H, W]."""
    run = getattr(type(pipe).__call__, "__wrapped__", None)  # diffusers wraps __call__ in torch.no_grad()
    if run is None:
        raise DfqError(f"{type(pipe).__name__}.__call__ cannot run with gradients; learn prompts with another generator")
    return run(pipe, **text, generator=generators, num_inference_steps=steps, guidance_scale=guidance, height=size,
               width=size, output_type="pt", **call_kwargs(pipe, call)).images


def to_classifier(images01: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The model's own eval preprocessing (timm's: resize the short side to size/crop_pct with its
    interpolation, centre crop, normalize) on a batch of [0, 1] tensors, differentiably."""
    size = spec.input_size[-1]
    short = math.floor(size / spec.crop_pct)
    h, w = images01.shape[-2:]
    if min(h, w) != short:
        scale = short / min(h, w)
        mode = spec.interpolation if spec.interpolation in ("bilinear", "bicubic") else "bilinear"
        images01 = F.interpolate(images01, size=(round(h * scale), round(w * scale)), mode=mode, antialias=True,
                                 align_corners=False).clamp(0, 1)
    h, w = images01.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return spec.normalize(images01[..., top : top + size, left : left + size])


def learn_prompts(pipe, spec: ModelSpec, modes: int = 4, iters: int = 100, steps: int = 4, guidance: float = 3.5,
                  lr: float = 1e-2, batch_classes: int = 4, w_embed: float = 0.1, w_feat: float = 0.1,
                  seed: int = 0, progress: bool = True, size: int | None = None,
                  call: dict[str, Any] | None = None) -> torch.Tensor:
    """Optimize ``[C, modes, seq, dim]`` prompt embeddings for ``spec``'s classes (see module docstring).

    ``size`` is the sampling resolution (default: the generator's native one); ``call`` the
    preset's extra pipeline arguments, as in :func:`dfquant.generate.pipeline.generate`.
    """
    if modes < 2:
        raise DfqError("--modes must be at least 2 (diversity needs several modes per class)")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    for p in spec.model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        text = {k: v.detach() for k, v in encode(pipe, _class_prompts(spec.class_names), call).items()}
    base = text.pop("prompt_embeds").float().cpu()  # learned in float32, cast to the denoiser's dtype per step
    device, pe_dtype = pipe._execution_device, denoiser(pipe).dtype
    size = size or native_size(pipe)
    C = len(spec.class_names)
    gen = torch.Generator().manual_seed(seed)
    delta = (0.05 * torch.randn((C, modes, *base.shape[1:]), generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    last = [m for m in spec.model.modules() if isinstance(m, torch.nn.Linear)][-1]  # penultimate features feed it
    bar = tqdm(range(iters), desc="learn prompts", disable=not progress)
    for _ in bar:
        cls = torch.randperm(C, generator=gen)[:batch_classes]
        cond = (base[cls].unsqueeze(1) + delta[cls]).flatten(0, 1)  # [b*modes, seq, dim]
        rows = cls.repeat_interleave(modes)
        inputs = {k: v[rows.to(v.device)] for k, v in text.items()} | {"prompt_embeds": cond.to(device, pe_dtype)}
        seeds = torch.randint(0, 2**62, (len(cond),), generator=gen).tolist()
        imgs = sample_differentiable(pipe, inputs, [torch.Generator().manual_seed(s) for s in seeds], steps, guidance,
                                     size, call)
        x = to_classifier(imgs.float().cpu(), spec)
        store: list = []
        h = last.register_forward_pre_hook(lambda m, a: store.append(a[0]))
        logits = spec.model(x)
        h.remove()
        ce = F.cross_entropy(logits, rows)
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
