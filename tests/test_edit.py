"""Prompt-to-prompt editing and null-text inversion on the tiny SD (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.edit import (
    EditSettings, Refine, Replace, build_controller, controlled_attention, edit_image, prompt_tokens,
    refine_mapping, replace_mapping, save_attention_maps, save_side_by_side,
)
from personalize.edit.attention import ControlledAttnProcessor, spatial_size
from personalize.backbones.sd import StableDiffusion
from personalize.edit.inversion import (
    Denoiser, ddim_invert, ddim_sample, encode_image, encode_text, make_scheduler, null_text_inversion,
    pipeline_backbone,
)
from personalize.tiny import ensure_tiny_sd

DOG_PHOTO = Path("/work/shared/dreambooth/dog/00.jpg")
SRC = "a photo of a dog on the beach"
STEPS = 10
FULL = dict(cross_steps=1.0, self_steps=1.0, self_min_downsample=1)  # inject everything, every layer


@pytest.fixture(scope="session")
def edit_sd_path(tmp_path_factory) -> Path:
    return ensure_tiny_sd(tmp_path_factory.mktemp("edit") / "tiny-sd")


def _load(path: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(edit_sd_path):
    return _load(edit_sd_path)


def _photo() -> Image.Image:
    """The DreamBooth dog if the dataset is here, else a synthetic picture (never skip)."""
    if DOG_PHOTO.exists():
        return Image.open(DOG_PHOTO).convert("RGB")
    y, x = np.mgrid[0:96, 0:128] / 96.0
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, ((x - 0.6) ** 2 + (y - 0.5) ** 2 < 0.1) * 1.0], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- token mapping ---------------------------------------------------------------------------------


def test_multi_token_word_spans(pipe):
    tokens = prompt_tokens(pipe.tokenizer, "a photo of a zebra")
    assert tokens.words == ("a", "photo", "of", "a", "zebra")
    assert tokens.spans == ((1,), (2,), (3,), (4,), (5, 6, 7, 8, 9))  # z e b r a: five BPE pieces
    assert tokens.length == 11  # BOS + 9 + EOS
    assert tokens.positions(["a"]) == [1, 4]


def test_replace_mapping_multi_token(pipe):
    src = prompt_tokens(pipe.tokenizer, SRC)
    tgt = prompt_tokens(pipe.tokenizer, "a photo of a zebra on the beach")
    m = replace_mapping(src, tgt)
    assert torch.equal(m[5, 5:10], torch.full((5,), 0.2))  # dog spreads its attention over z e b r a
    assert m[5].sum() == 1 and m[5, :5].sum() == 0 and m[5, 10:].sum() == 0
    for s, t in [(0, 0), (1, 1), (4, 4), (6, 10), (7, 11), (8, 12), (9, 13), (10, 14)]:  # shifted after zebra
        assert m[s, t] == 1, (s, t)
    assert torch.equal(m.sum(1), torch.ones(77))  # row-stochastic: edited maps stay distributions
    assert m[73:, 76].tolist() == [1, 1, 1, 1]  # surplus source padding lands on the last slot
    back = replace_mapping(tgt, src)  # zebra -> dog: all five pieces feed the one token
    assert torch.equal(back[5:10, 5], torch.ones(5))
    assert torch.equal(replace_mapping(src, src), torch.eye(77))  # a word replaced by itself
    with pytest.raises(ValueError, match="same number of words"):
        replace_mapping(src, prompt_tokens(pipe.tokenizer, "a photo of a zebra dog on the beach"))


def test_refine_mapping_multi_token(pipe):
    src = prompt_tokens(pipe.tokenizer, "a photo of a dog")
    tgt = prompt_tokens(pipe.tokenizer, "a photo of a zebra dog")
    index, alpha = refine_mapping(src, tgt)
    assert alpha[5:10].sum() == 0  # the new word keeps its own attention, all five pieces
    assert index[10] == 5 and alpha[10] == 1  # dog still reads dog
    assert index[11] == 6 and index[12] == 7 and alpha[11:].min() == 1  # EOS/padding follow EOS
    assert index[:5].tolist() == [0, 1, 2, 3, 4] and alpha[:5].min() == 1
    # A multi-token word common to both prompts moves as a whole when words are inserted before it.
    src = prompt_tokens(pipe.tokenizer, "a zebra on the beach")
    tgt = prompt_tokens(pipe.tokenizer, "a photo of a zebra on the beach")
    index, alpha = refine_mapping(src, tgt)
    assert index[5:10].tolist() == [2, 3, 4, 5, 6] and alpha[5:10].min() == 1
    assert alpha[2:5].sum() == 0  # "photo of a" are new
    index, alpha = refine_mapping(src, src)
    assert torch.equal(index, torch.arange(77)) and torch.equal(alpha, torch.ones(77))


# --- controllers on the sampling loop --------------------------------------------------------------


@pytest.mark.parametrize("mode,guidance", [("replace", 7.5), ("refine", 7.5), ("replace", 1.0)])
def test_identical_prompts_full_injection_reproduce_source(pipe, mode, guidance):
    result = edit_image(pipe, SRC, SRC, seed=1, mode=mode, num_inference_steps=STEPS, guidance_scale=guidance, **FULL)
    assert _max_diff(result.latents[0], result.latents[1]) <= 1e-6
    assert np.array_equal(np.asarray(result.source), np.asarray(result.edited))
    assert result.attention.cur_step == STEPS and result.attention.sums  # the controller really ran


def test_an_edit_without_injection_is_the_stock_pipelines_ddim_sample(pipe):
    """Both rows of a prompt edited into itself with mode=none are StableDiffusionPipeline's DDIM sample from the
    same seed (its prompt encoding and "" unconditional row through Backbone.edit_conditioning/edit_unconditional);
    the stock batch has 2 rows, ours 4: a tolerance. Its DDIM does not clip x0, as ours never does."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    result = edit_image(pipe, SRC, SRC, seed=6, mode="none", num_inference_steps=4, height=64, width=96)
    stock = StableDiffusionPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config, clip_sample=False)})
    stock.set_progress_bar_config(disable=True)
    expected = stock(SRC, num_inference_steps=4, height=64, width=96, generator=torch.Generator().manual_seed(6),
                     output_type="latent").images[0]
    for row in result.latents:
        torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)


