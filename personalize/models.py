"""Load a Stable Diffusion model (hub id or local folder) into its components.

Every model, the locally built tiny one included, goes through the same `from_pretrained` calls, so
what the tests exercise is what a real run does. A hub model that is neither cached nor downloadable
is a one-line `PersonalizeError` naming the model and how to fetch it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from personalize.errors import PersonalizeError


@dataclass
class SDComponents:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any  # the training (DDPM) scheduler, configured like the model's own


def resolve_pretrained(model_cfg) -> str:
    """The folder or hub id to load; builds the tiny model on first use."""
    pretrained = str(model_cfg.pretrained)
    if model_cfg.get("tiny", False):
        from personalize.tiny import ensure_tiny_sd

        return str(ensure_tiny_sd(pretrained))
    if Path(pretrained).exists() or pretrained.startswith((".", "/", "~")):
        if not (Path(pretrained).expanduser() / "model_index.json").exists():
            raise PersonalizeError(
                f"model folder '{pretrained}' has no model_index.json: point model.pretrained at a diffusers "
                "pipeline folder (e.g. one written by `save_pretrained`) or at a hub id"
            )
        return str(Path(pretrained).expanduser())
    return pretrained


def _hub_kwargs(model_cfg) -> dict:
    if model_cfg is None:
        return {}
    return {key: model_cfg[key] for key in ("revision", "variant") if model_cfg.get(key)}


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_pretrained(loader, source: str, subfolder: str | None = None, model_cfg=None, **extra):
    """`loader.from_pretrained` that first tries the local cache, so no network is touched when cached.

    A model neither cached nor downloadable is one `PersonalizeError` naming it and how to fetch it.
    `model_cfg` (optional) brings the revision and variant.
    """
    kwargs = dict(_hub_kwargs(model_cfg), **extra)
    if subfolder:
        kwargs["subfolder"] = subfolder
    if Path(source).exists():
        return loader.from_pretrained(source, **kwargs)
    if source.startswith(("/", ".", "~")):  # a folder, not a hub id: the hub cannot help
        raise PersonalizeError(f"model folder '{source}' does not exist: point the config at a folder written "
                               "by save_pretrained, or at a hub id")
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_error:
        if _is_offline():
            raise model_not_available(source, model_cfg) from cached_error
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise model_not_available(source, model_cfg) from error


def model_not_available(source: str, model_cfg=None) -> PersonalizeError:
    revision = f" --revision {model_cfg.revision}" if model_cfg is not None and model_cfg.get("revision") else ""
    return PersonalizeError(
        f"model '{source}' is not in the local Hugging Face cache and the hub cannot be reached: run "
        f"`hf download {source}{revision}` on a machine with network (or set model.pretrained to a local "
        "diffusers folder; `model=tiny` runs offline)"
    )


def load_components(model_cfg, dtypes: dict[str, torch.dtype] | None = None) -> SDComponents:
    """Tokenizer, text encoder, VAE, UNet and the DDPM training scheduler of an SD 1.x/2.x model.

    `dtypes` maps component name -> dtype (default float32), so frozen parts load directly in half precision.
    """
    dtypes = dtypes or {}
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_pretrained(model_cfg)
    tokenizer = load_pretrained(CLIPTokenizer, source, "tokenizer", model_cfg)
    fp32 = torch.float32
    text_encoder = load_pretrained(CLIPTextModel, source, "text_encoder", model_cfg, dtype=dtypes.get("text_encoder", fp32))
    vae = load_pretrained(AutoencoderKL, source, "vae", model_cfg, dtype=dtypes.get("vae", fp32))
    unet = load_pretrained(UNet2DConditionModel, source, "unet", model_cfg, dtype=dtypes.get("unet", fp32))
    noise_scheduler = load_pretrained(DDPMScheduler, source, "scheduler", model_cfg)
    return SDComponents(tokenizer, text_encoder, vae, unet, noise_scheduler)


def load_pipeline(model_cfg, dtype: torch.dtype = torch.float32, **components):
    """A stock `StableDiffusionPipeline` of the base model; `components` replace loaded ones (e.g. unet=)."""
    from diffusers import StableDiffusionPipeline

    source = resolve_pretrained(model_cfg)
    pipe = load_pretrained(
        StableDiffusionPipeline, source, None, model_cfg, dtype=dtype,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Sampler names of the configs (samples/class_images/eval.sampler) -> diffusers scheduler class; the
# config schema checks the names against these before anything runs.
SAMPLERS = {
    "dpm_multistep": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def make_sampler(pipe, name: str):
    """Swap the pipeline's scheduler for a named sampler built from the model's own schedule config."""
    import diffusers

    classes = SAMPLERS
    if name not in classes:
        raise PersonalizeError(f"unknown sampler '{name}': choose one of {', '.join(classes)}")
    pipe.scheduler = getattr(diffusers, classes[name]).from_config(pipe.scheduler.config)
    return pipe
