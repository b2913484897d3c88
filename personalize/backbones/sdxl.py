"""Stable Diffusion XL: two CLIP text encoders and size/crop micro-conditioning on an SD-style UNet.

What differs from SD 1.x/2.x (sd.py), computed as diffusers' train_dreambooth_lora_sdxl.py computes it:
- the prompt: each encoder's penultimate hidden states, concatenated along the features
  (`encoder_hidden_states`), and the second encoder's projected pooled output (`text_embeds`);
- each training image's time ids, (original height, original width, crop top, crop left, target height,
  target width): the photo's size before any resize, the training square's top-left corner in the photo
  resized to the resolution, and the resolution (`time_ids`, from `image_conditioning`);
- the UNet takes both as `added_cond_kwargs`.
The objective is SD's DDPM objective on the scheduler SDXL ships (read as a DDPMScheduler), the resolution
and prediction-type checks are SD's. `model.vae` loads another VAE in place of the pipeline's own (the
fp16-fix VAE: SDXL's own overflows in float16, so it is kept in float32 where the frozen dtype is float16).

This backbone trains the UNet (`unet`, `lora`), LoRA on both text encoders (`text_encoder_lora`, the LoRA
script's --train_text_encoder) and a new token in both text encoders (`token`: textual
inversion, the two-stage method, pivotal tuning; saved as SDXL embedding files are, `clip_l` and `clip_g`);
methods that train a text encoder's weights are refused at config time (`supported_trainables`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from personalize.backbones.base import Components, Conditioning, ImageInfo
from personalize.backbones.sd import StableDiffusion, _ConfigOnly
from personalize.errors import PersonalizeError
from personalize.models import is_local_path, load_pretrained, resolve_pretrained, verify_unet

log = logging.getLogger(__name__)


class SDXLComponents(Components):
    """SDXL's parts: `extra` holds the second tokenizer and text encoder (`tokenizer_2`, `text_encoder_2`)."""

    embedding_keys = ("clip_l", "clip_g")  # a new token's vectors per encoder: the SDXL embedding files' keys
    lora_text_encoders = ("text_encoder", "text_encoder_2")  # train_dreambooth_lora_sdxl.py --train_text_encoder


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # as train_dreambooth_lora_sdxl.py
    supports_editing = True  # prompt-to-prompt and null-text inversion: its conditioning is the edit_* methods below
    supported_trainables = ("unet", "lora", "token", "text_encoder_lora")  # text_encoder_lora: both CLIPs
    components_class = SDXLComponents
    networks = {**StableDiffusion.networks, "text_encoder_2": "model"}  # CLIP ViT-L and OpenCLIP ViT-bigG
    tokenizers = ("tokenizer", "tokenizer_2")

    def check_model(self, method=None) -> None:
        """SD's checks (prediction type, timestep range, resolution), then: the UNet takes SDXL's added
        conditioning, and a `model.vae` given is an AutoencoderKL that can be found."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        super().check_model(method)
        cfg = self.model_cfg
        source = resolve_pretrained(cfg)
        unet = load_pretrained(_ConfigOnly(UNet2DConditionModel), source, "unet", cfg)
        if unet.get("addition_embed_type") != "text_time":
            raise PersonalizeError(
                f"model '{source}' is not an SDXL model (unet/config.json addition_embed_type="
                f"{unet.get('addition_embed_type')}, SDXL's is text_time): set model.backbone=sd for SD 1.x/2.x, or "
                "point model.pretrained at an SDXL pipeline")
        if cfg.get("vae"):
            load_pretrained(_ConfigOnly(AutoencoderKL), self._vae_source(), None)

    def _vae_source(self) -> str:
        vae = str(self.model_cfg.vae)
        return str(Path(vae).expanduser()) if is_local_path(vae) else vae

    def _load_vae(self, dtype: torch.dtype, source: str) -> torch.nn.Module:
        """The pipeline's VAE or `model.vae`'s, in `dtype`; in float32 instead of float16 where its config
        says it must be upcast (SDXL's own VAE overflows in float16; diffusers' SDXL script keeps it fp32)."""
        from diffusers import AutoencoderKL

        cfg = self.model_cfg
        where = (self._vae_source(), None, None) if cfg.get("vae") else (source, "vae", cfg)
        if dtype == torch.float16 and load_pretrained(_ConfigOnly(AutoencoderKL), *where).get("force_upcast", False):
            log.info("the VAE overflows in float16 (force_upcast): kept in float32; model.vae=madebyollin/"
                     "sdxl-vae-fp16-fix runs in float16")
            dtype = torch.float32
        return load_pretrained(AutoencoderKL, *where, dtype=dtype)

    def load_components(self, dtypes=None) -> SDXLComponents:
        """Both tokenizers and text encoders, VAE, UNet and the DDPM training scheduler; `dtypes` maps a
        component's name to its dtype (text_encoder_2 follows text_encoder). Both encoders load frozen: a new
        token's rows are the only parameters of theirs that train."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        dtypes, cfg, fp32 = dtypes or {}, self.model_cfg, torch.float32
        source = resolve_pretrained(cfg)
        text_dtype = dtypes.get("text_encoder", fp32)
        tokenizer = load_pretrained(CLIPTokenizer, source, "tokenizer", cfg)
        tokenizer_2 = load_pretrained(CLIPTokenizer, source, "tokenizer_2", cfg)
        text_encoder = load_pretrained(CLIPTextModel, source, "text_encoder", cfg, dtype=text_dtype)
        text_encoder_2 = load_pretrained(CLIPTextModelWithProjection, source, "text_encoder_2", cfg,
                                         dtype=dtypes.get("text_encoder_2", text_dtype))
        text_encoder_2.requires_grad_(False)
        vae = self._load_vae(dtypes.get("vae", fp32), source)
        unet = load_pretrained(UNet2DConditionModel, source, "unet", cfg, dtype=dtypes.get("unet", fp32))
        verify_unet(source, cfg)  # after the load, which is what downloads the file
        noise_scheduler = load_pretrained(DDPMScheduler, source, "scheduler", cfg)  # SDXL ships Euler's config
        return SDXLComponents(tokenizer, text_encoder, vae, unet, noise_scheduler,
                              extra={"tokenizer_2": tokenizer_2, "text_encoder_2": text_encoder_2})

    def load_pipeline(self, dtype=torch.float32, **components):
        from diffusers import StableDiffusionXLPipeline

        source = resolve_pretrained(self.model_cfg)
        if self.model_cfg.get("vae") and "vae" not in components:
            components["vae"] = self._load_vae(dtype, source)
        # no invisible watermark (the stock pipeline adds one where the package is installed): it would
        # change the evaluated images
        pipe = load_pretrained(StableDiffusionXLPipeline, source, None, self.model_cfg, dtype=dtype,
                               add_watermarker=False, **components)
        if "unet" not in components:  # a UNet passed in replaces the base one: its file is not what runs
            verify_unet(source, self.model_cfg)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompt(self, components, prompts, device) -> Conditioning:
        """Each encoder's penultimate hidden states side by side, and the second encoder's pooled projection."""
        hidden, pooled = [], None
        for tokenizer, encoder in components.text_encoders():
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = getattr(output, "text_embeds", None)  # CLIPTextModelWithProjection's: the last encoder's
        return Conditioning(encoder_hidden_states=torch.cat(hidden, dim=-1), text_embeds=pooled)

    def image_conditioning(self, images: list[ImageInfo], device) -> Conditioning:
        """Each row's time ids: original size, crop top-left, target size (the resolution, square)."""
        target = (int(self.model_cfg.resolution),) * 2
        rows = [[*image.original_size, *image.crop_top_left, *target] for image in images]
        return Conditioning(time_ids=torch.tensor(rows, dtype=torch.float32, device=device))

    def denoise(self, components, noisy, timesteps, conditioning) -> torch.Tensor:
        unet = components.unet
        added = {key: conditioning[key].to(unet.dtype) for key in ("text_embeds", "time_ids")}
        return unet(noisy.to(unet.dtype), timesteps, conditioning["encoder_hidden_states"].to(unet.dtype),
                    added_cond_kwargs=added).sample.float()

    # -- editing: the conditioning StableDiffusionXLPipeline.__call__ builds, row by row
    def edit_tokenizers(self, pipe) -> list:
        """Both CLIP tokenizers: each encoder's hidden states of token position i are concatenated into the i-th
        cross-attention key, so the two must place every word at the same positions (they share a vocabulary)."""
        return [pipe.tokenizer, pipe.tokenizer_2]

    def edit_time_ids(self, rows: int, height: int, width: int, dtype, device) -> torch.Tensor:
        """The stock pipeline's default time ids of a height x width sample: original size = target size, no crop."""
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(rows, 1)

    @torch.no_grad()
    def edit_conditioning(self, pipe, prompts, height, width) -> Conditioning:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return Conditioning(encoder_hidden_states=embeds, text_embeds=pooled,
                            time_ids=self.edit_time_ids(len(prompts), height, width, embeds.dtype, embeds.device))

    def edit_unconditional(self, pipe, height, width) -> Conditioning:
        """Zeros for both text tensors where the pipeline's config says `force_zeros_for_empty_prompt` (SDXL base
        1.0 does), else the empty prompt's encoding; the sample's own time ids either way (the pipeline's
        negative_original_size/negative_target_size default to the sample's)."""
        empty = self.edit_conditioning(pipe, [""], height, width)
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            empty = empty | {key: torch.zeros_like(empty[key]) for key in ("encoder_hidden_states", "text_embeds")}
        return empty

    def null_text_keys(self) -> tuple[str, ...]:
        """The unconditional prompt's per-token embeddings and its pooled embedding: together they are what the
        "null text" is on SDXL (the stock pipeline zeroes both). The pooled one enters every ResNet block through
        the time embedding, a global correction the per-token embeddings can only make through attention: on the
        tiny SDXL and data/samples/dog, fitting both brings the guided sample closer to the photo's latent than
        fitting the per-token embeddings alone (tests/test_edit_sdxl.py).
        The time ids describe the image, not the text: they stay the sample's size."""
        return ("encoder_hidden_states", "text_embeds")

    def denoiser_kwargs(self, conditioning) -> dict:
        return {"encoder_hidden_states": conditioning["encoder_hidden_states"],
                "added_cond_kwargs": {key: conditioning[key] for key in ("text_embeds", "time_ids")}}
