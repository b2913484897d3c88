"""Assertions shared by the method tests."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from personalize.backbones.objectives import Draw
from personalize.methods.trainables import TRAINABLES


def method_settings(cfg):
    """A composed config's MethodSettings as prepare_run parses them: after the model family fills in what the
    method leaves to it (method.lora.target_modules: null)."""
    from personalize.backbones import backbone_for
    from personalize.methods.settings import MethodSettings

    backbone_for(cfg.model).fill_method_defaults(cfg.method)
    return MethodSettings.from_cfg(cfg.method)


def snapshot(module) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of every weight of a Personalizer: one part per component (vae, text_encoder, unet) for its
    own weights, and one per kind of trainable with parameters of its own (token, lora, custom_diffusion)."""
    components = {"vae": module.vae, "text_encoder": module.text_encoder, "unet": module.unet}
    own = [cls for cls in TRAINABLES.values() if not cls.trains_in_place]
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in components} | {cls.name: {} for cls in own}
    for component, model in components.items():
        for name, param in model.named_parameters():
            owner = next((cls.name for cls in own if cls.owns(name)), component)
            parts[owner][f"{component}.{name}"] = param.detach().clone()
    return parts


@torch.no_grad()
def fixed_loss(module, seed: int = 0, timesteps: tuple[int, ...] = (50, 250, 450, 650, 850)) -> float:
    """A Personalizer's instance loss on fixed noise and timesteps over every photo: a noise-free measure of
    fit (the method tests ask that training lowers it). Draws from none of the run's generators."""
    if not module._latents:
        module.cache_latents()
    latents = module._latents["instance"][0]
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(len(latents))
    embeds = module._encode_prompt(module.instance_prompt).expand(len(latents)) | module._image_conditioning("instance", rows)
    losses = []
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        draw = Draw(noise, torch.full((len(latents),), t, device=module.device))
        pred, target = module._predict(latents, draw, embeds)
        losses.append(F.mse_loss(pred, target))
    return float(torch.stack(losses).mean())


def changed_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Share of tensors that differ at all (0.0 means every tensor is bit-identical)."""
    if not before:
        return 0.0
    return sum(not torch.equal(before[n], after[n]) for n in before) / len(before)


def stock_pipeline(base_dir: Path, ckpt: Path):
    """Load a checkpoint exactly as a diffusers user would, without any personalize code."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextModel

    if (Path(base_dir) / "transformer").is_dir():  # a FLUX.1 base model
        pipe = FluxPipeline.from_pretrained(base_dir)
    elif (Path(base_dir) / "tokenizer_2").is_dir():  # an SDXL base model
        pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    if (ckpt / "text_encoder").is_dir():
        pipe.text_encoder = CLIPTextModel.from_pretrained(ckpt / "text_encoder")
    embeds = ckpt / "learned_embeds.safetensors"
    if embeds.exists():
        with safe_open(embeds, "pt") as f:
            keys, token = list(f.keys()), (f.metadata() or {}).get("token")
            if token is None:  # SD's {token: vectors}: the loader reads the file itself
                pipe.load_textual_inversion(ckpt)
            else:  # SDXL's {clip_l, clip_g} / FLUX's {clip_l, t5}: the documented way, one encoder at a time
                for key in keys:
                    second = key != "clip_l"
                    pipe.load_textual_inversion(f.get_tensor(key), token=token,
                                                tokenizer=pipe.tokenizer_2 if second else pipe.tokenizer,
                                                text_encoder=pipe.text_encoder_2 if second else pipe.text_encoder)
    if (ckpt / "unet").is_dir():
        pipe.unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    if (ckpt / "transformer").is_dir():
        pipe.transformer = FluxTransformer2DModel.from_pretrained(ckpt / "transformer")
    if (ckpt / "pytorch_lora_weights.safetensors").exists():
        pipe.load_lora_weights(ckpt)
    if (ckpt / "pytorch_custom_diffusion_weights.safetensors").exists():
        # what a user writes with diffusers' public classes (stock load_attn_procs of diffusers 0.42 leaves the
        # UNet unchanged: personalize.methods.trainables.CustomDiffusion says why)
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
        from safetensors.torch import load_file

        processors = dict(pipe.unet.attn_processors)
        for key, value in load_file(ckpt / "pytorch_custom_diffusion_weights.safetensors").items():
            name = key.rsplit(".", 2)[0]  # <layer>.processor
            if not isinstance(processors[name], CustomDiffusionAttnProcessor):
                processors[name] = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False,
                                                                hidden_size=value.shape[0], cross_attention_dim=value.shape[1])
            getattr(processors[name], key.rsplit(".", 2)[1]).weight.data = value
        pipe.unet.set_attn_processor(processors)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# A fixed input of the tiny UNet (4 latent channels, 77 x 32 text states): what a trained and a stock-loaded
