"""The SDXL backbone on the tiny random-weight SDXL (`model=tiny_sdxl`).

- Parity: one LoRA training step equals our own reimplementation of diffusers'
  train_dreambooth_lora_sdxl.py step on the same latents, noise, timesteps and prompt (both encoders'
  penultimate hidden states, the second's pooled projection, the time ids of each photo's original size and
  centre crop): same loss, gradients and updated LoRA weights. The photos are of several sizes and
  orientations, so the time ids differ per row.
- Random crops and flips: each row's crop corner locates the very pixels that trained in the (mirrored)
  resized photo.
- lora, dreambooth (prior preservation with class images from the SDXL pipeline) and finetune train,
  checkpoint, load in a stock `StableDiffusionXLPipeline` (LoRA with its alpha) and sample; evaluation on
  the DreamBooth protocol runs on a tiny_sdxl run; the CLI runs it.
- What SDXL does not train here (Custom Diffusion, a text encoder's weights) is one line before anything is written;
  the token methods are tests/test_new_token_backbones.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from personalize.config import PROJECT_ROOT, compose
from personalize.errors import PersonalizeError
from personalize.methods.module import Personalizer
from personalize.train import fit, prepare_run
from tests.helpers import (assert_step_matches, changed_fraction, fixed_loss, record_steps, script_adamw_step, snapshot,
                           stock_pipeline)

SAMPLE_DOG = PROJECT_ROOT / "data" / "samples" / "dog"
ORIENTATION = 0x0112


@pytest.fixture
def sdxl_cfg(make_cfg):
    def _make(*overrides: str, name: str = "run"):
        return make_cfg("model=tiny_sdxl", *overrides, name=name)

    return _make


@pytest.fixture
def odd_photos(tmp_path) -> Path:
    """Four photos of the sample dog in other shapes: landscape, portrait, a landscape file that EXIF turns
    upright, and one smaller than the resolution."""
    folder = tmp_path / "odd_dog"
    folder.mkdir()
    photos = sorted(SAMPLE_DOG.glob("*.jpg"))
    Image.open(photos[0]).resize((112, 80)).save(folder / "00.jpg")
    Image.open(photos[1]).resize((72, 104)).save(folder / "01.jpg")
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored 120x90, shown turned by 90 degrees: 90 wide, 120 high
    Image.open(photos[2]).resize((120, 90)).save(folder / "02.jpg", exif=exif)
    Image.open(photos[3]).resize((48, 48)).save(folder / "03.jpg")
    return folder


def folder_subject(folder: Path) -> list[str]:
    return ["subject=folder", f"subject.data_dir={folder}", "subject.class_noun=dog"]


# ---------------------------------------------------------------- the reference: train_dreambooth_lora_sdxl.py
def script_time_ids(photo: Path, resolution: int) -> list[int]:
    """What train_dreambooth_lora_sdxl.py computes for one photo with --center_crop: the size of the photo
    as opened and EXIF-transposed, then the centre crop's (top, left) after torchvision's Resize(resolution),
    which scales the shorter side to the resolution and the longer to int(resolution * long / short)."""
    image = ImageOps.exif_transpose(Image.open(photo))
    height, width = image.height, image.width
    if width <= height:
        resized_h, resized_w = int(resolution * height / width), resolution
    else:
        resized_h, resized_w = resolution, int(resolution * width / height)
    top = max(0, int(round((resized_h - resolution) / 2.0)))
    left = max(0, int(round((resized_w - resolution) / 2.0)))
    return [height, width, top, left, resolution, resolution]


def script_encode_prompt(text_encoders, tokenizers, prompt: str):
    """The script's encode_prompt: each encoder's hidden_states[-2], concatenated; the last encoder's output[0]
    (CLIPTextModelWithProjection's projected pooled embedding)."""
    embeds = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        output = encoder(ids, output_hidden_states=True, return_dict=False)
        pooled = output[0]
        embeds.append(output[-1][-2])
    return torch.concat(embeds, dim=-1), pooled.view(1, -1)


def lora_params(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.unet.named_parameters() if "lora_" in n}


def test_a_lora_step_equals_train_dreambooth_lora_sdxl(sdxl_cfg, odd_photos, tiny_sdxl_dir, monkeypatch):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    steps = record_steps(monkeypatch, lora_params)
    cfg = sdxl_cfg("method=lora", *folder_subject(odd_photos), "method.batch_size=4", "method.stages.lora.steps=1",
                   "method.stages.lora.checkpoint_every=null", "method.stages.lora.lr=1e-3", "method.lora.alpha=8",
                   "eval=none")
    run = prepare_run(cfg)
    fit(run, sample=False, evaluate=False)
    (step,) = steps
    resolution, prompt = int(cfg.model.resolution), run.module.instance_prompt

    # the time ids of the step's rows are the script's, from each photo file
    photos = sorted(odd_photos.glob("*.jpg"))
    instance_idx = step["batch"][0].tolist()
    assert sorted(instance_idx) == [0, 1, 2, 3]  # every photo, each with its own size and crop
    time_ids = torch.tensor([script_time_ids(photos[i], resolution) for i in instance_idx], dtype=torch.float32)
    assert len({tuple(row) for row in time_ids.tolist()}) == 4
    torch.testing.assert_close(step["conditioning"]["time_ids"], time_ids, rtol=0, atol=0)

    # the script's step, on its own models loaded the stock way, with our initial LoRA weights
    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl_dir / name) for name in ("tokenizer", "tokenizer_2")]
    text_encoders = [CLIPTextModel.from_pretrained(tiny_sdxl_dir / "text_encoder"),
                     CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_dir / "text_encoder_2")]
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet")
    noise_scheduler = DDPMScheduler.from_pretrained(tiny_sdxl_dir, subfolder="scheduler")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert set(params) == set(step["before"])
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(step["before"][name])
        prompt_embeds, pooled = script_encode_prompt(text_encoders, tokenizers, prompt)

    model_input, noise, timesteps = step["latents"], step["noise"], step["timesteps"]
    bsz = model_input.shape[0]
    noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
    added = {"time_ids": time_ids, "text_embeds": pooled.repeat(bsz, 1)}
    model_pred = unet(noisy, timesteps, prompt_embeds.repeat(bsz, 1, 1), added_cond_kwargs=added, return_dict=False)[0]
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")  # epsilon target, no prior, no snr
    loss.backward()
    script_adamw_step(params, cfg.method.optimizer, lr=1e-3)
    assert_step_matches(step, loss, params)


