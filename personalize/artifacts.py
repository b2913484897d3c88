"""A checkpoint folder into a stock pipeline, only through diffusers' own loaders.

Each kind of file is loaded by the Trainable that writes it (personalize.methods.trainables), in their
registration order (a text encoder before its token, a UNet before the adapters on it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from personalize.methods.trainables import TRAINABLES
from personalize.rundir import read_info
from personalize.backbones import load_pipeline


def apply_checkpoint(pipe, ckpt_dir: Path):
    """Load a checkpoint's artifacts into a base-model pipeline.

    Safe to call repeatedly on the same pipeline (evaluating checkpoint after checkpoint): a token that
    is already in the tokenizer gets its embedding row overwritten, earlier LoRA weights are unloaded, and
    Custom Diffusion processors are replaced. A LoRA comes back with the rank and alpha it trained with.
    """
    for cls in TRAINABLES.values():
        cls.load_into(pipe, Path(ckpt_dir))
    return pipe


def load_checkpoint_pipeline(ckpt_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A stock pipeline of the checkpoint's base model with the checkpoint applied."""
    model_cfg = OmegaConf.create(read_info(ckpt_dir).model)
    pipe = load_pipeline(model_cfg, dtype=dtype).to(device)
    return apply_checkpoint(pipe, ckpt_dir)
