"""A tiny Stable-Diffusion-shaped pipeline, built locally with fixed seeds.

Same component classes and folder layout as a hub SD checkpoint (UNet2DConditionModel with
cross-attention, AutoencoderKL with the 8x downsampling of SD, CLIPTextModel, a CLIP BPE tokenizer),
so every code path that loads `stabilityai/stable-diffusion-2-1-base` loads this one the same way.
It is saved once to a folder and from then on only read through `from_pretrained`.

The tokenizer is a real CLIP BPE tokenizer with a small generated vocabulary: every byte (alone and
word-final), plus one whole-word token for each word the project's prompts use. Any other word falls
back to letters, exactly as a rare word does in the real CLIP vocabulary.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from personalize.io import build_atomically
from personalize.prompts import project_vocabulary

TINY_RESOLUTION = 64  # 64 px images -> 8x8 latents, like 512 -> 64 in SD
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-tokenized word (the last symbol carries the word-end marker)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges under which each of `words` is a single token.

    Merges are appended greedily: while a word still splits, merge its first two pieces. A merge added
    later has a larger rank, so it can never fire inside a word that earlier merges already completed.
    """
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(pieces := _bpe(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
    vocab_list += [_BOS, _EOS]
    vocab: dict[str, int] = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer(out_dir: Path):
    vocab, merges = tokenizer_files(project_vocabulary())
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges,
        bos_token=_BOS, eos_token=_EOS, unk_token=_EOS, pad_token=_EOS, model_max_length=77,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_sd(out_dir: Path) -> None:
    """Write a tiny SD pipeline to `out_dir` in the diffusers folder layout."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir / "tokenizer")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=TINY_RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    # The noise schedule of SD 1.x/2.x (epsilon prediction, scaled-linear betas).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def ensure_tiny_sd(path: str | os.PathLike) -> Path:
    """Build the tiny SD at `path` unless it is already there. Safe when several jobs race to build it."""
    return build_atomically(Path(path), "model_index.json", build_tiny_sd)
