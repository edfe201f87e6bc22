"""Random-weight text-to-image pipelines with the real architectures (no download), and tiny
ones of every family for the offline tests.

``random_pipeline(name)`` writes out the hub configs of SD v1.5, SD-Turbo (an SD 2.1
distillation), SDXL(-Turbo), SD 3.5 Medium and FLUX.1-schnell, so the full-size code path can
be built offline: the tests build them on the ``meta`` device (shapes and parameter counts,
no memory: FLUX alone is 12B parameters) and the GPU benchmark materializes them to time
generation at native resolution. Weights are random, so the pictures are noise; shapes,
parameter counts and FLOPs are those of the real models. Tokenizers are small local ones
(the mini generator's CLIP BPE, a character-level T5): their ids are a subset of the real
vocabularies, which is all the text encoders need to run.

``tiny_pipeline(name)`` builds every preset family at toy width (a few layers, 32 px), the
way diffusers' own tests do, so that the whole `dfq generate` path runs per family in seconds.
"""

from __future__ import annotations

import string
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any

from dfquant.errors import DfqError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

_SD_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               hidden_act="quick_gelu", projection_dim=768)
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
               hidden_act="gelu", projection_dim=1280)
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
               vocab_size=32128, relative_attention_num_buckets=32)
_VAE_SD = dict(latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)
# SD3 / FLUX.1 VAE: 16 latent channels, no quant convs, shifted latents.
_VAE_16 = dict(_VAE_SD, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609)

# Full-size families (short names as in pipeline.PRESETS).
ARCHITECTURES = ("sd15", "sd-turbo", "sdxl-turbo", "sd35-medium", "flux-schnell")
TINY = ("sd15", "sd-turbo", "sdxl-turbo", "sd35-medium", "pixart-sigma", "sana", "flux-schnell", "flux2-klein")


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    from dfquant.generate.pipeline import mini_generator_dir

    return CLIPTokenizer.from_pretrained(mini_generator_dir() / "tokenizer", model_max_length=77)


def _t5_tokenizer(max_length: int = 512):
    """A character-level SentencePiece-unigram T5 tokenizer (ids < 200, inside every T5 vocabulary)."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _gemma_tokenizer():
    """A character-level Gemma BPE tokenizer (Sana's text encoder)."""
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581"]
                                        + list(string.ascii_letters + string.digits + string.punctuation))}
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=4096)  # Sana prepends a long instruction


def _qwen_tokenizer():
    """A byte-level Qwen2 BPE tokenizer with a plain chat template (FLUX.2 [klein]'s text encoder)."""
    from transformers import Qwen2Tokenizer

    from dfquant.generate.tokenizer import _byte_alphabet

    vocab = {t: i for i, t in enumerate([*_byte_alphabet(), "<|endoftext|>"])}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=512)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def _clip(tok, projection: bool = False, **cfg: Any):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # The mini tokenizer's vocabulary ends with <|startoftext|>, <|endoftext|> (its bos/eos ids).
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPTextConfig(max_position_embeddings=77, **(dict(vocab_size=49408) | ids | cfg))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(**cfg: Any):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**cfg))


