"""The embedded mini generator: a Stable-Diffusion-architecture pipeline for Fashion-MNIST.

Same components and code path as SD v1.5 — AutoencoderKL, UNet2DConditionModel,
CLIPTextModel + CLIPTokenizer, DDIM scheduler — at toy width: 32x32 RGB images,
8x8x4 latents. Trained from scratch on split B (never the classifiers' split A):
  1. the VAE (L1 + small KL) on split B images;
  2. the UNet and the text encoder jointly, epsilon prediction on scaled VAE latents,
     captions drawn from the prompt templates (single-class and GenQ-style adjectives),
     10% empty captions so classifier-free guidance works.
Saved with ``save_pretrained`` (safetensors) and loaded like any generator (``AutoPipelineForText2Image``).

``mini-compose`` (``compose > 0``) is the same architecture and recipe, but a share of its training set
is two-object scenes built from two split-B images (:func:`compose_scenes`), captioned
"a photo of a X and a Y" in random order, so that it draws both objects of a mixup-class prompt as
Stable Diffusion does after seeing millions of multi-object captions.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from dfquant.data import fmnist
from dfquant.errors import DfqError
from dfquant.generate.tokenizer import build_tokenizer
from dfquant.io import versions, write_json
from dfquant.prompts import ADJECTIVES, mixup_prompt

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
CAPTION_TEMPLATES = ("a photo of a {cls}", "a {adj} photo of a {adj2} {cls}", "a photo of a {adj} {cls}", "a {cls}")


def caption(cls: str, rng: random.Random) -> str:
    a, b = rng.sample(ADJECTIVES, 2)
    return rng.choice(CAPTION_TEMPLATES).format(cls=cls, adj=a, adj2=b)


def tokenizer_corpus(class_names=fmnist.CLASS_NAMES) -> list[str]:
    """Every word the captions (and mixup prompts) can use, so each is a single token."""
    return [" ".join(ADJECTIVES), "a photo of and", " ".join(class_names)]


def build_components(size: str = "mini", vocab_size: int = 1000) -> dict:
    """Fresh (random-weight) VAE, UNet, text encoder and scheduler.

    ``size='mini'`` is the embedded generator; ``size='tiny'`` is a test-sized toy.
    """
    w = {"mini": (32, 32, 64, 64, 96, 64, 128), "tiny": (4, 8, 8, 8, 16, 8, 16)}[size]
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=list(w[:3]),
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                        layers_per_block=1, norm_num_groups=8 if size == "mini" else 2, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=w[5], intermediate_size=w[6], num_attention_heads=4 if size == "mini" else 2,
                                                num_hidden_layers=3 if size == "mini" else 2, vocab_size=vocab_size,
                                                max_position_embeddings=77, bos_token_id=vocab_size - 2,
                                                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(w[3], w[4]),
                                layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=w[5], attention_head_dim=8 if size == "mini" else 2,
                                norm_num_groups=16 if size == "mini" else 2)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "scheduler": DDIMScheduler(**SD_SCHEDULER)}


def build_pipeline(size: str = "tiny", seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight pipeline with the project's tokenizer (used by tests and as the training start)."""
    torch.manual_seed(seed)
    tok = build_tokenizer(tokenizer_corpus())
    parts = build_components(size, vocab_size=len(tok))
    return StableDiffusionPipeline(tokenizer=tok, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **parts)


