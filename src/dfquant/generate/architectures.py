"""Random-weight Stable Diffusion pipelines with the real architectures (no download).

The hub configs of SD v1.5 and SD-Turbo (an SD 2.1 distillation) written out here, so that
the full-size code path can be built and run offline: the offline tests construct them and
run one step at a tiny resolution, and the GPU benchmark times them at 512 px. Weights are
random, so the pictures are noise; shapes, parameter counts and FLOPs are those of the real
models. The tokenizer is the mini generator's (CLIP BPE, 77 tokens): its ids are a subset
of the 49408-token CLIP vocabulary, which is all the text encoder needs to run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              steps_offset=1)

# unet / text encoder / scheduler settings per family; the VAE (AutoencoderKL, 4 latent channels) is shared.
ARCHITECTURES: dict[str, dict] = {
    "sd15": {
        "unet": dict(attention_head_dim=8, cross_attention_dim=768),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     hidden_act="quick_gelu", projection_dim=768),
        "scheduler": ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False)),
    },
    "sd-turbo": {
        "unet": dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                     hidden_act="gelu", projection_dim=512),
        "scheduler": ("EulerDiscreteScheduler", dict(timestep_spacing="trailing")),
    },
}


def random_pipeline(family: str = "sd15", dtype: str = "float32", device: str = "cpu") -> "StableDiffusionPipeline":
    """A ``StableDiffusionPipeline`` of ``family`` ('sd15' or 'sd-turbo') with random weights."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dfquant.errors import DfqError
    from dfquant.generate.pipeline import DTYPES, mini_generator_dir

    if family not in ARCHITECTURES:
        raise DfqError(f"unknown architecture {family!r}; use one of {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[family]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), down_block_types=_DOWN,
                                up_block_types=_UP, norm_num_groups=32, **arch["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **arch["text"]))
    tokenizer = CLIPTokenizer.from_pretrained(mini_generator_dir() / "tokenizer", model_max_length=77)
    name, extra = arch["scheduler"]
    scheduler = getattr(diffusers, name)(**_SCHED, **extra)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(device)
    if DTYPES[dtype] != "float32":
        pipe.to(dtype=getattr(torch, DTYPES[dtype]))
    pipe.set_progress_bar_config(disable=True)
    return pipe