def _vae(sample_size: int, **cfg: Any):
    from diffusers import AutoencoderKL

    n = len(cfg["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, sample_size=sample_size, **cfg)


def _sd(full: bool, turbo: bool) -> dict[str, Any]:
    import diffusers
    from diffusers import UNet2DConditionModel

    from dfquant.generate.mini import build_components

    tok = _clip_tokenizer()
    if not full:
        parts = build_components("tiny", vocab_size=len(tok))
        scheduler = parts.pop("scheduler")
        return parts | dict(scheduler=lambda: scheduler, tokenizer=tok, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False)
    unet = dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True) if turbo \
        else dict(attention_head_dim=8, cross_attention_dim=768)
    text = dict(_CLIP_G, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                projection_dim=512) if turbo else _CLIP_L
    sched = ("EulerDiscreteScheduler", dict(timestep_spacing="trailing")) if turbo else \
        ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False))
    return dict(
        unet=UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                  block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
                                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, **unet),
        vae=_vae(512, **_VAE_SD), text_encoder=_clip(tok, **text), tokenizer=tok,
        scheduler=partial(getattr(diffusers, sched[0]), **_SD_SCHED, **sched[1]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl(full: bool) -> dict[str, Any]:
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel

    tok = _clip_tokenizer()
    if full:
        te1, te2, vae = _CLIP_L, _CLIP_G, _vae(1024, **_VAE_SD, scaling_factor=0.13025)
        unet = dict(sample_size=64, block_out_channels=(320, 640, 1280), layers_per_block=2,
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
    else:
        te1 = te2 = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                         projection_dim=8, vocab_size=len(tok))
        vae = _vae(32, latent_channels=4, block_out_channels=[4, 8], layers_per_block=1, norm_num_groups=2)
        unet = dict(sample_size=16, block_out_channels=(8, 16), layers_per_block=1, transformer_layers_per_block=(1, 1),
                    attention_head_dim=(2, 4), cross_attention_dim=16, addition_time_embed_dim=4,
                    projection_class_embeddings_input_dim=6 * 4 + 8, norm_num_groups=4)
    return dict(
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, down_block_types=(
            "DownBlock2D", *["CrossAttnDownBlock2D"] * (len(unet["block_out_channels"]) - 1)),
            up_block_types=(*["CrossAttnUpBlock2D"] * (len(unet["block_out_channels"]) - 1), "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", **unet),
        vae=vae, text_encoder=_clip(tok, **te1), text_encoder_2=_clip(tok, projection=True, **te2), tokenizer=tok,
        tokenizer_2=tok, scheduler=partial(EulerAncestralDiscreteScheduler, **_SD_SCHED, timestep_spacing="trailing"))


def _sd3(full: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tok = _clip_tokenizer()
    if full:
        te1, te2, t5 = _CLIP_L, _CLIP_G, _T5_XXL
        vae = _vae(1024, **_VAE_16, scaling_factor=1.5305)
        dit = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
    else:
        te1 = te2 = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                         projection_dim=8, vocab_size=len(tok))
        t5 = dict(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, vocab_size=200,
                  relative_attention_num_buckets=8)
        vae = _vae(32, latent_channels=4, block_out_channels=[4, 8], layers_per_block=1, norm_num_groups=2,
                   use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
        dit = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
                   pos_embed_max_size=16)
    return dict(transformer=SD3Transformer2DModel(**dit), vae=vae, text_encoder=_clip(tok, projection=True, **te1),
                text_encoder_2=_clip(tok, projection=True, **te2), text_encoder_3=_t5(**t5), tokenizer=tok,
                tokenizer_2=tok, tokenizer_3=_t5_tokenizer(), scheduler=partial(FlowMatchEulerDiscreteScheduler, shift=3.0))


def _flux(full: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tok = _clip_tokenizer()
    if full:
        clip, t5 = _CLIP_L, _T5_XXL
        vae = _vae(1024, **(_VAE_16 | dict(shift_factor=0.1159)), scaling_factor=0.3611)
        dit = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
    else:
        clip = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tok))
        t5 = dict(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, vocab_size=200,
                  relative_attention_num_buckets=8)
        vae = _vae(32, latent_channels=1, block_out_channels=[4, 8], layers_per_block=1, norm_num_groups=2,
                   use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
        dit = dict(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                   joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    return dict(transformer=FluxTransformer2DModel(patch_size=1, guidance_embeds=False, **dit), vae=vae,
                text_encoder=_clip(tok, **clip), text_encoder_2=_t5(**t5), tokenizer=tok, tokenizer_2=_t5_tokenizer(),
                scheduler=partial(FlowMatchEulerDiscreteScheduler, shift=1.0, use_dynamic_shifting=False))


def _pixart() -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    return dict(
        transformer=PixArtTransformer2DModel(sample_size=16, num_layers=1, patch_size=2, attention_head_dim=8,
                                             num_attention_heads=2, caption_channels=16, in_channels=4,
                                             cross_attention_dim=16, out_channels=8, attention_bias=True,
                                             activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                             norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6),
        vae=_vae(32, latent_channels=4, block_out_channels=[4, 8], layers_per_block=1, norm_num_groups=2),
        text_encoder=_t5(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, vocab_size=200,
                         relative_attention_num_buckets=8),
        tokenizer=_t5_tokenizer(), scheduler=partial(DPMSolverMultistepScheduler))


def _sana() -> dict[str, Any]:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = _gemma_tokenizer()
    return dict(
        transformer=SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                           num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                           cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                           sample_size=16),
        vae=AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                          encoder_block_types=("ResBlock", "EfficientViTBlock"),
                          decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                          decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                          decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                          decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                          upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                          scaling_factor=0.41407),
        text_encoder=Gemma2Model(Gemma2Config(head_dim=4, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                              num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tok),
                                              pad_token_id=0, eos_token_id=1, bos_token_id=2)),
        tokenizer=tok, scheduler=partial(FlowMatchEulerDiscreteScheduler, shift=3.0))