def test_reweight_one_and_self_replace_are_identity(pipe):
    one = edit_image(pipe, SRC, SRC, seed=2, num_inference_steps=STEPS, reweight={"dog": 1.0})
    assert _max_diff(one.latents[0], one.latents[1]) <= 1e-6
    same = edit_image(pipe, SRC, SRC, seed=2, num_inference_steps=STEPS, mode="replace")
    assert _max_diff(same.latents[0], same.latents[1]) <= 1e-6
    # ...while a real factor does change the target, and never the source.
    loud = edit_image(pipe, SRC, SRC, seed=2, num_inference_steps=STEPS, reweight={"dog": 5.0})
    assert _max_diff(loud.latents[0], loud.latents[1]) > 1e-3
    assert _max_diff(loud.latents[0], one.latents[0]) <= 1e-6


def test_injection_changes_only_the_target(pipe):
    tgt = "a photo of a zebra on the beach"
    plain = edit_image(pipe, SRC, tgt, seed=3, num_inference_steps=STEPS, mode="none")
    edited = edit_image(pipe, SRC, tgt, seed=3, num_inference_steps=STEPS, **FULL)
    assert isinstance(edited.attention, Replace)
    assert _max_diff(plain.latents[0], edited.latents[0]) <= 1e-6
    assert _max_diff(plain.latents[1], edited.latents[1]) > 1e-3


def test_reweight_composes_with_refine(pipe):
    settings = EditSettings(reweight={"zebra": 2.0}, num_inference_steps=STEPS)
    controller = build_controller(pipe.tokenizer, "a photo of a dog", "a photo of a zebra dog", settings)
    assert isinstance(controller.base, Refine)
    assert controller.weights[0, 5:10].tolist() == [2.0] * 5 and controller.weights[0, 10] == 1.0
    result = edit_image(pipe, "a photo of a dog", "a photo of a zebra dog", settings=settings)
    assert torch.isfinite(result.latents).all()