# adapter must give the same output on.
def fixed_inputs():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    return latents, torch.tensor([500, 80]), embeds


@torch.no_grad()
def unet_output(unet):
    latents, t, embeds = fixed_inputs()
    return unet.eval()(latents, t, embeds).sample


def script_adamw_step(params: dict, optimizer_cfg, lr: float) -> None:
    """The diffusers scripts' update after backward: clip the gradients to max_grad_norm (where the method clips:
    the textual-inversion scripts do not), one AdamW step."""
    if optimizer_cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params.values(), float(optimizer_cfg.max_grad_norm))
    optimizer = torch.optim.AdamW(params.values(), lr=lr, betas=tuple(optimizer_cfg.betas),
                                  weight_decay=float(optimizer_cfg.weight_decay), eps=float(optimizer_cfg.eps))
    optimizer.step()


def record_steps(monkeypatch, trained) -> list[dict]:
    """Each training step's batch, denoiser inputs (latents, noise, timesteps, conditioning) and loss, and the
    weights `trained(module)` ({name: parameter}) before, their gradients and the weights after."""
    from personalize.methods.module import Personalizer

    steps: list[dict] = []
    predict, training_step = Personalizer._predict, Personalizer.training_step

    def recording_step(self, batch, batch_idx):
        steps.append({"batch": batch, "before": {n: p.detach().clone() for n, p in trained(self).items()}})
        loss = training_step(self, batch, batch_idx)
        steps[-1].update(loss=loss.detach().clone(), grads={n: p.grad.clone() for n, p in trained(self).items()},
                         after={n: p.detach().clone() for n, p in trained(self).items()})
        return loss

    def recording_predict(self, latents, draw, conditioning):
        if torch.is_grad_enabled() and steps and "latents" not in steps[-1]:
            steps[-1].update(latents=latents.detach().clone(), noise=draw.noise.clone(),
                             timesteps=draw.timesteps.clone(),
                             conditioning={k: v.detach().clone() for k, v in conditioning.items()})
        return predict(self, latents, draw, conditioning)

    monkeypatch.setattr(Personalizer, "training_step", recording_step)
    monkeypatch.setattr(Personalizer, "_predict", recording_predict)
    return steps


def assert_step_matches(step: dict, loss: torch.Tensor, params: dict) -> None:
    """Our recorded step (loss, gradients, weights before/after) equals a script's step on `params`, to float32
    rounding (the same math, another order of ops), and every trained weight moved."""
    torch.testing.assert_close(step["loss"], loss.detach(), rtol=1e-5, atol=1e-7)
    moved = 0
    for name, param in params.items():
        torch.testing.assert_close(step["grads"][name], param.grad, rtol=1e-4, atol=1e-8, msg=f"gradient of {name}")
        torch.testing.assert_close(step["after"][name], param.detach(), rtol=1e-5, atol=1e-7, msg=f"{name} after the step")
        moved += not torch.equal(step["after"][name], step["before"][name])
    assert moved == len(params)  # every LoRA weight took the step (B from its gradient, A from weight decay)
    assert any(float(g.abs().max()) > 0 for g in step["grads"].values())
