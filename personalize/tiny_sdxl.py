"""A tiny SDXL-shaped pipeline, built locally with fixed seeds (the SDXL twin of personalize/tiny.py).

The component classes and folder layout of stabilityai/stable-diffusion-xl-base-1.0, so every code path
that loads the real SDXL loads this one the same way (`StableDiffusionXLPipeline.from_pretrained`):
- a UNet2DConditionModel with SDXL's added conditioning (`addition_embed_type="text_time"`: the pooled
  text embedding and the six micro-conditioning time ids, each id embedded in `addition_time_embed_dim`
  sinusoids), linear attention projections and a deeper transformer stack in the lower block;
- two CLIP text encoders whose penultimate hidden states are concatenated into the cross-attention
  context (`CLIPTextModel`, then `CLIPTextModelWithProjection`, which also gives the pooled embedding);
- two CLIP BPE tokenizers from tiny.py's generated vocabulary; the second pads with "!" as SDXL's does;
- an AutoencoderKL with SD's 8x downsampling and SDXL's latent scaling factor;
- the EulerDiscreteScheduler configuration SDXL ships (training reads it as a DDPMScheduler, as the
  diffusers SDXL scripts do).

At 64 px the latents are 8x8, like 1024 px -> 128x128 in SDXL. It is saved once and from then on only
read through `from_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from personalize.io import build_atomically
from personalize.prompts import project_vocabulary
from personalize.tiny import TINY_RESOLUTION, build_tokenizer, tokenizer_files

TEXT_WIDTH = 32  # hidden size of each text encoder (768 and 1280 in SDXL)
TIME_ID_WIDTH = 8  # addition_time_embed_dim (256 in SDXL)
SDXL_LATENT_SCALE = 0.13025  # SDXL's VAE scaling_factor (SD's is 0.18215)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_PAD_2 = "!"  # SDXL's tokenizer_2 pads with "!" (id 0), not with the end token as tokenizer does


def build_second_tokenizer(out_dir: Path) -> CLIPTokenizer:
    """tokenizer_2: the same vocabulary as the first, padding with "!" as SDXL's second tokenizer does."""
    vocab, merges = tokenizer_files(project_vocabulary())
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=_BOS, eos_token=_EOS, unk_token=_EOS,
                              pad_token=_PAD_2, model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH, hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl(out_dir: Path) -> None:
    """Write a tiny SDXL pipeline to `out_dir` in the diffusers folder layout."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir / "tokenizer")
    tokenizer_2 = build_second_tokenizer(out_dir / "tokenizer_2")
    # SDXL's first encoder is CLIP ViT-L (quick_gelu), the second OpenCLIP ViT-bigG (gelu) with a projection
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer, "quick_gelu"))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu"))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=TINY_RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        scaling_factor=SDXL_LATENT_SCALE, force_upcast=True,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TEXT_WIDTH,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_WIDTH,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * TIME_ID_WIDTH,  # pooled embedding + 6 time ids
    )
    # scheduler/scheduler_config.json of stable-diffusion-xl-base-1.0 (epsilon, scaled-linear betas)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
        timestep_spacing="leading", steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def ensure_tiny_sdxl(path: str | os.PathLike) -> Path:
    """Build the tiny SDXL at `path` unless it is already there. Safe when several jobs race to build it."""
    return build_atomically(Path(path), "model_index.json", build_tiny_sdxl)
