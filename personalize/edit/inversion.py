"""DDIM sampling, DDIM inversion and null-text inversion (after Mokady et al., 2022).

One DDIM update (`ddim_move`) serves both directions, so sampling exactly retraces the inversion's
schedule. The loop is our own (not `pipe.__call__`) because editing needs what the pipeline does not
offer: a joint batch of prompts with attention control, a per-step unconditional embedding, and a
latent callback between steps.

Guided DDIM inversion drifts: inverting with the prompt alone (guidance 1) and then sampling with
guidance 7.5 does not come back to the photo. Null-text inversion fixes that by optimising, step by
step, the unconditional ("") embedding so the guided trajectory follows the guidance-1 inversion.

Everything that differs between model families goes through the pipeline's Backbone (`pipeline_backbone`):
the conditioning of a prompt and of the unconditional row at the sampling size (`Conditioning`: SD's
`encoder_hidden_states`; SDXL adds the pooled `text_embeds` and the `time_ids`), how the UNet takes it
(`Denoiser`), which of the unconditional tensors null-text inversion optimises, and the tokenizers whose
token positions prompt-to-prompt maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image

from personalize.backbones import BACKBONES, Backbone, Conditioning
from personalize.edit.attention import AttentionStore, controlled_attention

Cond = Conditioning | torch.Tensor  # a bare tensor is SD's conditioning: the encoder_hidden_states alone
Embeds = Cond | Sequence[Cond]


def as_conditioning(conditioning: Cond | dict) -> Conditioning:
    if isinstance(conditioning, Conditioning):
        return conditioning
    if isinstance(conditioning, dict):
        return Conditioning(conditioning)
    return Conditioning(encoder_hidden_states=conditioning)


def pipeline_backbone(pipe) -> Backbone:
    """The Backbone whose stock pipeline class `pipe` is (or derives from); it only answers for the pipeline,
    so it carries no model config."""
    for klass in type(pipe).__mro__:
        for cls in BACKBONES.values():
            if cls.pipeline_class == klass.__name__:
                return cls(None)
    raise ValueError(f"{type(pipe).__name__} is not the pipeline of a backbone here: pass one of "
                     + ", ".join(cls.pipeline_class for cls in BACKBONES.values()))


@dataclass
class Denoiser:
    """A pipeline's UNet and the Backbone that says how a Conditioning enters it (SDXL: added_cond_kwargs)."""

    unet: Any
    backbone: Backbone

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def __call__(self, x: torch.Tensor, t: int, conditioning: Cond) -> torch.Tensor:
        kwargs = self.backbone.denoiser_kwargs(as_conditioning(conditioning).to(self.unet.dtype))
        return self.unet(x.to(self.unet.dtype), t, **kwargs).sample


# --------------------------------------------------------------------------------------------------
# Scheduler arithmetic


def make_scheduler(config, num_inference_steps: int):
    """A DDIM scheduler from any SD scheduler config, with its timesteps set."""
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def alpha_bar(scheduler, t: int) -> torch.Tensor:
    """Cumulative alpha at timestep t; t < 0 means the clean end of the schedule."""
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def levels(scheduler) -> list[int]:
    """Timesteps from noisiest to cleanest, then -1 for the clean latent: level k is reached after k steps."""
    return [int(t) for t in scheduler.timesteps] + [-1]


