"""DDIM sampling, DDIM inversion and null-text inversion (after Mokady et al., 2022).

One DDIM update (`ddim_move`) serves both directions, so sampling exactly retraces the inversion's
schedule. The loop is our own (not `pipe.__call__`) because editing needs what the pipeline does not
offer: a joint batch of prompts with attention control, a per-step unconditional embedding, and a
latent callback between steps.

Guided DDIM inversion drifts: inverting with the prompt alone (guidance 1) and then sampling with
guidance 7.5 does not come back to the photo. Null-text inversion fixes that by optimising, step by
step, the unconditional ("") embedding so the guided trajectory follows the guidance-1 inversion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image

from personalize.edit.attention import AttentionStore, controlled_attention

Embeds = torch.Tensor | Sequence[torch.Tensor]


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


def guided_output(unet, x: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None,
                  guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided UNet output for a batch; the UNet batch is [uncond..., cond...]."""
    dtype = unet.dtype
    if uncond is None or guidance_scale == 1.0:
        return unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
    uncond = uncond.expand(x.shape[0], -1, -1) if uncond.shape[0] == 1 else uncond
    out = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=torch.cat([uncond, cond]).to(dtype)).sample
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


@torch.no_grad()
def ddim_sample(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, uncond: Embeds | None,
                guidance_scale: float = 7.5, controller: AttentionStore | None = None,
                callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run DDIM from `latents` [n, C, h, w] (one row per prompt in `cond` [n, L, D]) to clean latents.

    `uncond` is one embedding [1|n, L, D] for every step, or a sequence of them, one per step (null-text).
    With a `controller`, all attention layers are routed through it for the duration, and its
    `step_end` (local blend) runs after each step, before `callback(step, latents) -> latents`.
    """
    steps = levels(scheduler)
    per_step = uncond is not None and not isinstance(uncond, torch.Tensor)
    if per_step and len(uncond) != len(steps) - 1:
        raise ValueError(f"got {len(uncond)} unconditional embeddings for {len(steps) - 1} steps")
    use_cfg = uncond is not None and guidance_scale != 1.0

    def loop() -> torch.Tensor:
        x = latents
        for i in range(len(steps) - 1):
            u = uncond[i] if per_step else uncond
            out = guided_output(unet, x, steps[i], cond, u, guidance_scale)
            x = ddim_move(scheduler, out, x, steps[i], steps[i], steps[i + 1])
            if controller is not None:
                x = controller.step_end(x)
            if callback is not None:
                x = callback(i, x)
        return x

    if controller is None:
        return loop()
    controller.begin(len(steps) - 1, tuple(latents.shape[-2:]), latents.shape[0], use_cfg)
    with controlled_attention(unet, controller):
        return loop()


@torch.no_grad()
def ddim_invert(unet, scheduler, z0: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
    """DDIM inversion with the prompt alone: latents at every level, [x_T, ..., x_0 = z0].

    The noise at level k is predicted from the latent at level k+1 (the one we have) with timestep t_k,
    the usual approximation that makes DDIM invertible step by step.
    """
    steps = levels(scheduler)
    trajectory = [z0]
    x = z0
    for k in range(len(steps) - 2, -1, -1):
        out = unet(x.to(unet.dtype), steps[k], encoder_hidden_states=cond.to(unet.dtype)).sample
        x = ddim_move(scheduler, out, x, steps[k], steps[k + 1], steps[k])
        trajectory.append(x)
    return trajectory[::-1]


@dataclass
class NullTextInversion:
    """Everything needed to regenerate (and edit) a real photo with guidance."""

    latent: torch.Tensor  # x_T, [1, C, h, w]
    uncond: list[torch.Tensor]  # one optimised unconditional embedding per step, [1, L, D]
    trajectory: list[torch.Tensor]  # the guidance-1 DDIM inversion, [x_T, ..., x_0]
    losses: list[float]  # final inner loss per step
    prompt: str = ""
    num_inference_steps: int = 0
    guidance_scale: float = 7.5
    image: Image.Image | None = None  # the photo as it was encoded (cropped and resized)


def null_text_inversion(unet, scheduler, z0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                        guidance_scale: float = 7.5, inner_steps: int = 10, lr: float = 1e-2,
                        early_stop: float = 1e-5) -> NullTextInversion:
    """Invert `z0` with DDIM, then fit one unconditional embedding per step (Adam) so that the guided
    step from the current latent lands on the inversion trajectory's next latent.

    The embedding found at step i starts step i+1 (neighbouring steps want similar ones); the learning
    rate decays to half over the run and the inner loop stops once the loss is below
    `early_stop * (1 + 2i)`, both as in the paper (which used 50 steps). Gradients are taken only with
    respect to the embedding (`autograd.grad`), so the UNet's parameters and their `.grad` are untouched.
    """
    steps = levels(scheduler)
    n = len(steps) - 1
    trajectory = ddim_invert(unet, scheduler, z0, cond)
    x = trajectory[0]
    current = uncond.detach().float().clone()
    fitted, losses = [], []
    for i in range(n):
        t, target = steps[i], trajectory[i + 1]
        with torch.no_grad():
            out_cond = unet(x.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample
        emb = current.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([emb], lr=lr * (1.0 - 0.5 * i / n))
        loss_value = float("nan")
        for _ in range(inner_steps):
            out_uncond = unet(x.to(unet.dtype), t, encoder_hidden_states=emb.to(unet.dtype)).sample
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
            loss = F.mse_loss(ddim_move(scheduler, out, x, t, t, steps[i + 1]).float(), target.float())
            loss_value = loss.item()
            if loss_value < early_stop * (1 + 2 * i):
                break
            (emb.grad,) = torch.autograd.grad(loss, [emb])
            optimizer.step()
        current = emb.detach()
        fitted.append(current.clone())
        losses.append(loss_value)
        with torch.no_grad():
            out = guided_output(unet, x, t, cond, current, guidance_scale)
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


@torch.no_grad()
def encode_text(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """[n, L, D] text embeddings through the pipeline's own encoder path (textual inversion, clip skip, LoRA)."""
    embeds, _ = pipe.encode_prompt(list(prompts), pipe.device, 1, False)
    return embeds


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


@torch.no_grad()
def encode_image(pipe, image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Photo -> SD latent (the posterior mean, deterministic), scaled by the VAE's scaling factor."""
    x = preprocess(image, height, width).to(pipe.device, pipe.vae.dtype)
    # float32 from here on: the inversion trajectory is the reconstruction target, fp16 would blur it
    return pipe.vae.encode(x).latent_dist.mean.float() * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
