"""FLUX.1: CLIP and T5 conditioning of an MM-DiT transformer, trained by flow matching.

What differs from Stable Diffusion (sd.py), computed as diffusers' train_dreambooth_lora_flux.py computes it:
- the prompt: CLIP's pooled output (`pooled_projections`), T5's last hidden states over 512 tokens
  (`encoder_hidden_states`), and the text tokens' positions, all zero (`txt_ids`);
- the latents: the VAE's 16 channels, shifted and scaled, (z - shift_factor) * scaling_factor;
- the denoiser: the transformer (the `unet` slot of Components) sees the latents packed into 2x2 patches,
  one token per patch with its (0, row, column) position (`img_ids`), the timestep t / 1000 and, on
  FLUX.1-dev (`guidance_embeds`), the guidance embedding of 1.0 (the scripts' --guidance_scale=1 of their
  README runs); its prediction is unpacked back to the latents' shape;
- the objective: flow matching on the model's FlowMatchEulerDiscreteScheduler (objectives.py).

This backbone trains the transformer (`unet`: DreamBooth's full fine-tuning, `lora`), LoRA on CLIP
(`text_encoder_lora`, the LoRA script's --train_text_encoder; T5 stays frozen) and a new token in
both text encoders (`token`: textual inversion, and the two-stage method of Zeng et al. on a flow-matching
model; saved as diffusers' advanced FLUX script saves embeddings, `clip_l` and `t5`); methods that train a
text encoder's weights are refused at config time (`supported_trainables`), and prompt-to-prompt editing is
not supported (docs/editing.md says why).
"""

from __future__ import annotations


import torch

from personalize.backbones.base import Backbone, Components, Conditioning
from personalize.backbones.objectives import FlowMatchingObjective, LossSettings, NoiseSettings
from personalize.backbones.sd import _ConfigOnly, check_resolution
from personalize.errors import PersonalizeError
from personalize.models import load_pretrained, resolve_pretrained

MAX_SEQUENCE_LENGTH = 512  # T5 tokens: FluxPipeline's default max_sequence_length and the scripts' --max_sequence_length
TRAIN_GUIDANCE = 1.0  # the guidance embedding's value while training FLUX.1-dev (the scripts' README: --guidance_scale=1)
PATCH = 2  # latents are packed into PATCH x PATCH patches, one transformer token each


class FluxComponents(Components):
    """FLUX's parts: `unet` is the FluxTransformer2DModel; `extra` holds T5 (`tokenizer_2`, `text_encoder_2`)."""

    embedding_keys = ("clip_l", "t5")  # a new token's vectors per encoder, as diffusers' advanced FLUX script saves them


