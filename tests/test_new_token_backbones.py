"""A new token in every text encoder of the two-encoder backbones (`model=tiny_sdxl`, `model=tiny_flux`).

- Parity (SDXL): one textual-inversion step equals our own reimplementation of diffusers'
  textual_inversion_sdxl.py step: the placeholder added to both tokenizers, both embedding tables resized and
  the new rows initialised from the initializer word, both whole tables under one AdamW, every other row put
  back after the step; the prompt is both encoders' penultimate states and the second's pooled projection, the
  time ids the photo's size. Same loss, gradients of the new rows and rows after the step.
- Parity (FLUX): one step of the two-stage method's token stage equals the flow-matching step of
  train_dreambooth_lora_flux_advanced.py with --train_text_encoder_ti --enable_t5_ti (a new token in CLIP and
  T5, nothing else training): CLIP's pooled output, T5's states, packed latents, guidance 1.
- textual_inversion, two_stage and pivotal on tiny SDXL, textual_inversion and two_stage on tiny FLUX train what
  their stages name and nothing else (each encoder's new rows; the other rows bit-identical), save both encoders'
  vectors (SDXL: clip_l / clip_g; FLUX: clip_l / t5), load in the stock pipeline the documented way (one
  `load_textual_inversion` per encoder), whose prompt embeddings are then the trained model's, and sample.
- A placeholder that only the second vocabulary already has is one line naming tokenizer_2.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from personalize.errors import PersonalizeError
from personalize.methods.token import check_new_token
from personalize.train import fit, prepare_run
from tests.helpers import assert_step_matches, record_steps, stock_pipeline
from tests.test_flux import script_encode_prompt as flux_script_encode_prompt
from tests.test_flux import script_get_sigmas
from tests.test_sdxl import script_encode_prompt as sdxl_script_encode_prompt


@pytest.fixture(scope="session")
def tiny_dirs(tiny_sdxl_dir, tiny_flux_dir) -> dict[str, Path]:
    return {"tiny_sdxl": tiny_sdxl_dir, "tiny_flux": tiny_flux_dir}


def new_rows(module) -> dict[str, torch.nn.Parameter]:
    """The new token's rows in every text encoder, by state-dict name: the first encoder's first."""
    rows = [(n, p) for n, p in module.named_parameters() if n.endswith("new_rows")]
    return dict(sorted(rows, key=lambda item: item[0].startswith("extra_components.")))


def script_add_token(tokenizer, encoder, placeholder: str, initializer: str) -> int:
    """The TI scripts' set-up: add the token, resize, copy the initializer's row; the whole table trains."""
    tokenizer.add_tokens([placeholder])
    init_id = tokenizer.encode(initializer, add_special_tokens=False)[0]
    new_id = tokenizer.convert_tokens_to_ids(placeholder)
    encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[new_id] = table[init_id].clone()
    encoder.requires_grad_(False)
    table.requires_grad_(True)
    return new_id


def script_embedding_step(tables: list[torch.nn.Parameter], new_ids: list[int], optimizer_cfg, lr: float) -> None:
    """The TI scripts' update: AdamW over the whole tables, then every row but the new one put back."""
    originals = [t.detach().clone() for t in tables]
    torch.optim.AdamW(tables, lr=lr, betas=tuple(optimizer_cfg.betas), weight_decay=float(optimizer_cfg.weight_decay),
                      eps=float(optimizer_cfg.eps)).step()
    with torch.no_grad():
        for table, original, new_id in zip(tables, originals, new_ids):
            keep = torch.ones(len(table), dtype=torch.bool)
            keep[new_id] = False
            table[keep] = original[keep]


def rows_as_params(tables, new_ids) -> dict[str, torch.Tensor]:
    """The new rows of the script's tables, with their gradients, in the shape our recorded step has ([1, dim])."""
    rows = {}
    for table, new_id in zip(tables, new_ids):
        row = table.detach()[new_id:new_id + 1].clone()
        row.grad = table.grad[new_id:new_id + 1].clone()
        rows[len(rows)] = row
    return rows


def assert_matches_script(step, loss, tables, new_ids) -> None:
    recorded = dict(step)
    names = list(step["before"])  # text_encoder's before extra_components.text_encoder_2's (new_rows)
    assert names[0].startswith("text_encoder.") and names[1].startswith("extra_components.text_encoder_2.")
    recorded.update({key: {i: step[key][n] for i, n in enumerate(names)} for key in ("before", "grads", "after")})
    assert_step_matches(recorded, loss, rows_as_params(tables, new_ids))