def test_random_crops_and_flips_condition_on_the_crop_that_trained(sdxl_cfg, odd_photos, monkeypatch):
    steps = record_steps(monkeypatch, lora_params)
    crops: list[tuple] = []
    random_crops = Personalizer._random_crops

    def recording_crops(self, index):
        pixels, offsets = random_crops(self, index)
        crops.append((index.clone(), pixels.clone(), offsets))
        return pixels, offsets

    monkeypatch.setattr(Personalizer, "_random_crops", recording_crops)
    cfg = sdxl_cfg("method=lora", *folder_subject(odd_photos), "method.batch_size=4", "method.stages.lora.steps=2",
                   "method.stages.lora.checkpoint_every=null", "method.data.crop=random", "method.flip=true", "eval=none")
    run = prepare_run(cfg)
    fit(run, sample=False, evaluate=False)
    resolution, uncropped = int(cfg.model.resolution), run.module._uncropped
    photos = sorted(odd_photos.glob("*.jpg"))
    seen = set()
    for step, (index, pixels, _) in zip(steps, crops):
        for row, (i, time_ids) in enumerate(zip(index.tolist(), step["conditioning"]["time_ids"].tolist())):
            photo, mirrored = i % len(photos), i >= len(photos)
            upright = ImageOps.exif_transpose(Image.open(photos[photo]))
            height, width, top, left, target_h, target_w = map(int, time_ids)
            assert (height, width, target_h, target_w) == (upright.height, upright.width, resolution, resolution)
            resized = uncropped[photo].flip(-1) if mirrored else uncropped[photo]  # the photo the crop is of
            assert torch.equal(pixels[row], resized[:, top:top + resolution, left:left + resolution]), (i, time_ids)
            seen.add((photo, mirrored, top, left))
    assert {mirrored for _, mirrored, _, _ in seen} == {False, True}
    assert any(top or left for _, _, top, left in seen)


