"""Prompt-to-prompt editing and null-text inversion on the tiny SDXL (`model=tiny_sdxl`, CPU, seconds).

Each reference is computed without the editing code:
- an edit of a prompt into itself without injection is the stock StableDiffusionXLPipeline's DDIM sample from
  the same seed (its own prompt encoding, pooled embeddings, default time ids and unconditional rows);
- the conditioning rows the UNet sees are the encoders' own outputs and the sampling size's time ids;
- under injection, every cross-attention (and, in its window, self-attention) output of the target row is
  recomputed from the layer's own projections with the source row's softmax maps mapped through the word
  alignment, and the other rows with their own maps;
- null-text inversion reconstructs a real photo (data/samples/dog) better than the plain unconditional rows;
- `personalize-edit` edits tiny_sdxl lora and finetune checkpoints and writes the side-by-side.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from personalize.config import PROJECT_ROOT, compose
from personalize.edit import (
    Denoiser, EditSettings, build_controller, ddim_sample, edit_image, invert_image, make_scheduler,
    null_text_inversion, pipeline_backbone, pipeline_tokenizers, prompt_tokens, replace_mapping, shared_prompt_tokens,
    unconditional,
)
from personalize.edit.inversion import decode_latents, encode_image, encode_text, native_size, preprocess
from personalize.edit.runner import check_backbone, psnr
from personalize.errors import PersonalizeError
from personalize.rundir import CheckpointInfo
from tests.test_edit_cli import _cli

DOG = PROJECT_ROOT / "data" / "samples" / "dog" / "00.jpg"
PHOTO = PROJECT_ROOT / "data" / "samples" / "dog2" / "00.jpg"
SRC, TGT = "a photo of a dog on the beach", "a photo of a zebra on the beach"  # "zebra": five BPE pieces
STEPS = 4


def _load(path: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    return _load(tiny_sdxl_dir)


def stock_ddim(pipe):
    """The stock pipeline on the same components with a DDIM scheduler from the model's scheduler config. x0 is
    not clipped: our DDIM never clips (latents are not images; SDXL's Euler config leaves DDIM's default
    clip_sample=True, which would cut SDXL latents at +-1)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    parts = {k: v for k, v in pipe.components.items() if k != "scheduler"}
    stock = StableDiffusionXLPipeline(**parts, scheduler=DDIMScheduler.from_config(pipe.scheduler.config,
                                                                                   clip_sample=False))
    stock.register_to_config(force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
    stock.set_progress_bar_config(disable=True)
    return stock


def reference_encoding(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' penultimate hidden states side by side, and the second's projected pooled output,
    straight from the tokenizers and encoders (as train_dreambooth_lora_sdxl.py's encode_prompt)."""
    hidden = []
    with torch.no_grad():
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, -1), output.text_embeds


def record_unet_inputs(unet) -> tuple[list[dict], object]:
    """Every UNet call's conditioning (encoder_hidden_states and added_cond_kwargs), in call order."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        calls.append({"context": context.detach().clone(),
                      **{k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()}})

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


def _psnr_of(pipe, latents: torch.Tensor, reference: Image.Image) -> float:
    return psnr(reference, decode_latents(pipe, latents)[0])


# --------------------------------------------------------------------------------- the stock sample and rows
@pytest.mark.parametrize("force_zeros,height,width", [(True, 64, 64), (True, 64, 96), (False, 64, 96)])
def test_an_edit_without_injection_is_the_stock_sdxl_sample(pipe, force_zeros, height, width):
    """Both rows of a prompt edited into itself with mode=none equal the stock pipeline's sample from the same
    seed, with its own unconditional rows either way (force_zeros_for_empty_prompt: zeros, else "") and the
    time ids of a non-square size. The batch shapes differ (4 rows here, 2 there): a tolerance."""
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    try:
        result = edit_image(pipe, SRC, SRC, seed=3, mode="none", num_inference_steps=STEPS, height=height, width=width)
        stock = stock_ddim(pipe)(SRC, num_inference_steps=STEPS, height=height, width=width, guidance_scale=7.5,
                                 generator=torch.Generator().manual_seed(3), output_type="latent").images
        other = stock_ddim(pipe)
        other.register_to_config(force_zeros_for_empty_prompt=not force_zeros)
        wrong = other(SRC, num_inference_steps=STEPS, height=height, width=width, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(3), output_type="latent").images
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    assert result.latents.shape == (2, 4, height // 8, width // 8)
    for row in result.latents:
        torch.testing.assert_close(row, stock[0], rtol=1e-4, atol=5e-4)
    # the match is not loose: the other unconditional rows give another sample
    assert (wrong[0] - stock[0]).abs().max() > 100 * 5e-4
    # the same without any controller: the plain DDIM loop on the backbone's conditioning
    backbone = pipeline_backbone(pipe)
    start = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(3))
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    try:
        plain = ddim_sample(Denoiser(pipe.unet, backbone), make_scheduler(pipe.scheduler.config, STEPS), start,
                            encode_text(pipe, [SRC], height, width), unconditional(pipe, height, width), 7.5)
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    torch.testing.assert_close(plain[0], stock[0], rtol=1e-4, atol=5e-4)


def test_the_unet_sees_each_rows_text_pooled_embedding_and_the_sample_size(pipe):
    calls, handle = record_unet_inputs(pipe.unet)
    try:
        edit_image(pipe, SRC, TGT, seed=0, num_inference_steps=2, height=64, width=96)
    finally:
        handle.remove()
    assert len(calls) == 2  # one UNet call per step, the guidance batch [uncond_src, uncond_tgt, src, tgt]
    src_hidden, src_pooled = reference_encoding(pipe, SRC)
    tgt_hidden, tgt_pooled = reference_encoding(pipe, TGT)
    for call in calls:
        assert call["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 4
        assert torch.equal(call["context"][:2], torch.zeros(2, 77, 64))  # SDXL base: zeroed unconditional rows
        assert torch.equal(call["text_embeds"][:2], torch.zeros(2, 32))
        torch.testing.assert_close(call["context"][2:], torch.cat([src_hidden, tgt_hidden]), rtol=0, atol=1e-6)
        torch.testing.assert_close(call["text_embeds"][2:], torch.cat([src_pooled, tgt_pooled]), rtol=0, atol=1e-6)


def test_the_default_size_is_the_unets_native_one(pipe):
    assert native_size(pipe) == (64, 64)
    assert edit_image(pipe, SRC, SRC, num_inference_steps=1).edited.size == (64, 64)
    # stabilityai/stable-diffusion-xl-base-1.0: unet sample_size 128, VAE 8x: 1024 px as the stock pipeline
    real = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=128)), vae_scale_factor=8)
    assert native_size(real) == (1024, 1024)


def test_a_float16_sdxl_vae_encodes_and_decodes_in_float32(tiny_sdxl_dir):
    """SDXL's VAE overflows in float16 (its config says force_upcast): as the stock pipeline, the photo is encoded
    and the latents decoded with the VAE upcast to float32, and the VAE is float16 again afterwards."""
    from personalize.edit.inversion import vae_precision

    pipe = _load(tiny_sdxl_dir)
    photo = Image.open(DOG).convert("RGB")
    pipe.vae.to(torch.float16).to(torch.float32)  # the float16-rounded weights, in float32: the reference
    z0 = encode_image(pipe, photo, 64, 64)
    expected = decode_latents(pipe, z0)[0]
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    torch.testing.assert_close(encode_image(pipe, photo, 64, 64), z0, rtol=0, atol=0)
    assert decode_latents(pipe, z0)[0].tobytes() == expected.tobytes()
    assert pipe.vae.dtype == torch.float16
    pipe.vae.register_to_config(force_upcast=False)  # a VAE that is fine in float16 stays in it
    with vae_precision(pipe.vae) as dtype:
        assert dtype == torch.float16


# --------------------------------------------------------------------------------- both tokenizers
def test_both_clip_tokenizers_place_every_word_alike(pipe):
    pairs = pipeline_tokenizers(pipe)
    assert [tok for tok, _ in pairs] == [pipe.tokenizer, pipe.tokenizer_2]
    first, second = (prompt_tokens(tok, TGT, convert) for tok, convert in pairs)
    assert first.spans == second.spans and first.spans[4] == (5, 6, 7, 8, 9)  # z e b r a in both
    assert first.length == second.length == 14  # BOS, 12 word tokens, EOS
    assert pipe.tokenizer.pad_token_id != pipe.tokenizer_2.pad_token_id  # the padding differs, not the positions
    assert shared_prompt_tokens(pairs, TGT) == first
    # a token in one tokenizer only splits differently in the other: one line, naming the word
    tokenizer = copy.deepcopy(pipe.tokenizer)
    tokenizer.add_tokens(["<only1>"])
    with pytest.raises(ValueError, match="from the word '<only1>' on") as error:
        shared_prompt_tokens([(tokenizer, None), (pipe.tokenizer_2, None)], "a photo of <only1> dog")
    assert "\n" not in str(error.value)


def test_a_textual_inversion_token_in_both_encoders_spans_its_vectors(tiny_sdxl_dir):
    """SDXL embedding files carry one tensor per encoder (clip_l, clip_g); loaded into each, a two-vector token
    "<rare>" becomes "<rare> <rare>_1" in both tokenizers: one word of two positions, the same in both."""
    pipe = _load(tiny_sdxl_dir)
    g = torch.Generator().manual_seed(0)
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                    ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        pipe.load_textual_inversion(torch.randn(2, 32, generator=g), token="<rare>", tokenizer=tokenizer,
                                    text_encoder=encoder)
    target = "a photo of <rare> dog on the beach"
    tokens = shared_prompt_tokens(pipeline_tokenizers(pipe), target)
    assert tokens.spans[3] == (4, 5) and tokens.spans[4] == (6,)
    controller = build_controller(pipeline_tokenizers(pipe), SRC, target, EditSettings())
    assert torch.equal(controller.mapper[0, 4, 4:6], torch.full((2,), 0.5)) and controller.mapper[0, 5, 6] == 1
    result = edit_image(pipe, SRC, target, seed=1, num_inference_steps=2)
    assert (result.latents[0] - result.latents[1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------- prompt-to-prompt's maps
def _attention(attn, hidden: torch.Tensor, context: torch.Tensor, probs: torch.Tensor | None = None):
    """(softmax maps [B, heads, q, k], output) of a diffusers Attention from its own projections; with
    `probs` given, those maps are used instead of the row's own (what injection does)."""
    batch, queries, _ = hidden.shape
    heads = attn.heads

    def split(x):
        return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(context))
    own = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    used = own if probs is None else probs
    out = (used @ v).transpose(1, 2).reshape(batch, queries, -1)
    return own, attn.to_out[1](attn.to_out[0](out))


def test_injected_maps_are_the_sources_mapped_at_the_injected_steps_only(pipe):
    """4 steps, cross-attention injected in the first half and self-attention in the first quarter (at every
    layer: self_min_downsample=1). At every attention layer and step, the rows' outputs are recomputed from
    what the layer was given: the unconditional and source rows with their own maps; the target with the
    source's maps (cross: through Replace's word mapping) inside the windows, its own outside."""
    settings = dict(mode="replace", cross_steps=0.5, self_steps=0.25, self_min_downsample=1)
    layers = {name: module for name, module in pipe.unet.named_modules() if name.endswith(("attn1", "attn2"))}
    assert {n.split(".")[0] for n in layers} == {"down_blocks", "mid_block", "up_blocks"}
    assert not any(n.startswith(("down_blocks.0.", "up_blocks.1.")) for n in layers)  # SDXL's plain blocks
    assert any(".transformer_blocks.1." in n for n in layers)  # several transformer layers in a block
    records: list[tuple[int, str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    step = [-1]

    def on_unet(module, args, kwargs):
        step[0] += 1

    def on_layer(name):
        def hook(module, args, kwargs, output):
            hidden = args[0]
            context = kwargs.get("encoder_hidden_states")
            records.append((step[0], name, hidden.detach(), (hidden if context is None else context).detach(),
                            output.detach()))
        return hook

    handles = [pipe.unet.register_forward_pre_hook(on_unet, with_kwargs=True)]
    handles += [m.register_forward_hook(on_layer(n), with_kwargs=True) for n, m in layers.items()]
    try:
        result = edit_image(pipe, SRC, TGT, seed=5, num_inference_steps=STEPS, **settings)
    finally:
        for handle in handles:
            handle.remove()
    mapper = replace_mapping(prompt_tokens(pipe.tokenizer, SRC), prompt_tokens(pipe.tokenizer, TGT))
    assert torch.equal(result.attention.mapper[0], mapper)
    assert step[0] == STEPS - 1 and len(records) == STEPS * len(layers)
    injected_differs = 0
    with torch.no_grad():
        for i, name, hidden, context, output in records:
            attn, cross = layers[name], name.endswith("attn2")
            own, plain = _attention(attn, hidden, context)  # rows: [uncond_src, uncond_tgt, src, tgt]
            inject = i < (2 if cross else 1)
            torch.testing.assert_close(output[:3], plain[:3], rtol=1e-4, atol=1e-5)
            if inject:
                source_maps = own[2:3]
                maps = torch.einsum("bhqs,st->bhqt", source_maps, mapper) if cross else source_maps
                _, expected = _attention(attn, hidden[3:], context[3:], maps)
                injected_differs += int((expected - plain[3:]).abs().max() > 1e-3)
            else:
                expected = plain[3:]
            torch.testing.assert_close(output[3:], expected, rtol=1e-4, atol=1e-5, msg=f"{name} at step {i}")
    assert injected_differs >= len(layers) // 2  # injection changed the target's outputs, not a no-op


# --------------------------------------------------------------------------------- null-text inversion
def test_null_text_inversion_reconstructs_the_dog_better_than_the_plain_unconditional_rows(pipe):
    """On the real photo data/samples/dog/00.jpg: DDIM-invert it, then sample at guidance 7.5 from the inverted
    noise with the stock unconditional rows (zeros), with null-text inversion's (10 steps of 5 inner Adam steps,
    lr 1e-2), and with null-text inversion of the per-token embeddings alone.

    Measured in latent space, against the photo's own latent: the tiny VAE has random weights, so every latent
    decodes to about 9.5 dB from the photo (the photo's own latent included: the "VAE alone" PSNR), and image
    PSNR cannot tell a good reconstruction from a bad one on this model. The PSNRs are printed all the same."""
    steps = 10
    backbone = pipeline_backbone(pipe)
    denoiser = Denoiser(pipe.unet, backbone)
    photo = Image.open(DOG).convert("RGB")
    shown = preprocess_image(photo, 64, 64)
    z0 = encode_image(pipe, photo, 64, 64)
    cond, uncond = encode_text(pipe, ["a photo of a dog"]), unconditional(pipe)
    scheduler = make_scheduler(pipe.scheduler.config, steps)
    both = null_text_inversion(denoiser, scheduler, z0, cond, uncond, 7.5, 5, 1e-2)
    tokens_only = null_text_inversion(denoiser, scheduler, z0, cond, uncond, 7.5, 5, 1e-2,
                                      keys=("encoder_hidden_states",))
    assert torch.equal(both.latent, tokens_only.latent)  # the same DDIM inversion: only the fitted rows differ
    samples = {"plain": ddim_sample(denoiser, scheduler, both.latent, cond, uncond, 7.5),
               "null-text": ddim_sample(denoiser, scheduler, both.latent, cond, both.uncond, 7.5),
               "null-text, tokens only": ddim_sample(denoiser, scheduler, both.latent, cond, tokens_only.uncond, 7.5)}
    errors = {name: (x - z0).pow(2).mean().item() for name, x in samples.items()}
    psnrs = {name: _psnr_of(pipe, x, shown) for name, x in samples.items()} | {"VAE alone": _psnr_of(pipe, z0, shown)}
    print(f"latent MSE to the photo's latent {errors}; PSNR to the photo {psnrs}")
    assert errors["null-text"] < 0.75 * errors["plain"]
    # the pooled embedding too (null_text_keys' choice) fits better than the per-token embeddings alone
    assert errors["null-text"] < 0.99 * errors["null-text, tokens only"] < errors["plain"]
    assert backbone.null_text_keys() == ("encoder_hidden_states", "text_embeds")
    for fitted in both.uncond:  # the text tensors moved off the zeros, the image size did not move
        assert torch.equal(fitted["time_ids"], uncond["time_ids"])
        assert fitted["text_embeds"].abs().max() > 0 and fitted["encoder_hidden_states"].abs().max() > 0
    assert all(torch.equal(fitted["text_embeds"], uncond["text_embeds"]) for fitted in tokens_only.uncond)
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_a_photo_is_edited_at_the_size_it_was_inverted_at(pipe, tmp_path):
    photo = Image.open(DOG).convert("RGB")
    inversion = invert_image(pipe, photo, "a photo of a dog", num_inference_steps=2, null_text_inner_steps=2,
                             height=64, width=96)
    assert inversion.uncond[0]["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]
    calls, handle = record_unet_inputs(pipe.unet)
    try:  # no height/width given: the inversion's size, for the prompts' time ids as for the unconditional rows
        result = edit_image(pipe, "a photo of a dog", "a photo of a zebra", inversion=inversion,
                            num_inference_steps=2)
    finally:
        handle.remove()
    assert result.edited.size == (96, 64) and result.source.size == (96, 64)
    assert all(call["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 4 for call in calls)
    assert torch.equal(calls[0]["text_embeds"][:1], inversion.uncond[0]["text_embeds"])
    assert psnr(inversion.image, preprocess_image(photo, 64, 96)) == float("inf")


def preprocess_image(photo: Image.Image, height: int, width: int) -> Image.Image:
    shown = preprocess(photo, height, width)[0].permute(1, 2, 0)
    return Image.fromarray(((shown + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())


# --------------------------------------------------------------------------------- the CLI on SDXL runs
def _train(tmp_path_factory, method: str, *overrides: str) -> Path:
    from personalize.train import train

    run_dir = tmp_path_factory.mktemp(f"edit-sdxl-{method}") / "run"
    train(compose("train", [f"method={method}", "model=tiny_sdxl", "subject=sample_dog", "debug=default",
                            "eval=none", "++eval.enabled=false", *overrides], output_dir=run_dir))
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "lora", "method.stages.lora.steps=2", "method.stages.lora.checkpoint_every=null",
                  "method.stages.lora.lr=2e-2")


def test_cli_edits_a_photo_with_a_tiny_sdxl_lora_checkpoint(lora_run, tmp_path):
    out = tmp_path / "edit"
    proc = _cli(f"run_dir={lora_run}", f"image={PHOTO}", f"out_dir={out}", "edit=fast", "edit.num_inference_steps=4",
                "edit.null_text_inner_steps=2", "logger=none",
                'source_prompt="a photo of a {class_noun}"', 'target_prompt="a photo of {phrase} on the beach"')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"side by side: {out / 'side_by_side.png'}"
    record = json.loads((out / "edit.json").read_text())
    assert record["method"] == "lora" and record["config"]["run_dir"] == str(lora_run)
    assert record["target_prompt"] == f"a photo of {record['phrase']} on the beach" and record["controller"] == "Refine"
    assert record["reconstruction_psnr"] > 0 and record["vae_psnr"] > 0
    assert Image.open(out / "edited.png").size == Image.open(out / "reconstruction.png").size == (64, 64)
    assert Image.open(out / "side_by_side.png").width == 3 * 256  # photo | null-text reconstruction | edit
    words = len(record["target_prompt"].split())
    assert Image.open(out / "attention_target.png").width == words * 128  # one tile per target word


def test_a_finetune_checkpoint_edits_a_generated_image(tmp_path_factory, tmp_path):
    from personalize.edit.runner import run_edit

    run_dir = _train(tmp_path_factory, "finetune", "method.stages.unet.steps=1",
                     "method.stages.unet.checkpoint_every=null")
    out = run_edit(compose("edit", [f"run_dir={run_dir}", f"out_dir={tmp_path / 'gen'}", "edit=local_blend",
                                    "edit.num_inference_steps=3", "logger=none"]))
    record = json.loads((out / "edit.json").read_text())
    assert record["method"] == "finetune" and record["image"] is None
    assert record["controller"] == "Replace" and record["settings"]["blend_words"] == ["dog", record["identifier"]]
    assert Image.open(out / "side_by_side.png").width == 2 * 256  # a generated source: source | edit


def test_flux_stays_refused_in_one_line(tmp_path):
    """Before the model loads (check_backbone reads checkpoint.json only); docs/editing.md quotes the line."""
    info = CheckpointInfo(step=1, identifier="<rare>", class_noun="dog", model={"backbone": "flux"})
    with pytest.raises(PersonalizeError) as error:
        check_backbone(tmp_path / "step-000001", info)
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"{tmp_path / 'step-000001'} is a checkpoint of model.backbone=flux: editing supports the "
                       "sd and sdxl backbones only (prompt-to-prompt's attention control is built for their "
                       "cross-attention layers): sample it with `personalize-sample` instead, or edit a run of "
                       "model.backbone=sd or model.backbone=sdxl")
    assert type(check_backbone(tmp_path, CheckpointInfo(step=1, identifier="x", class_noun="dog",
                                                        model={"backbone": "sdxl"}))).__name__ == "StableDiffusionXL"
