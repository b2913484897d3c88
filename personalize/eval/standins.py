"""Tiny, locally built stand-ins for the evaluation models.

`ensure_tiny_clip(path)` stands in for `openai/clip-vit-base-patch32` and `ensure_tiny_dino(path)` for
`facebook/dino-vits16`. Each is built once with fixed seeds, written in the hub's folder layout
(config + safetensors weights + the same `preprocessor_config.json` format the hub repos carry, and for
CLIP the tokenizer files), and from then on only read through `from_pretrained`, so the metric code
that loads a hub id is exactly the code that loads a stand-in. The weights are random: the numbers
they give mean nothing, but every shape, dtype and code path is the real one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from personalize.io import build_atomically
from personalize.tiny import build_tokenizer

TINY_IMAGE_SIZE = 32  # 32 px, patch 8 -> 16 patches: big enough to be a ViT, small enough for CPU tests

# The values the hub preprocessor configs carry.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_tiny_clip(out_dir: Path) -> None:
    """Write a tiny `CLIPModel` + tokenizer + preprocessor config to `out_dir`."""
    from transformers import CLIPConfig, CLIPModel

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)  # tokenizer files at the root, as in the hub repo
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=32,
    )
    # fork_rng: building a stand-in must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Same format as openai/clip-vit-base-patch32's preprocessor_config.json, written by hand because
    # instantiating CLIPImageProcessor in transformers 5 wants torchvision.
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": TINY_IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "resample": 3, "size": TINY_IMAGE_SIZE,
    }, indent=2))


def build_tiny_dino(out_dir: Path) -> None:
    """Write a tiny `ViTModel` (DINO ViT-S/16 layout, no pooler) + preprocessor config to `out_dir`."""
    from transformers import ViTConfig, ViTModel

    out_dir = Path(out_dir)
    config = ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE, patch_size=8, qkv_bias=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "resample": 2,
        "size": TINY_IMAGE_SIZE,
    }, indent=2))


def ensure_tiny_clip(path: str | os.PathLike) -> Path:
    """Build the tiny CLIP at `path` unless it is already there; returns the path for `from_pretrained`."""
    # preprocessor_config.json is written last, so its presence means the folder is complete.
    return build_atomically(path, "preprocessor_config.json", build_tiny_clip)


def ensure_tiny_dino(path: str | os.PathLike) -> Path:
    """Build the tiny DINO ViT at `path` unless it is already there; returns the path for `from_pretrained`."""
    return build_atomically(path, "preprocessor_config.json", build_tiny_dino)