def compose_scenes(x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0,
                   scale: tuple[float, float] = (0.5, 0.75)) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` two-object scenes from the images ``x`` (N, C, S, S) in [0, 1] with labels ``y``.

    Each scene takes two images of different classes, shrinks each to a random fraction ``scale`` of
    the side, and places them either side by side (left/right, random vertical offsets) or overlapping
    (independent random positions; where they overlap the brighter pixel wins, which is how two
    objects on Fashion-MNIST's black background occlude). Returns the scenes in [0, 1] and the label
    pairs (n, 2), the first label being the left (or first pasted) object.
    """
    g = torch.Generator().manual_seed(seed)
    size = x.shape[-1]
    out = torch.zeros(n, *x.shape[1:])
    pairs = torch.empty(n, 2, dtype=torch.long)
    for k in range(n):
        i, j = torch.randint(0, len(x), (2,), generator=g).tolist()
        while int(y[j]) == int(y[i]):
            j = int(torch.randint(0, len(x), (1,), generator=g))
        sides = [round(size * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=g)))) for _ in range(2)]
        side_by_side = bool(torch.rand(1, generator=g) < 0.5)
        for slot, (idx, s) in enumerate(zip((i, j), sides)):
            small = F.interpolate(x[idx : idx + 1], size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
            if side_by_side:
                half = size // 2
                lo = 0 if slot == 0 else half
                x0 = lo + int(torch.randint(0, max(half - s, 0) + 1, (1,), generator=g)) if s <= half else (0 if slot == 0 else size - s)
            else:
                x0 = int(torch.randint(0, size - s + 1, (1,), generator=g))
            y0 = int(torch.randint(0, size - s + 1, (1,), generator=g))
            region = out[k, :, y0 : y0 + s, x0 : x0 + s]
            out[k, :, y0 : y0 + s, x0 : x0 + s] = torch.maximum(region, small.clamp(0, 1))
        pairs[k, 0], pairs[k, 1] = int(y[i]), int(y[j])
    return out, pairs


def pair_caption(a: str, b: str, rng: random.Random) -> str:
    """The mixup prompt's own wording, "a photo of a X and a Y", with the order drawn at random."""
    return mixup_prompt((a, b) if rng.random() < 0.5 else (b, a))


def train_vae(vae: AutoencoderKL, x: torch.Tensor, epochs: int, batch_size: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-6, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    bar = tqdm(total=steps, desc="vae")
    loss_val = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            xb = x[perm[i : i + batch_size]]
            post = vae.encode(xb).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
            loss = F.l1_loss(rec, xb) + 0.5 * F.mse_loss(rec, xb) + kl_weight * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
            loss_val = loss.item()
            bar.update(1); bar.set_postfix(loss=f"{loss_val:.4f}")
    bar.close()
    vae.eval()
    return loss_val


def train_unet(pipe: StableDiffusionPipeline, latents: torch.Tensor, labels: torch.Tensor, steps: int,
               batch_size: int = 128, lr: float = 5e-4, seed: int = 0, drop_caption: float = 0.1) -> float:
    """Joint UNet + text-encoder denoising training on pre-computed (scaled) latents.

    ``labels`` is (N, 2): a single-object image has ``-1`` as its second label and gets one of the
    single-class caption templates; a two-object scene gets :func:`pair_caption`.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    noise_sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")})
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.03)
    pipe.unet.train(); pipe.text_encoder.train()
    names = fmnist.CLASS_NAMES
    bar = tqdm(range(steps), desc="unet")
    ema = None
    for _ in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        caps = ["" if rng.random() < drop_caption else
                caption(names[int(labels[i, 0])], rng) if int(labels[i, 1]) < 0 else
                pair_caption(names[int(labels[i, 0])], names[int(labels[i, 1])], rng) for i in idx]
        ids = pipe.tokenizer(caps, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        loss = F.mse_loss(pipe.unet(zt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    pipe.unet.eval(); pipe.text_encoder.eval()
    return float(ema)


def train_generator(out: Path, vae_epochs: int = 1, unet_steps: int = 1400, seed: int = 0, command: str = "",
                    compose: float = 0.0) -> dict:
    """Train the mini generator on split B and save it as a diffusers pipeline folder.

    ``compose`` is the share of the training set that is two-object scenes (0 = the ``mini`` generator);
    the scenes are added to the 30,000 single-object images, which all stay.
    """
    if not 0.0 <= compose < 1.0:
        raise DfqError(f"--compose is the share of two-object scenes in the training set, in [0, 1); got {compose}")
    t0 = time.time()
    pipe = build_pipeline("mini", seed)
    x01, y1 = fmnist.load_split("B")
    labels = torch.stack([y1, torch.full_like(y1, -1)], 1)
    n_scenes = round(len(x01) * compose / (1 - compose))
    if n_scenes:
        scenes, pairs = compose_scenes(x01, y1, n_scenes, seed=seed)
        x01, labels = torch.cat([x01, scenes]), torch.cat([labels, pairs])
    x, y = x01 * 2 - 1, labels
    vae_loss = train_vae(pipe.vae, x, vae_epochs, seed=seed)
    with torch.no_grad():
        lat = torch.cat([pipe.vae.encode(x[i : i + 500]).latent_dist.mean for i in range(0, len(x), 500)])
    scale = float(1.0 / lat.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    t1 = time.time()
    unet_loss = train_unet(pipe, lat * scale, y, unet_steps, seed=seed)
    pipe.save_pretrained(out, safe_serialization=True)
    card = {"generator": "dfquant mini" + ("-compose" if n_scenes else "") + " (Stable-Diffusion architecture)",
            "data": "Fashion-MNIST split B (30,000 images)" + (f" + {n_scenes} two-object scenes made from them" if n_scenes else ""),
            "compose": compose,
            "resolution": 32, "latent": [4, 8, 8], "vae_epochs": vae_epochs, "unet_steps": unet_steps, "seed": seed,
            "vae_final_loss": round(vae_loss, 5), "unet_final_loss_ema": round(unet_loss, 5), "vae_scaling_factor": scale,
            "vae_seconds": round(t1 - t0, 1), "unet_seconds": round(time.time() - t1, 1),
            "torch_threads": torch.get_num_threads(), "command": command, "versions": versions()}
    write_json(out / "model_card.json", card)
    return card
