"""Stable Diffusion 1.x/2.x: a CLIP text encoder's hidden states condition a UNet; DDPM ε or v objective."""

from __future__ import annotations

import torch

from personalize.backbones.base import Backbone, Components, Conditioning
from personalize.backbones.objectives import DDPMObjective, LossSettings, NoiseSettings
from personalize.errors import PersonalizeError
from personalize.models import load_pretrained, resolve_pretrained, verify_unet, verify_unet_if_present


class _ConfigOnly:
    """A `load_pretrained` loader that reads a component's config.json alone (bytes, not weights)."""

    def __init__(self, model_class):
        self.model_class = model_class

    def from_pretrained(self, source, **kwargs):
        kwargs.pop("variant", None)  # names a weights file; the config is shared by every variant
        return self.model_class.load_config(source, **kwargs)


def check_resolution(resolution: int, multiple: int, source: str, why: str) -> None:
    """`model.resolution` must be a multiple of the model's total downsampling (`why` says where it comes from),
    so latents, every denoiser level (or patch grid) and the skip connections have whole sizes; else one line
    with the nearest valid values."""
    if resolution % multiple:
        lower = resolution // multiple * multiple
        choices = f"{lower} or {lower + multiple}" if lower else str(multiple)
        raise PersonalizeError(f"model.resolution={resolution} does not suit model '{source}': use a multiple of "
                               f"{multiple} ({why}), e.g. {choices}")


class StableDiffusion(Backbone):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' examples
    supports_editing = True
    networks = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
    tokenizers = ("tokenizer",)

    def check_model(self, method=None) -> None:
        """- It predicts what the objective can train (scheduler/scheduler_config.json `prediction_type`), and
          the method's timestep range fits its schedule.
        - `model.resolution` is a multiple of its total downsampling: the VAE's 2**(len(block_out_channels) - 1)
          (diffusers' `vae_scale_factor`, 8 for SD) times the UNet's 2**(down blocks - 1) (8 for SD: 64 in all),
          so latents and every UNet level have whole sizes and the skip connections line up.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        cfg = self.model_cfg
        source = resolve_pretrained(cfg)
        scheduler = load_pretrained(DDPMScheduler, source, "scheduler", cfg)
        kind = scheduler.config.get("prediction_type", "epsilon")
        if kind not in DDPMObjective.PREDICTION_TYPES:
            raise PersonalizeError(
                f"model '{source}' has prediction_type={kind} (scheduler/scheduler_config.json), which this training "
                f"cannot target: use a model whose scheduler predicts one of {', '.join(DDPMObjective.PREDICTION_TYPES)}"
            )
        if method is not None:  # the objective's own checks (the timestep range against this schedule)
            DDPMObjective(scheduler, method.noise, method.loss)
        vae = load_pretrained(_ConfigOnly(AutoencoderKL), source, "vae", cfg)
        unet = load_pretrained(_ConfigOnly(UNet2DConditionModel), source, "unet", cfg)
        verify_unet_if_present(source, cfg)  # cached weights that do not match model.unet_sha256 fail here
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        unet_factor = 2 ** (len(unet["down_block_types"]) - 1)
        check_resolution(int(cfg.resolution), vae_factor * unet_factor, source,
                         f"its VAE downsamples {vae_factor}x, its UNet {unet_factor}x more")

    def load_components(self, dtypes=None) -> Components:
        """Tokenizer, text encoder, VAE, UNet and the DDPM training scheduler; `dtypes` maps a component's
        name to its dtype (default float32), so frozen parts load directly in half precision."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        dtypes, cfg, fp32 = dtypes or {}, self.model_cfg, torch.float32
        source = resolve_pretrained(cfg)
        tokenizer = load_pretrained(CLIPTokenizer, source, "tokenizer", cfg)
        text_encoder = load_pretrained(CLIPTextModel, source, "text_encoder", cfg, dtype=dtypes.get("text_encoder", fp32))
        vae = load_pretrained(AutoencoderKL, source, "vae", cfg, dtype=dtypes.get("vae", fp32))
        unet = load_pretrained(UNet2DConditionModel, source, "unet", cfg, dtype=dtypes.get("unet", fp32))
        verify_unet(source, cfg)  # after the load, which is what downloads the file
        noise_scheduler = load_pretrained(DDPMScheduler, source, "scheduler", cfg)
        return Components(tokenizer, text_encoder, vae, unet, noise_scheduler)

    def load_pipeline(self, dtype=torch.float32, **components):
        from diffusers import StableDiffusionPipeline

        source = resolve_pretrained(self.model_cfg)
        pipe = load_pretrained(
            StableDiffusionPipeline, source, None, self.model_cfg, dtype=dtype,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components,
        )
        if "unet" not in components:  # a UNet passed in replaces the base one: its file is not what runs
            verify_unet(source, self.model_cfg)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def objective(self, components, noise=NoiseSettings(), loss=LossSettings()) -> DDPMObjective:
        return DDPMObjective(components.noise_scheduler, noise, loss)

    def encode_prompt(self, components, prompts, device) -> Conditioning:
        tokenizer = components.tokenizer
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return Conditioning(encoder_hidden_states=components.text_encoder(ids)[0])

    def denoise(self, components, noisy, timesteps, conditioning) -> torch.Tensor:
        unet = components.unet
        return unet(noisy.to(unet.dtype), timesteps, conditioning["encoder_hidden_states"].to(unet.dtype)).sample.float()


    # -- editing: the conditioning StableDiffusionPipeline.__call__ builds (no size conditioning: SD sees pixels only)
    def edit_tokenizers(self, pipe) -> list:
        return [pipe.tokenizer]

    @torch.no_grad()
    def edit_conditioning(self, pipe, prompts, height, width) -> Conditioning:
        embeds, _ = pipe.encode_prompt(list(prompts), pipe.device, 1, False)
        return Conditioning(encoder_hidden_states=embeds)

    def edit_unconditional(self, pipe, height, width) -> Conditioning:
        """The empty prompt's embedding: what the stock pipeline guides with when negative_prompt is None."""
        return self.edit_conditioning(pipe, [""], height, width)

    def denoiser_kwargs(self, conditioning) -> dict:
        return {"encoder_hidden_states": conditioning["encoder_hidden_states"]}