class Flux(Backbone):
    name = "flux"
    pipeline_class = "FluxPipeline"
    # train_dreambooth_lora_flux.py's default --lora_layers: the double-stream blocks' image and text attention
    # projections and feed-forwards (the single-stream blocks' attention has the same to_q/to_k/to_v names)
    default_lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                            "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                            "ff_context.net.0.proj", "ff_context.net.2")
    supports_editing = False  # joint attention over text and image tokens: no cross-attention maps to swap
    supported_trainables = ("unet", "lora", "token", "text_encoder_lora")  # the LoRA scripts' --train_text_encoder: CLIP
    components_class = FluxComponents
    networks = {"text_encoder": "model", "text_encoder_2": "model", "transformer": "diffusion_pytorch_model",
                "vae": "diffusion_pytorch_model"}
    tokenizers = ("tokenizer", "tokenizer_2")
    tokenizer_2_class = "T5TokenizerFast"
    folders = {"unet": "transformer"}  # the pipeline's folder, and the LoRA file's part, of the denoiser

    def check_model(self, method=None) -> None:
        """- It is a FLUX pipeline: a FluxTransformer2DModel in transformer/ and a flow-match scheduler;
        - the method's objective options are flow matching's (objectives.FlowMatchingObjective's checks);
        - `model.resolution` is a multiple of the VAE's downsampling times the 2x2 packing (16 for FLUX);
        - `model.unet_sha256` is null: there is no single UNet file to hash."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        cfg = self.model_cfg
        source = resolve_pretrained(cfg)
        if cfg.get("unet_sha256"):
            raise PersonalizeError(
                f"model.unet_sha256={cfg.unet_sha256}: model '{source}' is a FLUX pipeline (model.backbone=flux), whose "
                "denoiser is a sharded transformer, not unet/diffusion_pytorch_model.safetensors: set model.unet_sha256=null")
        transformer = load_pretrained(_ConfigOnly(FluxTransformer2DModel), source, "transformer", cfg)
        if transformer.get("_class_name") != "FluxTransformer2DModel":
            raise PersonalizeError(
                f"model '{source}' is not a FLUX.1 model (transformer/config.json _class_name="
                f"{transformer.get('_class_name')}, FLUX's is FluxTransformer2DModel): set model.backbone to its "
                "family, or point model.pretrained at a FLUX.1 pipeline")
        scheduler = load_pretrained(FlowMatchEulerDiscreteScheduler, source, "scheduler", cfg)
        if method is not None:
            FlowMatchingObjective(scheduler, method.noise, method.loss)
        vae = load_pretrained(_ConfigOnly(AutoencoderKL), source, "vae", cfg)
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        check_resolution(int(cfg.resolution), vae_factor * PATCH, source,
                         f"its VAE downsamples {vae_factor}x and the transformer packs 2x2 latent patches into one token")

    def load_components(self, dtypes=None) -> FluxComponents:
        """Both tokenizers and text encoders, VAE, transformer and the flow-match training scheduler; `dtypes`
        maps a component's name to its dtype (text_encoder_2 follows text_encoder; the transformer is `unet`).
        Both encoders load frozen: a new token's rows are the only parameters of theirs that train."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        dtypes, cfg, fp32 = dtypes or {}, self.model_cfg, torch.float32
        source = resolve_pretrained(cfg)
        text_dtype = dtypes.get("text_encoder", fp32)
        tokenizer = load_pretrained(CLIPTokenizer, source, "tokenizer", cfg)
        tokenizer_2 = load_pretrained(T5TokenizerFast, source, "tokenizer_2", cfg)
        text_encoder = load_pretrained(CLIPTextModel, source, "text_encoder", cfg, dtype=text_dtype)
        text_encoder_2 = load_pretrained(T5EncoderModel, source, "text_encoder_2", cfg,
                                         dtype=dtypes.get("text_encoder_2", text_dtype))
        text_encoder_2.requires_grad_(False)
        vae = load_pretrained(AutoencoderKL, source, "vae", cfg, dtype=dtypes.get("vae", fp32))
        transformer = load_pretrained(FluxTransformer2DModel, source, "transformer", cfg, dtype=dtypes.get("unet", fp32))
        scheduler = load_pretrained(FlowMatchEulerDiscreteScheduler, source, "scheduler", cfg)
        return FluxComponents(tokenizer, text_encoder, vae, transformer, scheduler,
                              extra={"tokenizer_2": tokenizer_2, "text_encoder_2": text_encoder_2},
                              folders=dict(self.folders))

    def load_pipeline(self, dtype=torch.float32, **components):
        """The stock FluxPipeline; a trained denoiser may be passed as `unet=` (the Components name) or
        `transformer=`."""
        from diffusers import FluxPipeline

        if "unet" in components:
            components["transformer"] = components.pop("unet")
        pipe = load_pretrained(FluxPipeline, resolve_pretrained(self.model_cfg), None, self.model_cfg, dtype=dtype,
                               **components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def objective(self, components, noise=NoiseSettings(), loss=LossSettings()) -> FlowMatchingObjective:
        return FlowMatchingObjective(components.noise_scheduler, noise, loss)

    def latent_distribution(self, vae, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX's latents are (z - shift_factor) * scaling_factor: the mean shifts, the spread only scales."""
        scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        return (mean - shift) * scale, std * scale

    def encode_prompt(self, components, prompts, device) -> Conditioning:
        """CLIP's pooled output and T5's hidden states (padded to 512 tokens), each in its encoder's dtype, and
        the text tokens' positions (zeros, one row of 3 per T5 token, repeated per prompt: batch-first)."""
        prompts = list(prompts)
        clip, t5 = components.text_encoders()
        ids = clip[0](prompts, padding="max_length", max_length=clip[0].model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
        pooled = clip[1](ids, output_hidden_states=False).pooler_output.to(clip[1].dtype)
        ids_2 = t5[0](prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                      return_tensors="pt").input_ids.to(device)
        hidden = t5[1](ids_2)[0].to(t5[1].dtype)
        txt_ids = torch.zeros(len(prompts), hidden.shape[1], 3, device=device, dtype=clip[1].dtype)
        return Conditioning(encoder_hidden_states=hidden, pooled_projections=pooled, txt_ids=txt_ids)

    def denoise(self, components, noisy, timesteps, conditioning) -> torch.Tensor:
        """The transformer's velocity for latents [B, 16, h, w]: packed into (h/2)(w/2) tokens of 64 channels,
        with their positions, t / 1000 and the guidance, then unpacked; in float32."""
        from diffusers import FluxPipeline

        transformer = components.unet
        dtype, device = transformer.dtype, noisy.device
        rows, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), rows, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(rows, height // PATCH, width // PATCH, device, dtype)
        guidance = (torch.full((rows,), TRAIN_GUIDANCE, device=device)
                    if transformer.config.guidance_embeds else None)
        pred = transformer(
            hidden_states=packed, timestep=timesteps.float() / 1000, guidance=guidance,
            pooled_projections=conditioning["pooled_projections"].to(dtype),
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(dtype),
            txt_ids=conditioning["txt_ids"][0].to(dtype),  # every row's text positions are the same zeros
            img_ids=img_ids, return_dict=False)[0]
        vae_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        return FluxPipeline._unpack_latents(pred, height * vae_factor, width * vae_factor, vae_factor).float()
