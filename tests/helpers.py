"""Assertions shared by the method tests."""

from __future__ import annotations

from pathlib import Path

import torch


def snapshot(module) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of every weight of a Personalizer, by component (the new token's row kept apart)."""
    parts = {
        "vae": module.vae.named_parameters(),
        "text_encoder": ((n, p) for n, p in module.text_encoder.named_parameters() if not n.endswith("new_rows")),
        "unet": ((n, p) for n, p in module.unet.named_parameters() if "lora_" not in n),
        "lora": ((n, p) for n, p in module.unet.named_parameters() if "lora_" in n),
        "token": ([("new_rows", module.token_embedding.new_rows)] if module.token_embedding is not None else []),
    }
    return {part: {n: p.detach().clone() for n, p in params} for part, params in parts.items()}


def changed_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Share of tensors that differ at all (0.0 means every tensor is bit-identical)."""
    if not before:
        return 0.0
    return sum(not torch.equal(before[n], after[n]) for n in before) / len(before)


def stock_pipeline(base_dir: Path, ckpt: Path):
    """Load a checkpoint exactly as a diffusers user would, without any personalize code."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    if (ckpt / "text_encoder").is_dir():
        pipe.text_encoder = CLIPTextModel.from_pretrained(ckpt / "text_encoder")
    if (ckpt / "learned_embeds.safetensors").exists():
        pipe.load_textual_inversion(ckpt)
    if (ckpt / "unet").is_dir():
        pipe.unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    if (ckpt / "pytorch_lora_weights.safetensors").exists():
        pipe.load_lora_weights(ckpt)
    pipe.set_progress_bar_config(disable=True)
    return pipe