# ---------------------------------------------------------------- SDXL: textual_inversion_sdxl.py
def test_a_token_step_on_sdxl_equals_textual_inversion_sdxl(make_cfg, tiny_dirs, monkeypatch):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = tiny_dirs["tiny_sdxl"]
    steps = record_steps(monkeypatch, new_rows)
    cfg = make_cfg("model=tiny_sdxl", "method=textual_inversion", "subject=sample_dog", "method.batch_size=2",
                   "method.stages.token.steps=1", "method.stages.token.checkpoint_every=null",
                   "method.stages.token.lr=1e-2", "eval=none")
    run = prepare_run(cfg)
    fit(run, sample=False, evaluate=False)
    (step,) = steps
    module = run.module
    placeholder, initializer = module.identifier, str(cfg.method.new_token.initializer)

    tokenizers = [CLIPTokenizer.from_pretrained(base / name) for name in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(base / "text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2")]
    new_ids = [script_add_token(t, e, placeholder, initializer) for t, e in zip(tokenizers, encoders)]
    tables = [e.get_input_embeddings().weight for e in encoders]
    unet = UNet2DConditionModel.from_pretrained(base / "unet").requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")

    # our new rows start where the script's do: the initializer's row of each encoder
    for table, new_id, name in zip(tables, new_ids, step["before"]):
        torch.testing.assert_close(step["before"][name][0], table.detach()[new_id], rtol=0, atol=0)

    prompts = list(step["batch"][2])
    assert set(prompts) == {module.instance_prompt}
    prompt_embeds, pooled = sdxl_script_encode_prompt(encoders, tokenizers, prompts[0])
    latents, noise, timesteps = step["latents"], step["noise"], step["timesteps"]
    bsz, resolution = len(latents), int(cfg.model.resolution)
    # the sample photos are 128 px squares: the script's time ids are (128, 128, 0, 0, res, res) for each
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, resolution, resolution]]).repeat(bsz, 1)
    torch.testing.assert_close(step["conditioning"]["time_ids"], time_ids, rtol=0, atol=0)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, prompt_embeds.repeat(bsz, 1, 1),
                added_cond_kwargs={"text_embeds": pooled.repeat(bsz, 1), "time_ids": time_ids}).sample
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()
    assert cfg.method.optimizer.max_grad_norm is None  # the TI scripts do not clip either
    script_embedding_step(tables, new_ids, cfg.method.optimizer, lr=1e-2)
    assert_matches_script(step, loss, tables, new_ids)