def _flux2_klein() -> dict[str, Any]:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _qwen_tokenizer()
    # encode_prompt stacks hidden states 9, 18 and 27 of the text encoder: 27 layers, joint dim 3 x 8.
    return dict(
        transformer=Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                            timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                            guidance_embeds=False),
        vae=AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, latent_channels=1,
                               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                               block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2,
                               use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=Qwen3ForCausalLM(Qwen3Config(hidden_size=8, intermediate_size=16, num_hidden_layers=27,
                                                  num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                                                  vocab_size=len(tok), max_position_embeddings=1024)),
        tokenizer=tok, scheduler=partial(FlowMatchEulerDiscreteScheduler), is_distilled=True)


def _components(name: str, full: bool) -> tuple[str, dict[str, Any]]:
    """(pipeline class, components); the scheduler comes as a factory, to be built outside a meta-device context."""
    builders = {
        "sd15": ("StableDiffusionPipeline", lambda: _sd(full, turbo=False)),
        "sd-turbo": ("StableDiffusionPipeline", lambda: _sd(full, turbo=True)),
        "sdxl-turbo": ("StableDiffusionXLPipeline", lambda: _sdxl(full)),
        "sd35-medium": ("StableDiffusion3Pipeline", lambda: _sd3(full)),
        "flux-schnell": ("FluxPipeline", lambda: _flux(full)),
        "pixart-sigma": ("PixArtSigmaPipeline", _pixart),
        "sana": ("SanaPipeline", _sana),
        "flux2-klein": ("Flux2KleinPipeline", _flux2_klein),
    }
    cls, build = builders[name]
    return cls, build()


def _random_init_(module: "torch.nn.Module", seed: int) -> None:
    """Fill the parameters of a materialized module: N(0, 0.02) weights, unit norm scales, zero biases."""
    import torch

    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def materialize_(pipe: "DiffusionPipeline", device: str, dtype: str = "float32") -> None:
    """Allocate a pipeline built without weight memory on ``device`` in ``dtype`` and fill it with
    random weights there (a 12B FLUX is never materialized in float32 on the host)."""
    import torch

    from dfquant.generate.pipeline import DTYPES

    for i, module in enumerate(m for m in pipe.components.values() if isinstance(m, torch.nn.Module)):
        # to_empty also empties buffers: keep the computed ones (position tables, rotary frequencies).
        buffers = {n: b.clone() for n, b in module.named_buffers() if not b.is_meta}
        module.to_empty(device=device)
        with torch.no_grad():
            for n, b in module.named_buffers():
                b.copy_(buffers[n]) if n in buffers else b.zero_()
        if hasattr(module, "tie_weights"):
            module.tie_weights()  # T5 shares its input embedding; the empty-weights build unties it
        module.to(getattr(torch, DTYPES[dtype]))
        _random_init_(module, seed=i)
        module.eval()


