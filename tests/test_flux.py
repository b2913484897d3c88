"""The FLUX.1 backbone on the tiny random-weight FLUX (`model=tiny_flux`).

- Parity: one LoRA training step equals our own reimplementation of diffusers'
  train_dreambooth_lora_flux.py step on the same latents, noise and timesteps (CLIP's pooled output, T5's
  hidden states, zero text ids, the 2x2-packed latents with their image ids, t / 1000, guidance 1.0, the
  sigmas looked up in the scheduler as its `get_sigmas` does): same loss, LoRA gradients and updated LoRA
  weights; and the cached latents are the script's (z - shift_factor) * scaling_factor.
- lora trains end to end through prepare_run/fit, its checkpoint loads in a stock FluxPipeline
  (`load_lora_weights`, with its alpha) and samples; every tensor outside the LoRA is bit-identical.
- The flow-matching objective: each weighting scheme's timestep density and loss weight against the
  formulas of the SD3 paper as diffusers writes them, computed here.
- What does not apply (Custom Diffusion, a text encoder's weights, DDPM options on flux, flow-matching options on sd) and the gated
  FLUX.1-dev are one line before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.backbones.objectives import Draw, FlowMatchingObjective, LossSettings
from personalize.config import PROJECT_ROOT
from personalize.errors import PersonalizeError
from personalize.train import fit, prepare_run
from tests.fakehub import FakeHub
from tests.helpers import assert_step_matches, record_steps, script_adamw_step

# train_dreambooth_lora_flux.py's default --lora_layers
SCRIPT_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2"]
# scheduler/scheduler_config.json of FLUX.1-dev
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


@pytest.fixture
def flux_cfg(make_cfg):
    def _make(*overrides: str, name: str = "run"):
        return make_cfg("model=tiny_flux", *overrides, name=name)

    return _make


def lora_params(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.unet.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------- the reference: train_dreambooth_lora_flux.py
def script_encode_prompt(clip_tokenizer, clip, t5_tokenizer, t5, prompt: str, max_sequence_length: int = 512):
    """The script's encode_prompt: CLIP's pooler_output over 77 tokens, T5's output[0] over 512, zero text ids."""
    ids = clip_tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pooled = clip(ids, output_hidden_states=False).pooler_output
    ids_2 = t5_tokenizer([prompt], padding="max_length", max_length=max_sequence_length, truncation=True,
                         return_tensors="pt").input_ids
    prompt_embeds = t5(ids_2)[0]
    return prompt_embeds, pooled, torch.zeros(prompt_embeds.shape[1], 3)


def script_get_sigmas(scheduler, timesteps: torch.Tensor, n_dim: int) -> torch.Tensor:
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigma = scheduler.sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def test_a_lora_step_equals_train_dreambooth_lora_flux(flux_cfg, tiny_flux_dir, monkeypatch):
    import copy

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    steps = record_steps(monkeypatch, lora_params)
    cfg = flux_cfg("method=lora", "subject=sample_dog", "method.batch_size=2", "method.stages.lora.steps=1",
                   "method.stages.lora.checkpoint_every=null", "method.stages.lora.lr=1e-3", "method.lora.alpha=8",
                   "eval=none")  # the default LoRA targets: FLUX's own, the script's default --lora_layers
    run = prepare_run(cfg)
    fit(run, sample=False, evaluate=False)
    (step,) = steps
    module = run.module

    # the cached latents are the script's (z - shift_factor) * scaling_factor of the stock VAE's distribution
    vae = AutoencoderKL.from_pretrained(tiny_flux_dir / "vae")
    with torch.no_grad():
        dist = vae.encode(module._images["instance"]).latent_dist
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert shift != 0 and scale != 1
    mean, std = module._latents["instance"]
    torch.testing.assert_close(mean, (dist.mean - shift) * scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, dist.std * scale, rtol=1e-5, atol=1e-6)

    # the script's step, on its own models loaded the stock way, with our initial LoRA weights
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer")
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_dir, subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=SCRIPT_TARGETS))
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert set(params) == set(step["before"])
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(step["before"][name])
        prompt_embeds, pooled, text_ids = script_encode_prompt(
            CLIPTokenizer.from_pretrained(tiny_flux_dir / "tokenizer"), CLIPTextModel.from_pretrained(tiny_flux_dir / "text_encoder"),
            T5TokenizerFast.from_pretrained(tiny_flux_dir / "tokenizer_2"),
            T5EncoderModel.from_pretrained(tiny_flux_dir / "text_encoder_2"), module.instance_prompt)

    model_input, noise, timesteps = step["latents"], step["noise"], step["timesteps"]
    bsz = model_input.shape[0]
    assert all(t in noise_scheduler_copy.timesteps for t in timesteps)  # drawn from the training schedule
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(bsz, model_input.shape[2] // 2, model_input.shape[3] // 2,
                                                              "cpu", torch.float32)
    sigmas = script_get_sigmas(noise_scheduler_copy, timesteps, model_input.ndim)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy_model_input, bsz, model_input.shape[1], model_input.shape[2],
                                        model_input.shape[3])
    assert transformer.config.guidance_embeds  # FLUX.1-dev's shape: the guidance embedding, at the README's 1.0
    guidance = torch.tensor([1.0]).expand(bsz)
    model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                             pooled_projections=pooled.repeat(bsz, 1), encoder_hidden_states=prompt_embeds.repeat(bsz, 1, 1),
                             txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
    model_pred = FluxPipeline._unpack_latents(model_pred, model_input.shape[2] * vae_scale_factor,
                                              model_input.shape[3] * vae_scale_factor, vae_scale_factor)
    weighting = torch.ones_like(sigmas)  # weighting_scheme=none
    target = noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()
    loss.backward()
    script_adamw_step(params, cfg.method.optimizer, lr=1e-3)

    # the same math in another order of float32 ops (the mean of row means; the weights of the T5 states
    # computed by another kernel where they require grad): agreement to float32 rounding, not bits
    assert_step_matches(step, loss, params)