# ---------------------------------------------------------------- methods: train, checkpoint, stock load, sample
SHORT_RUNS = {
    "lora": ["method.stages.lora.steps=2", "method.stages.lora.checkpoint_every=null", "method.stages.lora.lr=2e-2",
             "method.lora.alpha=8"],
    "dreambooth": ["method.stages.unet.steps=2", "method.stages.unet.checkpoint_every=null",
                   "method.stages.unet.lr=1e-3", "class_images.count=2"],
    "finetune": ["method.stages.unet.steps=2", "method.stages.unet.checkpoint_every=null", "method.stages.unet.lr=1e-3"],
}
TRAINS = {"lora": "lora", "dreambooth": "unet", "finetune": "unet"}
ARTIFACTS = {"lora": {"pytorch_lora_weights.safetensors"}, "dreambooth": {"unet"}, "finetune": {"unet"}}


def sdxl_unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    latents, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim,
                         generator=g)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[128.0, 96.0, 0.0, 16.0, 64.0, 64.0]])}
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), context, added_cond_kwargs=added).sample


@pytest.mark.parametrize("method", list(SHORT_RUNS))
def test_method_trains_checkpoints_and_loads_in_the_stock_sdxl_pipeline(method, sdxl_cfg, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    # the LoRA run is also evaluated on the DreamBooth protocol (tiny CLIP/DINO, the debug preset's counts)
    evaluation = "eval=dreambooth" if method == "lora" else "eval=none"
    run = prepare_run(sdxl_cfg(f"method={method}", "subject=sample_dog", "method.batch_size=2", evaluation,
                               *SHORT_RUNS[method]))
    module = run.module
    assert type(module.backbone).__name__ == "StableDiffusionXL"
    before = snapshot(module)
    second_encoder = {n: p.detach().clone() for n, p in module.components.extra["text_encoder_2"].named_parameters()}
    loss_before = fixed_loss(module)
    fit(run)
    assert fixed_loss(module) < loss_before

    after = snapshot(module)
    for part in before:
        fraction = changed_fraction(before[part], after[part])
        assert fraction > 0.9 if part == TRAINS[method] else fraction == 0.0, (part, fraction)
    assert all(torch.equal(p, second_encoder[n]) for n, p in module.components.extra["text_encoder_2"].named_parameters())

    (ckpt,) = run.checkpoints()
    assert {p.name for p in ckpt.iterdir()} - {"checkpoint.json"} == ARTIFACTS[method]
    assert json.loads((ckpt / "checkpoint.json").read_text())["model"]["backbone"] == "sdxl"
    pipe = stock_pipeline(tiny_sdxl_dir, ckpt)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    # the stock-loaded UNet is the one that trained (LoRA: scaled by the alpha the file's metadata carries)
    torch.testing.assert_close(sdxl_unet_output(pipe.unet), sdxl_unet_output(module.unet), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sdxl_unet_output(pipe.unet), sdxl_unet_output(stock_pipeline(tiny_sdxl_dir, tiny_sdxl_dir).unet))
    image = pipe(module.instance_prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0
    assert len(list((run.run_dir / "samples" / ckpt.name).glob("*.png"))) == 2

    if method == "dreambooth":  # the class rows condition on the class images' own size: made at the resolution
        class_images = module._images["class"]
        assert class_images.shape[1:] == (3, 64, 64)
        assert module._image_conditioning("class", torch.arange(2))["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    if method == "lora":
        records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert {r["protocol"] for r in records} == {"dreambooth"} and {r["step"] for r in records} == {2}
        values = [v for r in records for k, v in r.items() if k in ("clip_i", "clip_t", "dino")]
        assert values and all(np.isfinite(values))
        images = list((run.run_dir / "eval" / ckpt.name / "dreambooth").glob("p*_i*.png"))
        assert len(images) == 25 and {r["num_images"] for r in records} == {25}  # 25 prompts x 1 image (debug preset)


def test_lora_on_the_unet_and_both_text_encoders_loads_in_the_stock_sdxl_pipeline(sdxl_cfg, tiny_sdxl_dir):
    """train_dreambooth_lora_sdxl.py's --train_text_encoder: adapters on both CLIPs, each its own part of the one
    LoRA file (`text_encoder.`, `text_encoder_2.`), which stock load_lora_weights applies to both encoders."""
    from diffusers import StableDiffusionXLPipeline

    run = prepare_run(sdxl_cfg("method=lora", "subject=sample_dog", "method.batch_size=2", "eval=none",
                               "method.stages.lora.train=[lora,text_encoder_lora]", "method.stages.lora.steps=2",
                               "method.stages.lora.checkpoint_every=null", "method.stages.lora.lr=2e-2"))
    module = run.module
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(run, sample=False, evaluate=False)
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}
    assert all("lora_" in n for n in changed)  # everything else bit-identical
    assert {n.split(".")[0] for n in changed} == {"unet", "text_encoder", "extra_components"}
    assert any(n.startswith("extra_components.text_encoder_2.") for n in changed)

    (ckpt,) = run.checkpoints()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    prompt = module.instance_prompt
    with torch.no_grad():
        base_embeds, _, base_pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        pipe.load_lora_weights(ckpt)  # the three parts, each with its adapter metadata
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        ours = module._encode_prompt(prompt)
    torch.testing.assert_close(embeds, ours["encoder_hidden_states"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, ours["text_embeds"], rtol=1e-5, atol=1e-6)
    width = module.text_encoder.config.hidden_size  # the first encoder's share of the concatenated states
    assert not torch.allclose(embeds[..., :width], base_embeds[..., :width])
    assert not torch.allclose(embeds[..., width:], base_embeds[..., width:]) and not torch.allclose(pooled, base_pooled)
    torch.testing.assert_close(sdxl_unet_output(pipe.unet), sdxl_unet_output(module.unet), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- what SDXL refuses, before anything is written
@pytest.mark.parametrize("overrides", [
    ["method=custom_diffusion"], ["method=dreambooth", "method.stages.unet.train=[unet,text_encoder]"],
])
def test_a_method_sdxl_does_not_train_is_one_line_naming_those_that_apply(overrides, sdxl_cfg, tmp_path):
    cfg = sdxl_cfg("subject=sample_dog", *overrides, name="refused")
    with pytest.raises(PersonalizeError) as error:
        prepare_run(cfg)
    message = str(error.value)
    assert "\n" not in message
    stage = next(iter(cfg.method.stages))
    assert message.startswith(f"method.stages.{stage}.train=")
    assert "the sdxl backbone (model.backbone=sdxl) cannot train" in message
    assert message.endswith("the methods that apply to it are dreambooth, finetune, lora, pivotal, textual_inversion, two_stage")
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow  # two subprocess runs (training, then the edit refusal): the in-process tests above cover training
def test_the_cli_trains_lora_on_tiny_sdxl_and_edits_it(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PERSONALIZE_OUTPUTS=str(tmp_path / "out"))
    result = subprocess.run(
        [sys.executable, "-m", "personalize.cli", "method=lora", "model=tiny_sdxl", "subject=sample_dog", "debug=default",
         "method.stages.lora.steps=2", "method.stages.lora.checkpoint_every=null", "eval=none"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "out" / "train" / "runs").iterdir()
    assert (run_dir / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors").is_file()

    from personalize.edit.runner import run_edit

    # prompt-to-prompt on the SDXL checkpoint (tests/test_edit_sdxl.py checks what it computes)
    cfg = compose("edit", [f"run_dir={run_dir}", "image=null", "edit=fast", "edit.num_inference_steps=2",
                           "logger=none"], output_dir=tmp_path / "edit")
    out = run_edit(cfg)
    assert out.parent == run_dir / "edits"
    record = json.loads((out / "edit.json").read_text())
    assert record["method"] == "lora" and record["step"] == 2 and record["controller"] == "Replace"
    assert Image.open(out / "edited.png").size == (64, 64)  # the tiny SDXL's native size
    assert Image.open(out / "side_by_side.png").width == 2 * 256  # a generated source: source | edit