def share_random_weights_(pipe: "DiffusionPipeline", device: str, dtype: str = "float32", seed: int = 0) -> None:
    """Give a pipeline built without weight memory random weights that allocate (almost) nothing: every weight
    with two or more dimensions becomes a view, at a random offset, into one buffer of U(-0.02, 0.02) values
    (the size of the largest weight); norm scales are 1 and biases 0, as in :func:`_random_init_`. For CPU tests
    that run a full-size architecture and look at shapes only: SD v1.5 in about 0.2 GB instead of 4.3 GB, and
    no second per parameter spent drawing random numbers. Inference only: weights share storage."""
    import torch

    from dfquant.generate.pipeline import DTYPES

    dt = getattr(torch, DTYPES[dtype])
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    slack = 2**20
    size = max(p.numel() for m in modules for p in m.parameters()) + slack
    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty(size).uniform_(-0.02, 0.02, generator=gen).to(device=device, dtype=dt)
    for module in modules:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is None:
                    continue
                if p.dim() >= 2:
                    start = int(torch.randint(0, slack, (1,), generator=gen))
                    value = pool[start: start + p.numel()].view(p.shape)
                else:
                    value = (torch.zeros if name.endswith("bias") else torch.ones)(p.shape, device=device, dtype=dt)
                sub._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        if hasattr(module, "tie_weights"):
            module.tie_weights()
        module.to(device).eval()


def random_pipeline(name: str = "sd15", dtype: str = "float32", device: str = "cpu",
                    shared_weights: bool = False) -> "DiffusionPipeline":
    """The published architecture of ``name`` (one of :data:`ARCHITECTURES`) with random weights.

    ``device='meta'`` allocates nothing (parameter counts, shapes); any other device builds on
    the meta device and materializes there in ``dtype``, so a 12B FLUX never exists in float32
    on the host. sd15 and sd-turbo keep the constructors' own initialization on the CPU.
    ``shared_weights``: views into one small random buffer instead (:func:`share_random_weights_`), for tests
    that only need the architecture to run.
    """
    import diffusers
    import torch
    from accelerate import init_empty_weights

    from dfquant.generate.pipeline import DTYPES

    if name not in ARCHITECTURES:
        raise DfqError(f"unknown architecture {name!r}; use one of {', '.join(ARCHITECTURES)}")
    dt = getattr(torch, DTYPES[dtype])
    lazy = device == "meta" or shared_weights or name not in ("sd15", "sd-turbo")
    torch.manual_seed(0)
    # torch.device("meta") also puts computed buffers (SD3's 384x384 position table) on meta: instant,
    # but unusable; a real device needs them, so it keeps buffers real and only skips weight memory.
    with torch.device("meta") if device == "meta" else init_empty_weights() if lazy else nullcontext():
        cls, parts = _components(name, full=True)
    for module in parts.values():
        if hasattr(module, "tie_weights"):
            module.tie_weights()  # T5 shares its input embedding; the empty-weights build unties it
    pipe = getattr(diffusers, cls)(**(parts | {"scheduler": parts["scheduler"]()}))
    if shared_weights and device != "meta":
        share_random_weights_(pipe, device, dtype)
    elif lazy and device != "meta":
        materialize_(pipe, device, dtype)
    elif device != "meta":
        pipe.to(device)
        if dt != torch.float32:
            pipe.to(dtype=dt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(name: str, seed: int = 0) -> "DiffusionPipeline":
    """Family ``name`` (one of :data:`TINY`) at toy width, random weights, on the CPU in float32."""
    import diffusers
    import torch

    if name not in TINY:
        raise DfqError(f"unknown family {name!r}; use one of {', '.join(TINY)}")
    torch.manual_seed(seed)
    cls, parts = _components(name, full=False)
    pipe = getattr(diffusers, cls)(**(parts | {"scheduler": parts["scheduler"]()}))
    pipe.set_progress_bar_config(disable=True)
    return pipe