# ---------------------------------------------------------------- FLUX: train_dreambooth_lora_flux_advanced.py
def test_the_token_stage_on_flux_equals_the_advanced_scripts_pivotal_token_step(make_cfg, tiny_dirs, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    base = tiny_dirs["tiny_flux"]
    steps = record_steps(monkeypatch, new_rows)
    cfg = make_cfg("model=tiny_flux", "method=two_stage", "subject=sample_dog", "method.batch_size=2",
                   "method.stages.token.steps=1", "method.stages.token.lr=1e-2", "method.stages.unet.steps=1",
                   "method.stages.unet.checkpoint_every=null", "eval=none")
    run = prepare_run(cfg)
    fit(run, sample=False, evaluate=False)
    step = steps[0]  # the token stage's one step
    module = run.module
    placeholder, initializer = module.identifier, str(cfg.method.new_token.initializer)

    tokenizers = [CLIPTokenizer.from_pretrained(base / "tokenizer"), T5TokenizerFast.from_pretrained(base / "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(base / "text_encoder"), T5EncoderModel.from_pretrained(base / "text_encoder_2")]
    new_ids = [script_add_token(t, e, placeholder, initializer) for t, e in zip(tokenizers, encoders)]
    tables = [e.get_input_embeddings().weight for e in encoders]
    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer").requires_grad_(False)
    scheduler = copy.deepcopy(FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"))

    prompt_embeds, pooled, text_ids = flux_script_encode_prompt(tokenizers[0], encoders[0], tokenizers[1], encoders[1],
                                                               module.instance_prompt)
    latents, noise, timesteps = step["latents"], step["noise"], step["timesteps"]
    bsz = len(latents)
    sigmas = script_get_sigmas(scheduler, timesteps, latents.ndim)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, bsz, *latents.shape[1:])
    img_ids = FluxPipeline._prepare_latent_image_ids(bsz, latents.shape[2] // 2, latents.shape[3] // 2, "cpu", torch.float32)
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.tensor([1.0]).expand(bsz),
                       pooled_projections=pooled.repeat(bsz, 1), encoder_hidden_states=prompt_embeds.repeat(bsz, 1, 1),
                       txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
    vae_factor = 2 ** (len(module.vae.config.block_out_channels) - 1)
    pred = FluxPipeline._unpack_latents(pred, latents.shape[2] * vae_factor, latents.shape[3] * vae_factor, vae_factor)
    loss = torch.mean(((pred.float() - (noise - latents).float()) ** 2).reshape(bsz, -1), 1).mean()
    loss.backward()
    assert all(float(t.grad[i].abs().max()) > 0 for t, i in zip(tables, new_ids))  # T5's row learns too
    if cfg.method.optimizer.max_grad_norm is not None:  # two_stage clips, as the advanced script does (--max_grad_norm)
        torch.nn.utils.clip_grad_norm_(tables, float(cfg.method.optimizer.max_grad_norm))
    script_embedding_step(tables, new_ids, cfg.method.optimizer, lr=1e-2)
    assert_matches_script(step, loss, tables, new_ids)


# ---------------------------------------------------------------- every token method: train, save, stock load, sample
TOKEN_RUNS = {
    ("tiny_sdxl", "textual_inversion"): ["method.stages.token.steps=2", "method.stages.token.checkpoint_every=null"],
    ("tiny_sdxl", "two_stage"): ["method.stages.token.steps=2", "method.stages.unet.steps=1",
                                 "method.stages.unet.checkpoint_every=null"],
    ("tiny_sdxl", "pivotal"): ["method.stages.pivotal.steps=2", "method.stages.pivotal.checkpoint_every=null"],
    ("tiny_flux", "textual_inversion"): ["method.stages.token.steps=2", "method.stages.token.checkpoint_every=null"],
    ("tiny_flux", "two_stage"): ["method.stages.token.steps=2", "method.stages.unet.steps=1",
                                 "method.stages.unet.checkpoint_every=null"],
}
# what each method's stages train, by the start of a state-dict name of the module
TRAINED = {"textual_inversion": (), "two_stage": ("unet.",), "pivotal": ("unet.",)}


def stock_prompt_embeds(pipe, prompt: str) -> list[torch.Tensor]:
    """What the stock pipeline conditions on for `prompt` (it spells a multi-vector token out itself)."""
    with torch.no_grad():
        if type(pipe).__name__ == "FluxPipeline":
            embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device="cpu", max_sequence_length=512)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    return [embeds, pooled]


@pytest.mark.parametrize("model,method", list(TOKEN_RUNS))
def test_a_token_method_trains_only_its_rows_and_loads_in_the_stock_pipeline(model, method, make_cfg, tiny_dirs):
    run = prepare_run(make_cfg(f"model={model}", f"method={method}", "subject=sample_dog", "method.batch_size=2",
                               "eval=none", *TOKEN_RUNS[(model, method)]))
    module = run.module
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(run, evaluate=False)  # and the closing samples, through the backbone's stock pipeline
    after = {n: p.detach().clone() for n, p in module.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}

    rows = set(new_rows(module))  # one per text encoder: CLIP ViT-L and OpenCLIP ViT-bigG / T5
    assert len(rows) == 2 and rows <= changed
    assert any(n.startswith("extra_components.text_encoder_2.") for n in rows)
    others = changed - rows
    assert all(n.startswith(TRAINED[method]) for n in others) if TRAINED[method] else not others
    if method == "pivotal":
        assert others and all("lora_" in n for n in others)

    ckpt = run.checkpoints()[-1]
    keys = {"tiny_sdxl": ["clip_g", "clip_l"], "tiny_flux": ["clip_l", "t5"]}[model]
    with safe_open(ckpt / "learned_embeds.safetensors", "pt") as f:
        assert sorted(f.keys()) == keys and f.metadata() == {"token": module.identifier}
        num_vectors = int(run.cfg.method.new_token.get("num_vectors", 1))
        assert all(f.get_tensor(k).shape[0] == num_vectors for k in keys)
    assert json.loads((ckpt / "checkpoint.json").read_text())["identifier"] == module.identifier

    pipe = stock_pipeline(tiny_dirs[model], ckpt)  # load_textual_inversion once per encoder, as the docs say
    prompt = module.instance_prompt
    ours = module._encode_prompt(prompt)
    expected = [ours["encoder_hidden_states"], ours["text_embeds" if model == "tiny_sdxl" else "pooled_projections"]]
    for stock, trained in zip(stock_prompt_embeds(pipe, prompt), expected):
        torch.testing.assert_close(stock, trained.detach(), rtol=1e-5, atol=1e-6)
    base = stock_prompt_embeds(stock_pipeline(tiny_dirs[model], tiny_dirs[model]), prompt.replace(module.identifier, ""))
    assert not torch.allclose(base[0], expected[0].detach())
    size = {"tiny_sdxl": {}, "tiny_flux": {"height": 64, "width": 64}}[model]
    image = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **size).images[0]
    assert np.isfinite(image).all() and image.std() > 0
    samples = sorted((run.run_dir / "samples").rglob("*.png"))
    assert samples and all(np.asarray(Image.open(p)).std() > 0 for p in samples)


# ---------------------------------------------------------------- what only the second vocabulary refuses
def test_a_placeholder_the_second_vocabulary_has_is_one_line_naming_it(make_cfg, tiny_dirs, tmp_path):
    """'▁dog' is T5's own piece for 'dog' (several byte pieces for CLIP): new to CLIP, taken in T5."""
    cfg = make_cfg("model=tiny_flux", "method=textual_inversion", "subject=sample_dog", "method.identifier='▁dog'",
                   name="refused")
    with pytest.raises(PersonalizeError) as error:
        prepare_run(cfg)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("placeholder '▁dog' is already in tokenizer_2's vocabulary (as '▁dog')")
    assert not (tmp_path / "refused").exists()


def test_an_initializer_of_several_pieces_names_the_tokenizer_it_is_several_in(tiny_dirs):
    from transformers import T5TokenizerFast

    t5 = T5TokenizerFast.from_pretrained(tiny_dirs["tiny_flux"] / "tokenizer_2")
    with pytest.raises(PersonalizeError, match=r"^initializer word 'zebra' is \d+ tokens in tokenizer_2 \("):
        check_new_token(t5, "<x>", "zebra", tokenizer_name="tokenizer_2")