# ---------------------------------------------------------------- lora: train, checkpoint, stock load, sample
def transformer_output(transformer) -> torch.Tensor:
    """The transformer on fixed inputs of the tiny FLUX's shapes (16 image tokens of 64, 8 text tokens of 32)."""
    g = torch.Generator().manual_seed(1)
    hidden, context, pooled = torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)
    with torch.no_grad():
        return transformer(hidden_states=hidden, timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                           pooled_projections=pooled, encoder_hidden_states=context, txt_ids=torch.zeros(8, 3),
                           img_ids=img_ids, return_dict=False)[0]


def weights(module) -> dict[str, torch.Tensor]:
    parts = {"vae": module.vae, "text_encoder": module.text_encoder, "unet": module.unet,
             "text_encoder_2": module.components.extra["text_encoder_2"]}
    return {f"{part}.{n}": p.detach().clone() for part, model in parts.items() for n, p in model.named_parameters()}


def test_lora_trains_checkpoints_and_loads_in_the_stock_flux_pipeline(flux_cfg, tiny_flux_dir):
    from diffusers import FluxPipeline

    run = prepare_run(flux_cfg("method=lora", "subject=sample_dog", "method.batch_size=2", "eval=none",
                               "method.stages.lora.steps=2", "method.stages.lora.checkpoint_every=null",
                               "method.stages.lora.lr=2e-2", "method.lora.alpha=8"))
    module = run.module
    assert type(module.backbone).__name__ == "Flux"
    before = weights(module)
    fit(run, evaluate=False)  # and the closing samples, through FluxPipeline with its flow-match sampler
    after = weights(module)
    samples = sorted((run.run_dir / "samples").rglob("*.png"))
    assert samples and all(np.asarray(Image.open(p)).std() > 0 for p in samples)
    lora = {n for n in before if "lora_" in n}
    assert lora and all(n.startswith("unet.") for n in lora)
    assert all(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in lora)  # the rest: bit-identical

    (ckpt,) = run.checkpoints()
    assert {p.name for p in ckpt.iterdir()} == {"pytorch_lora_weights.safetensors", "checkpoint.json"}
    assert json.loads((ckpt / "checkpoint.json").read_text())["model"]["backbone"] == "flux"
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(ckpt)  # stock diffusers, with the alpha the file's metadata carries
    loaded = transformer_output(pipe.transformer)
    torch.testing.assert_close(loaded, transformer_output(module.unet.eval()), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(loaded, base)
    image = pipe(module.instance_prompt, num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0


def test_lora_on_the_transformer_and_clip_trains_both_and_loads_in_the_stock_flux_pipeline(flux_cfg, tiny_flux_dir):
    """The FLUX LoRA script's --train_text_encoder: adapters on CLIP too (T5 stays frozen), in the `text_encoder.`
    part of the one LoRA file, which stock load_lora_weights applies to the pipeline's CLIP."""
    from diffusers import FluxPipeline

    run = prepare_run(flux_cfg("method=lora", "subject=sample_dog", "method.batch_size=2", "eval=none",
                               "method.stages.lora.train=[lora,text_encoder_lora]", "method.stages.lora.steps=2",
                               "method.stages.lora.checkpoint_every=null", "method.stages.lora.lr=2e-2"))
    module = run.module
    before = weights(module)
    fit(run, sample=False, evaluate=False)
    after = weights(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n.split(".")[0] for n in changed} == {"unet", "text_encoder"} and all("lora_" in n for n in changed)

    (ckpt,) = run.checkpoints()
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    prompt = module.instance_prompt
    with torch.no_grad():
        _, base_pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device="cpu")
        pipe.load_lora_weights(ckpt)  # both parts, each with its adapter metadata
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device="cpu")
        ours = module._encode_prompt(prompt)
    torch.testing.assert_close(pooled, ours["pooled_projections"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeds, ours["encoder_hidden_states"], rtol=0, atol=0)  # T5: untouched
    assert not torch.allclose(pooled, base_pooled)
    torch.testing.assert_close(transformer_output(pipe.transformer), transformer_output(module.unet.eval()),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the flow-matching objective
def fixed_draws(normals: list[float], uniforms: list[int]):
    """randn/randint stand-ins that return given numbers: the objective's formulas, seen from outside."""
    def randn(shape):
        return torch.tensor(normals[:shape[0]]) if len(shape) == 1 else torch.zeros(shape)

    def randint(low, high, rows):
        assert (low, high) == (0, 2 ** 24)
        return torch.tensor(uniforms[:rows])

    return randn, randint


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_each_weighting_scheme_draws_and_weighs_as_the_sd3_formulas(scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    loss = LossSettings(weighting_scheme=scheme, logit_mean=0.3, logit_std=1.7, mode_scale=1.1)
    objective = FlowMatchingObjective(scheduler, loss=loss)
    normals, uniform_bits = [-1.2, 0.0, 0.8, 2.5], [0, 3 * 2 ** 21 + 12345, 2 ** 23 + 7777, 2 ** 24 - 1]
    randn, randint = fixed_draws(normals, uniform_bits)
    draw = objective.draw((4, 16, 8, 8), randn, randint)

    # u as compute_density_for_timestep_sampling defines it, in float64 from the same raw numbers
    if scheme == "logit_normal":
        u = [1 / (1 + math.exp(-(0.3 + 1.7 * z))) for z in normals]
    else:
        v = [b / 2 ** 24 for b in uniform_bits]
        u = [1 - x - 1.1 * (math.cos(math.pi * x / 2) ** 2 - 1 + x) for x in v] if scheme == "mode" else v
    # the index into the schedule (the last one where u reaches 1), its timestep and unshifted sigma
    index = [min(int(x * 1000), 999) for x in u]
    expected_t = [1000.0 - i for i in index]  # FLUX.1-dev's training schedule: 1000, 999, ..., 1
    assert draw.timesteps.tolist() == expected_t
    sigma = [t / 1000 for t in expected_t]
    torch.testing.assert_close(objective.sigma(draw.timesteps), torch.tensor(sigma), rtol=1e-6, atol=0)

    # input and target: (1 - σ) x + σ ε and ε - x
    x, eps = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(4, 16, 8, 8)
    d = Draw(eps, draw.timesteps)
    s = torch.tensor(sigma).view(4, 1, 1, 1)
    torch.testing.assert_close(objective.noisy(x, d), (1 - s) * x + s * eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(objective.target(x, d), eps - x, rtol=0, atol=0)

    # the row weights: 2 / (π (1 - 2σ + 2σ²)) for cosmap, σ^-2 for sigma_sqrt, none (plain MSE) otherwise
    weights = objective.row_weights(draw.timesteps)
    if scheme == "cosmap":
        torch.testing.assert_close(weights, torch.tensor([2 / (math.pi * (1 - 2 * q + 2 * q * q)) for q in sigma]))
    elif scheme == "sigma_sqrt":
        torch.testing.assert_close(weights, torch.tensor([q ** -2 for q in sigma]))
    else:
        assert weights is None


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_the_timestep_density_is_diffusers_on_the_same_generator(scheme):
    """The objective's u is compute_density_for_timestep_sampling's where both read the same random stream
    (a normal, or a float32 uniform made of 24 random bits)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    loss = LossSettings(weighting_scheme=scheme, logit_mean=-0.2, logit_std=0.9, mode_scale=1.29)
    objective = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), loss=loss)
    ours_g, theirs_g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = objective.density(64, lambda shape: torch.randn(shape, generator=ours_g),
                             lambda low, high, n: torch.randint(low, high, (n,), generator=ours_g))
    theirs = compute_density_for_timestep_sampling(scheme, 64, logit_mean=-0.2, logit_std=0.9, mode_scale=1.29,
                                                   generator=theirs_g)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- what does not apply, before anything is written
@pytest.mark.parametrize("overrides", [["method=custom_diffusion"],
                                       ["method=dreambooth", "method.stages.unet.train=[unet,text_encoder]"]])
def test_a_method_flux_does_not_train_is_one_line_naming_those_that_apply(overrides, flux_cfg, tmp_path):
    cfg = flux_cfg("subject=sample_dog", *overrides, name="refused")
    with pytest.raises(PersonalizeError) as error:
        prepare_run(cfg)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"method.stages.{next(iter(cfg.method.stages))}.train=")
    assert "the flux backbone (model.backbone=flux) cannot train" in message
    assert message.endswith("the methods that apply to it are dreambooth, finetune, lora, pivotal, textual_inversion, two_stage")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("model, override, says", [
    ("tiny_flux", "method.noise.offset=0.1", "method.noise.offset=0.1: a DDPM option"),
    ("tiny_flux", "method.noise.min_timestep=100", "method.noise.min_timestep=100: a DDPM option"),
    ("tiny_flux", "method.loss.snr_gamma=5.0", "method.loss.snr_gamma=5.0: Min-SNR-γ weighs DDPM timesteps"),
    ("tiny", "method.loss.weighting_scheme=cosmap", "method.loss.weighting_scheme=cosmap: a flow-matching option"),
    ("tiny_sdxl", "method.loss.logit_std=2.0", "method.loss.logit_std=2.0: a flow-matching option"),
])
def test_an_objective_option_of_the_other_family_is_one_line(model, override, says, make_cfg, tmp_path):
    cfg = make_cfg(f"model={model}", "method=lora", "subject=sample_dog", override, name="refused")
    with pytest.raises(PersonalizeError) as error:
        prepare_run(cfg)
    assert "\n" not in str(error.value) and str(error.value).startswith(says), str(error.value)
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow  # a subprocess (~17 s); test_models covers the gated answer through every loader in the default run
def test_the_gated_flux_dev_is_one_line_saying_to_log_in_and_accept_its_licence(tmp_path):
    """Against the stand-in Hub (tests/fakehub.py) answering 403 GatedRepo for FLUX.1-dev, as the real Hub
    does for an account that has not accepted its licence."""
    script = """
from personalize.backbones import backbone_for
from personalize.config import compose
from personalize.errors import PersonalizeError
cfg = compose("train", ["model=flux_dev"], output_dir="/unused")
try:
    backbone_for(cfg.model).check_model()
    print("LOADED")
except PersonalizeError as error:
    print("ERROR", error)
"""
    with FakeHub([], gated=("black-forest-labs/FLUX.1-dev",)) as fake:
        env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_DISABLE_TELEMETRY="1")
        result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(("ERROR", "LOADED"))] or [result.stderr]
    assert line.startswith("ERROR model.pretrained=black-forest-labs/FLUX.1-dev: the model is gated"), line
    assert "accept its terms at https://huggingface.co/black-forest-labs/FLUX.1-dev" in line and "hf auth login" in line


def test_a_resolution_the_packed_latents_cannot_take_is_one_line(flux_cfg, tiny_flux_dir, tmp_path):
    """The tiny FLUX's VAE downsamples by 2 ** (levels - 1) and the transformer packs 2x2 latent patches: a
    resolution must be a multiple of both together, computed here from the saved VAE config."""
    vae_levels = len(json.loads((tiny_flux_dir / "vae" / "config.json").read_text())["block_out_channels"])
    multiple = 2 ** (vae_levels - 1) * 2
    with pytest.raises(PersonalizeError) as error:
        prepare_run(flux_cfg("method=lora", "subject=sample_dog", f"model.resolution={multiple * 4 + multiple // 2}", name="bad"))
    message = str(error.value)
    assert "\n" not in message and f"use a multiple of {multiple} (its VAE downsamples {multiple // 2}x and the " \
        "transformer packs 2x2 latent patches into one token), e.g. " f"{multiple * 4} or {multiple * 5}" in message, message
    assert not (tmp_path / "bad").exists()
