"""A tiny FLUX.1-shaped pipeline, built locally with fixed seeds (the FLUX twin of personalize/tiny.py).

The component classes and folder layout of black-forest-labs/FLUX.1-dev, so every code path that loads
the real FLUX.1-dev loads this one the same way (`FluxPipeline.from_pretrained`):
- a FluxTransformer2DModel (MM-DiT: double-stream blocks over text and image tokens, then single-stream
  blocks) with the guidance embedding of the guidance-distilled dev model (`guidance_embeds=True`), fed
  16-channel latents packed 2x2 into 64-channel tokens;
- a CLIPTextModel whose pooled output is the transformer's `pooled_projections` and a T5EncoderModel
  whose hidden states are its `encoder_hidden_states`;
- the CLIP BPE tokenizer of tiny.py's generated vocabulary, and a T5 tokenizer generated here from the
  same vocabulary (see `build_t5_tokenizer`: no sentencepiece model and no hub needed);
- an AutoencoderKL with FLUX's 16 latent channels, its scaling and shift factors and no quant convs;
- the FlowMatchEulerDiscreteScheduler configuration FLUX.1-dev ships (shift 3, dynamic shifting).

At 64 px the latents are 8x8 (16 image tokens after packing), like 1024 px -> 128x128 (4096 tokens) in
FLUX.1. It is saved once and from then on only read through `from_pretrained`.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from personalize.io import build_atomically
from personalize.prompts import project_vocabulary
from personalize.tiny import TINY_RESOLUTION, build_tokenizer

TEXT_WIDTH = 32  # CLIP's hidden size (768 in FLUX.1) and T5's d_model (4096)
LATENT_CHANNELS = 16  # FLUX's VAE latents
# vae/config.json of FLUX.1-dev: latents are (z - shift_factor) * scaling_factor
FLUX_LATENT_SCALE, FLUX_LATENT_SHIFT = 0.3611, 0.1159
T5_MAX_LENGTH = 512  # FLUX.1-dev's tokenizer_2 model_max_length (FluxPipeline's max_sequence_length)
_SPACE = "\u2581"  # sentencepiece's word-start marker


def t5_vocabulary(words: list[str]) -> list[tuple[str, float]]:
    """A unigram vocabulary (piece, log-probability) in T5's layout: <pad>, </s>, <unk>, the pieces, then
    the <extra_id_*> sentinels (added by the tokenizer itself).

    Every project word is one piece, "▁word", which outscores spelling it: a word is one piece at -1 against
    "▁" (-2) plus one letter piece per character (-5 each), so any other word falls back to letters, as a rare
    word does in the real T5 vocabulary; a character outside the letters, digits and punctuation is <unk>.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_SPACE, -2.0)]
    pieces += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    seen = {piece for piece, _ in pieces}
    pieces += [(_SPACE + word, -1.0) for word in words if _SPACE + word not in seen]
    return pieces


def build_t5_tokenizer(out_dir: Path) -> T5TokenizerFast:
    """tokenizer_2: a T5 tokenizer (unigram model, T5's pre-tokenizer and `</s>` post-processing) of the
    project's words, padding to 512 as FLUX.1-dev's does."""
    tokenizer = T5TokenizerFast(vocab=t5_vocabulary(project_vocabulary()), model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_flux(out_dir: Path) -> None:
    """Write a tiny FLUX.1-dev-shaped pipeline to `out_dir` in the diffusers folder layout."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir / "tokenizer")
    tokenizer_2 = build_t5_tokenizer(out_dir / "tokenizer_2")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(1)
    # T5 v1.1 (gated GELU, no tied embeddings), as FLUX's T5-XXL encoder
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=TEXT_WIDTH, d_kv=8, d_ff=2 * TEXT_WIDTH, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0,
    ))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=TINY_RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        scaling_factor=FLUX_LATENT_SCALE, shift_factor=FLUX_LATENT_SHIFT, use_quant_conv=False,
        use_post_quant_conv=False, force_upcast=True,
    )
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS,  # 2x2 patches of the latents, packed into channels
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # rotary dims of (text/index, row, column): sum to attention_head_dim
    )
    # scheduler/scheduler_config.json of FLUX.1-dev: the sampler shifts its sigmas by the image's token count
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def ensure_tiny_flux(path: str | os.PathLike) -> Path:
    """Build the tiny FLUX at `path` unless it is already there. Safe when several jobs race to build it."""
    return build_atomically(Path(path), "model_index.json", build_tiny_flux)