def test_local_blend_keeps_outside_of_mask(pipe):
    result = edit_image(pipe, SRC, "a photo of a zebra on the beach", seed=4, num_inference_steps=STEPS,
                        blend_words=["dog", "zebra"], blend_threshold=0.8, blend_start=0.0)
    mask = result.blend_mask[1, 0]
    assert mask.shape == result.latents.shape[-2:]
    assert 0 < mask.float().mean() < 1, "the test needs a partial mask"
    source, target = result.latents
    assert torch.equal(source[:, ~mask], target[:, ~mask])  # outside: the source latent, bit for bit
    assert _max_diff(source[:, mask], target[:, mask]) > 1e-3  # inside: edited


def test_processors_restored(pipe):
    before = dict(pipe.unet.attn_processors)
    edit_image(pipe, SRC, SRC, num_inference_steps=2)
    after = pipe.unet.attn_processors
    assert before.keys() == after.keys() and all(after[k] is before[k] for k in before)
    with pytest.raises(RuntimeError), controlled_attention(pipe.unet, build_controller(
            pipe.tokenizer, SRC, SRC, EditSettings())):
        assert all(isinstance(p, ControlledAttnProcessor) for p in pipe.unet.attn_processors.values())
        raise RuntimeError("boom")
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)


def test_spatial_size():
    assert spatial_size(64, (8, 8)) == (8, 8) and spatial_size(16, (8, 8)) == (4, 4)
    assert spatial_size(36, (12, 12)) == (6, 6) and spatial_size(9, (12, 12)) == (3, 3)
    assert spatial_size(24, (8, 12)) == (4, 6)
    assert spatial_size(256, (64, 64)) == (16, 16) and spatial_size(4096 // 64, (64, 64)) == (8, 8)


@pytest.mark.parametrize("height,width", [(64, 64), (96, 96), (64, 96)])
def test_any_resolution(pipe, height, width):
    result = edit_image(pipe, SRC, "a photo of a zebra on the beach", seed=5, num_inference_steps=4,
                        height=height, width=width, blend_words=["dog", "zebra"], **FULL)
    assert result.edited.size == (width, height)
    lh, lw = height // 8, width // 8
    sizes = {(h, w) for (_, kind, h, w) in result.attention.sums if kind == "cross"}
    assert sizes == {(lh, lw), ((lh + 1) // 2, (lw + 1) // 2)}
    assert result.blend_mask.shape[-2:] == (lh, lw)
    assert torch.isfinite(result.latents).all()


# --- inversion -------------------------------------------------------------------------------------


def test_ddim_inversion_is_exact_for_an_exact_score():
    """Gaussian data has a closed-form noise predictor; DDIM invert+sample must then round-trip."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1).config
    errors = []
    for steps in (10, 50):
        scheduler = make_scheduler(config, steps)

        def unet(x, t, encoder_hidden_states=None, sigma=0.5, scheduler=scheduler):
            a = scheduler.alphas_cumprod[int(t)]
            return SimpleNamespace(sample=(1 - a).sqrt() * x / (a * sigma ** 2 + 1 - a))

        unet.dtype = torch.float32
        denoiser = Denoiser(unet, StableDiffusion(None))
        z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
        trajectory = ddim_invert(denoiser, scheduler, z0, torch.zeros(1, 1, 1))
        back = ddim_sample(denoiser, scheduler, trajectory[0], torch.zeros(1, 1, 1), None, 1.0)
        errors.append((back - z0).pow(2).mean().item())
    assert errors[1] < errors[0] < 0.02 and errors[1] < 1e-3


def test_null_text_beats_ddim_inversion_under_guidance(pipe):
    scheduler = make_scheduler(pipe.scheduler.config, STEPS)
    z0 = encode_image(pipe, _photo(), 64, 64)
    cond, uncond = encode_text(pipe, ["a photo of a dog"]), encode_text(pipe, [""])
    denoiser = Denoiser(pipe.unet, pipeline_backbone(pipe))
    inversion = null_text_inversion(denoiser, scheduler, z0, cond, uncond, guidance_scale=7.5)
    ddim = ddim_sample(denoiser, scheduler, inversion.latent, cond, uncond, 7.5)
    null = ddim_sample(denoiser, scheduler, inversion.latent, cond, inversion.uncond, 7.5)
    ddim_error = (ddim - z0).pow(2).mean().item()
    null_error = (null - z0).pow(2).mean().item()
    print(f"latent MSE at guidance 7.5: DDIM inversion {ddim_error:.4f}, null-text {null_error:.4f}")
    assert null_error < ddim_error
    assert all(p.grad is None for p in pipe.unet.parameters())  # only the embedding was optimised


def test_edit_real_photo_with_textual_inversion_token(edit_sd_path, tmp_path):
    """The point of it all: put a learned subject ("<rare>", two vectors here) into an existing photo."""
    from safetensors.torch import save_file

    pipe = _load(edit_sd_path)
    save_file({"<rare>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(str(tmp_path))
    target = "a photo of <rare> dog on the beach"
    from personalize.edit.inversion import convert_prompt

    tokens = prompt_tokens(pipe.tokenizer, target, convert_prompt(pipe))
    assert len(tokens.spans[3]) == 2  # "<rare>" -> "<rare> <rare>_1"
    m = replace_mapping(prompt_tokens(pipe.tokenizer, SRC, convert_prompt(pipe)), tokens)
    assert torch.equal(m[4, 4:6], torch.full((2,), 0.5)) and m[5, 6] == 1  # a -> <rare>; dog shifted by one

    from personalize.edit import invert_image

    inversion = invert_image(pipe, _photo(), SRC, num_inference_steps=STEPS)
    for mode in ("replace", "refine"):
        result = edit_image(pipe, SRC, target, inversion=inversion, mode=mode, num_inference_steps=STEPS,
                            blend_words=["dog", "<rare>"])
        assert result.source.size == result.edited.size == (64, 64)
        assert _max_diff(result.latents[0], result.latents[1]) > 1e-3
    side = save_side_by_side(result, tmp_path / "edit.png")
    assert (tmp_path / "edit.png").exists() and side.width == 3 * 256  # photo | reconstruction | edited
    maps = save_attention_maps(result.attention, pipe.tokenizer, target, tmp_path / "maps.png", prompt_index=1,
                               image=result.edited, convert=convert_prompt(pipe))
    assert (tmp_path / "maps.png").exists() and maps.width == 8 * 128  # one tile per word


def test_controller_edits_only_the_conditional_target_rows(pipe):
    """Direct check on a guidance batch [uncond_src, uncond_tgt, cond_src, cond_tgt] of attention rows."""
    from personalize.edit.attention import AttnMeta

    controller = build_controller(pipe.tokenizer, SRC, "a photo of a zebra on the beach", EditSettings(**FULL))
    controller.begin(num_steps=4, latent_hw=(8, 8), n_prompts=2, cfg=True)
    heads = 4
    probs = torch.rand(4 * heads, 64, 77, generator=torch.Generator().manual_seed(0)).softmax(-1)
    meta = AttnMeta("x.attn2.processor", "down", True, heads, 8, 8, 1)
    out = controller(probs, meta)
    assert torch.equal(out[: 3 * heads], probs[: 3 * heads])  # both unconditional rows and the source
    expected = torch.einsum("hqs,st->hqt", probs[2 * heads: 3 * heads], controller.mapper[0])
    assert torch.allclose(out[3 * heads:], expected)
    assert torch.allclose(out[3 * heads:].sum(-1), torch.ones(heads, 64), atol=1e-5)  # still a distribution
    self_meta = AttnMeta("x.attn1.processor", "down", False, heads, 8, 8, 1)
    self_probs = torch.rand(4 * heads, 64, 64).softmax(-1)
    out = controller(self_probs, self_meta)
    assert torch.equal(out[3 * heads:], self_probs[2 * heads: 3 * heads])  # self-attention injected
    controller.cur_step = 4  # outside both windows: untouched
    assert controller(probs, meta) is probs