def ddim_move(scheduler, model_output: torch.Tensor, x: torch.Tensor, t_model: int, t_from: int,
              t_to: int) -> torch.Tensor:
    """Deterministic DDIM update of `x` from noise level `t_from` to `t_to` (either direction).

    `model_output` was predicted at timestep `t_model` and is turned into a noise estimate with that
    timestep's alpha (epsilon, v or sample prediction: SD 2.x 768 uses v). Then
    x0 = (x - sqrt(1-a_from) eps) / sqrt(a_from) and x_to = sqrt(a_to) x0 + sqrt(1-a_to) eps.
    """
    kind = scheduler.config.prediction_type
    a_model = alpha_bar(scheduler, t_model).to(x.device, torch.float32)
    out, xf = model_output.float(), x.float()
    if kind == "epsilon":
        eps = out
    elif kind == "v_prediction":
        eps = a_model.sqrt() * out + (1 - a_model).sqrt() * xf
    elif kind == "sample":
        eps = (xf - a_model.sqrt() * out) / (1 - a_model).sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    a_from = alpha_bar(scheduler, t_from).to(x.device, torch.float32)
    a_to = alpha_bar(scheduler, t_to).to(x.device, torch.float32)
    x0 = (xf - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return (a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps).to(x.dtype)


def guided_output(denoiser: Denoiser, x: torch.Tensor, t: int, cond: Cond, uncond: Cond | None,
                  guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided UNet output for a batch; the UNet batch is [uncond..., cond...], each row of
    every conditioning tensor (SDXL's pooled embeddings and time ids too) beside its latent."""
    cond = as_conditioning(cond)
    if uncond is None or guidance_scale == 1.0:
        return denoiser(x, t, cond)
    uncond = as_conditioning(uncond)
    uncond = uncond.expand(x.shape[0]) if uncond.rows == 1 else uncond
    out = denoiser(torch.cat([x, x]), t, Conditioning.cat([uncond, cond]))
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, scheduler, latents: torch.Tensor, cond: Cond, uncond: Embeds | None,
                guidance_scale: float = 7.5, controller: AttentionStore | None = None,
                callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run DDIM from `latents` [n, C, h, w] (one row per prompt in `cond`) to clean latents.

    `uncond` is one conditioning (1 or n rows) for every step, or a list of them, one per step (null-text).
    With a `controller`, all attention layers are routed through it for the duration, and its
    `step_end` (local blend) runs after each step, before `callback(step, latents) -> latents`.
    """
    steps = levels(scheduler)
    per_step = isinstance(uncond, (list, tuple))
    if per_step and len(uncond) != len(steps) - 1:
        raise ValueError(f"got {len(uncond)} unconditional embeddings for {len(steps) - 1} steps")
    use_cfg = uncond is not None and guidance_scale != 1.0

    def loop() -> torch.Tensor:
        x = latents
        for i in range(len(steps) - 1):
            u = uncond[i] if per_step else uncond
            out = guided_output(denoiser, x, steps[i], cond, u, guidance_scale)
            x = ddim_move(scheduler, out, x, steps[i], steps[i], steps[i + 1])
            if controller is not None:
                x = controller.step_end(x)
            if callback is not None:
                x = callback(i, x)
        return x

    if controller is None:
        return loop()
    controller.begin(len(steps) - 1, tuple(latents.shape[-2:]), latents.shape[0], use_cfg)
    with controlled_attention(denoiser.unet, controller):
        return loop()


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, scheduler, z0: torch.Tensor, cond: Cond) -> list[torch.Tensor]:
    """DDIM inversion with the prompt alone: latents at every level, [x_T, ..., x_0 = z0].

    The noise at level k is predicted from the latent at level k+1 (the one we have) with timestep t_k,
    the usual approximation that makes DDIM invertible step by step.
    """
    steps = levels(scheduler)
    trajectory = [z0]
    x = z0
    for k in range(len(steps) - 2, -1, -1):
        out = denoiser(x, steps[k], cond)
        x = ddim_move(scheduler, out, x, steps[k], steps[k + 1], steps[k])
        trajectory.append(x)
    return trajectory[::-1]


@dataclass
class NullTextInversion:
    """Everything needed to regenerate (and edit) a real photo with guidance."""

    latent: torch.Tensor  # x_T, [1, C, h, w]
    uncond: list[Conditioning]  # one optimised unconditional conditioning per step, one row
    trajectory: list[torch.Tensor]  # the guidance-1 DDIM inversion, [x_T, ..., x_0]
    losses: list[float]  # final inner loss per step
    prompt: str = ""
    num_inference_steps: int = 0
    guidance_scale: float = 7.5
    image: Image.Image | None = None  # the photo as it was encoded (cropped and resized)


def null_text_inversion(denoiser: Denoiser, scheduler, z0: torch.Tensor, cond: Cond, uncond: Cond,
                        guidance_scale: float = 7.5, inner_steps: int = 10, lr: float = 1e-2,
                        early_stop: float = 1e-5, keys: Sequence[str] | None = None) -> NullTextInversion:
    """Invert `z0` with DDIM, then fit one unconditional conditioning per step (Adam) so that the guided
    step from the current latent lands on the inversion trajectory's next latent.

    What is fitted are the unconditional tensors named by `keys`, by default the backbone's
    `null_text_keys()` (SD: the per-token embeddings; SDXL: those and the pooled embedding); the others (SDXL's
    time ids: the image size) stay as given. The values found at step i start step i+1 (neighbouring steps
    want similar ones); the learning rate decays to half over the run and the inner loop stops once the loss
    is below `early_stop * (1 + 2i)`, both as in the paper (which used 50 steps). Gradients are taken only
    with respect to those tensors (`autograd.grad`), so the UNet's parameters and their `.grad` are untouched.
    """
    cond, uncond = as_conditioning(cond), as_conditioning(uncond)
    keys = tuple(keys if keys is not None else denoiser.backbone.null_text_keys())
    missing = [key for key in keys if key not in uncond]
    if missing or not keys:
        raise ValueError(f"null-text inversion optimises {list(keys)}, but the unconditional conditioning has "
                         f"{list(uncond)}: pass keys from those")
    steps = levels(scheduler)
    n = len(steps) - 1
    trajectory = ddim_invert(denoiser, scheduler, z0, cond)
    x = trajectory[0]
    fixed = {key: value for key, value in uncond.items() if key not in keys}
    current = {key: uncond[key].detach().float().clone() for key in keys}
    fitted, losses = [], []
    for i in range(n):
        t, target = steps[i], trajectory[i + 1]
        with torch.no_grad():
            out_cond = denoiser(x, t, cond)
        params = {key: value.clone().requires_grad_(True) for key, value in current.items()}
        optimizer = torch.optim.Adam(list(params.values()), lr=lr * (1.0 - 0.5 * i / n))
        loss_value = float("nan")
        for _ in range(inner_steps):
            out_uncond = denoiser(x, t, Conditioning({**fixed, **params}))
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
            loss = F.mse_loss(ddim_move(scheduler, out, x, t, t, steps[i + 1]).float(), target.float())
            loss_value = loss.item()
            if loss_value < early_stop * (1 + 2 * i):
                break
            grads = torch.autograd.grad(loss, list(params.values()))
            for param, grad in zip(params.values(), grads):
                param.grad = grad
            optimizer.step()
        current = {key: param.detach() for key, param in params.items()}
        fitted.append(Conditioning({**fixed, **{key: value.clone() for key, value in current.items()}}))
        losses.append(loss_value)
        with torch.no_grad():
            out = guided_output(denoiser, x, t, cond, fitted[-1], guidance_scale)
            x = ddim_move(scheduler, out, x, t, t, steps[i + 1])
    return NullTextInversion(trajectory[0], fitted, trajectory, losses, num_inference_steps=n,
                             guidance_scale=guidance_scale)


# --------------------------------------------------------------------------------------------------
# Pipeline glue: text, images and latents


def convert_prompt(pipe) -> Callable[[str], str]:
    """Expands multi-vector textual-inversion tokens the way the pipeline does when it encodes text."""
    if hasattr(pipe, "maybe_convert_prompt"):
        return lambda s: pipe.maybe_convert_prompt(s, pipe.tokenizer)
    return lambda s: s


def pipeline_tokenizers(pipe, backbone: Backbone | None = None) -> list[tuple[Any, Callable[[str], str]]]:
    """(tokenizer, convert) for each tokenizer whose token positions are the cross-attention keys (SDXL: both
    CLIP tokenizers), `convert` expanding multi-vector textual-inversion tokens as the pipeline does for it."""
    backbone = backbone or pipeline_backbone(pipe)
    convert = (lambda tok: (lambda s: pipe.maybe_convert_prompt(s, tok))) if hasattr(pipe, "maybe_convert_prompt") \
        else (lambda tok: (lambda s: s))
    return [(tokenizer, convert(tokenizer)) for tokenizer in backbone.edit_tokenizers(pipe)]


def native_size(pipe) -> tuple[int, int]:
    """The UNet's native sample size in pixels (the stock pipeline's default height and width: SDXL 1024)."""
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return side, side


@torch.no_grad()
def encode_text(pipe, prompts: Sequence[str], height: int | None = None, width: int | None = None,
                backbone: Backbone | None = None) -> Conditioning:
    """One conditioning row per prompt through the pipeline's own encoder path (textual inversion, clip skip,
    LoRA), with what the backbone adds for a `height` x `width` sample (SDXL: pooled embedding, time ids);
    the size defaults to the UNet's native one."""
    backbone = backbone or pipeline_backbone(pipe)
    default_h, default_w = native_size(pipe)
    return backbone.edit_conditioning(pipe, list(prompts), height or default_h, width or default_w)


@torch.no_grad()
def unconditional(pipe, height: int | None = None, width: int | None = None,
                  backbone: Backbone | None = None) -> Conditioning:
    """The stock pipeline's unconditional row for a `height` x `width` sample (SD: the empty prompt's embedding;
    SDXL base: zeros, `force_zeros_for_empty_prompt`)."""
    backbone = backbone or pipeline_backbone(pipe)
    default_h, default_w = native_size(pipe)
    return backbone.edit_unconditional(pipe, height or default_h, width or default_w)


def _center_crop(image: Image.Image, aspect: float) -> Image.Image:
    w, h = image.size
    if w / h > aspect:
        new_w = round(h * aspect)
        left = (w - new_w) // 2
        return image.crop((left, 0, left + new_w, h))
    new_h = round(w / aspect)
    top = (h - new_h) // 2
    return image.crop((0, top, w, top + new_h))


def preprocess(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL -> [1, 3, height, width] in [-1, 1], center-cropped to the aspect ratio first (no distortion)."""
    image = _center_crop(image.convert("RGB"), width / height).resize((width, height), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


@contextmanager
def vae_precision(vae) -> Iterator[torch.dtype]:
    """The dtype to run the VAE in: float32 for a float16 VAE whose config says `force_upcast` (SDXL's own
    overflows in float16, so its stock pipeline upcasts it around every decode), its own dtype otherwise."""
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield vae.dtype
    finally:
        if upcast:
            vae.to(torch.float16)


@torch.no_grad()
def encode_image(pipe, image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Photo -> latent (the posterior mean, deterministic), scaled by the VAE's scaling factor."""
    with vae_precision(pipe.vae) as dtype:
        x = preprocess(image, height, width).to(pipe.device, dtype)
        # float32 from here on: the inversion trajectory is the reconstruction target, fp16 would blur it
        return pipe.vae.encode(x).latent_dist.mean.float() * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    with vae_precision(pipe.vae) as dtype:
        images = pipe.vae.decode(latents.to(dtype) / pipe.vae.config.scaling_factor).sample
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
