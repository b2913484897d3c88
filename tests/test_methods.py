"""Each method on the tiny model and the shipped sample photos: what trained, what stayed bit-identical,
whether the loss falls, and whether every checkpoint loads in a stock diffusers pipeline and samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from personalize.train import fit, prepare_run
from tests.helpers import changed_fraction, fixed_loss, snapshot, stock_pipeline

# Short runs with learning rates large enough that the fixed-noise loss visibly falls in a few steps.
SHORT_RUNS = {
    "textual_inversion": ["method.stages.token.steps=6", "method.stages.token.checkpoint_every=3",
                          "method.stages.token.lr=5e-2"],
    "two_stage": ["method.stages.token.steps=3", "method.stages.token.lr=5e-2",
                  "method.stages.unet.steps=6", "method.stages.unet.checkpoint_every=3", "method.stages.unet.lr=1e-3"],
    "dreambooth": ["method.stages.unet.steps=6", "method.stages.unet.checkpoint_every=3", "method.stages.unet.lr=1e-3"],
    "lora": ["method.stages.lora.steps=6", "method.stages.lora.checkpoint_every=3", "method.stages.lora.lr=2e-2"],
    "finetune": ["method.stages.unet.steps=6", "method.stages.unet.checkpoint_every=3", "method.stages.unet.lr=1e-3"],
    "custom_diffusion": ["method.stages.cd.steps=6", "method.stages.cd.checkpoint_every=3", "method.stages.cd.lr=2e-2",
                         "class_images.count=2"],
    # the token trains the first 3 of 6 steps (trainable_frac 0.5), then only the LoRA moves
    "pivotal": ["method.stages.pivotal.steps=6", "method.stages.pivotal.checkpoint_every=3", "method.stages.pivotal.lr=2e-2",
                "method.stages.pivotal.trainable_lr.token=5e-2", "method.batch_size=2"],
}
# What each method must change; every other part must stay bit-identical.
TRAINS = {
    "textual_inversion": {"token"},
    "two_stage": {"token", "unet"},
    "dreambooth": {"unet"},
    "lora": {"lora"},
    "finetune": {"unet"},
    "custom_diffusion": {"token", "custom_diffusion"},
    "pivotal": {"token", "lora"},
}
CHECKPOINT_STEPS = {"textual_inversion": [3, 6], "two_stage": [6, 9], "dreambooth": [3, 6], "lora": [3, 6], "finetune": [3, 6],
                    "custom_diffusion": [3, 6], "pivotal": [3, 6]}
ARTIFACTS = {
    "textual_inversion": {"learned_embeds.safetensors"},
    "two_stage": {"learned_embeds.safetensors", "unet"},
    "dreambooth": {"unet"},
    "lora": {"pytorch_lora_weights.safetensors"},
    "finetune": {"unet"},
    "custom_diffusion": {"learned_embeds.safetensors", "pytorch_custom_diffusion_weights.safetensors"},
    "pivotal": {"learned_embeds.safetensors", "pytorch_lora_weights.safetensors"},
}


@pytest.mark.parametrize("method", list(SHORT_RUNS))
def test_method_trains_only_its_parameters_and_saves_stock_artifacts(method, make_cfg, tiny_model_dir):
    run = prepare_run(make_cfg(f"method={method}", "subject=sample_dog", *SHORT_RUNS[method]))
    module = run.module
    before = snapshot(module)
    loss_before = fixed_loss(module)

    fit(run)

    loss_after = fixed_loss(module)
    assert np.isfinite(loss_before) and np.isfinite(loss_after)
    assert loss_after < loss_before, f"{method}: fixed-noise loss did not fall ({loss_before} -> {loss_after})"

    after = snapshot(module)
    for part in before:
        fraction = changed_fraction(before[part], after[part])
        if part in TRAINS[method]:
            assert fraction > 0.9, f"{method}: only {fraction:.0%} of {part} tensors changed"
        else:
            assert fraction == 0.0, f"{method}: {part} must stay bit-identical, {fraction:.0%} of tensors changed"

    checkpoints = run.checkpoints()
    assert [json.loads((c / "checkpoint.json").read_text())["step"] for c in checkpoints] == CHECKPOINT_STEPS[method]
    for ckpt in checkpoints:
        present = {p.name for p in ckpt.iterdir()} - {"checkpoint.json"}
        assert present == ARTIFACTS[method], f"{ckpt.name} holds {present}"
        pipe = stock_pipeline(tiny_model_dir, ckpt)
        image = pipe(module.instance_prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                     output_type="np").images[0]
        assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0

    # The last checkpoint, loaded the stock way, is the model that trained: same UNet output, same token row.
    pipe = stock_pipeline(tiny_model_dir, checkpoints[-1])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    with torch.no_grad():
        assert torch.allclose(pipe.unet(latents, t, embeds).sample, module.unet(latents, t, embeds).sample, atol=1e-5)
    if module.token_embedding is not None:
        token_id = pipe.tokenizer.convert_tokens_to_ids(module.identifier)
        loaded = pipe.text_encoder.get_input_embeddings().weight[token_id]
        assert torch.equal(loaded, module.token_embedding.new_rows[0].detach())
    # the sample images of the run came from the last checkpoint
    assert len(list((run.run_dir / "samples" / checkpoints[-1].name).glob("*.png"))) == 2


def test_two_stage_freezes_the_token_in_stage_two(make_cfg):
    run = fit(prepare_run(make_cfg("method=two_stage", "subject=sample_dog", *SHORT_RUNS["two_stage"])))
    embeds = [load_file(c / "learned_embeds.safetensors")["<rare>"] for c in run.checkpoints()]
    assert len(embeds) == 2 and torch.equal(embeds[0], embeds[1])
    tokenizer = run.module.tokenizer
    rare_row = run.module.token_embedding.base.weight[tokenizer.convert_tokens_to_ids("rare")]
    assert not torch.equal(embeds[0], rare_row.detach()), "stage 1 must have moved <rare> away from 'rare'"
    infos = [json.loads((c / "checkpoint.json").read_text()) for c in run.checkpoints()]
    assert [(i["stage"], i["stage_step"]) for i in infos] == [("unet", 3), ("unet", 6)]


def test_textual_inversion_only_adds_one_row(make_cfg, tiny_model_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    run = prepare_run(make_cfg("method=textual_inversion", "subject=sample_dog", *SHORT_RUNS["textual_inversion"]))
    base_tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    base = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").get_input_embeddings().weight
    fit(run)
    table = run.module.token_embedding.base.weight
    assert table.shape[0] == len(base_tokenizer) + 1
    assert torch.equal(table[: len(base_tokenizer)], base)  # every original row, bit for bit
    dog = base[base_tokenizer.convert_tokens_to_ids("dog</w>")]
    assert torch.equal(table[-1], dog)  # initialised from the class noun; the trained value lives apart
    assert not torch.equal(run.module.token_embedding.new_rows[0].detach(), dog)


@pytest.mark.parametrize("method", ["two_stage", "lora", "custom_diffusion"])
def test_bf16_autocast_keeps_trained_weights_fp32_and_frozen_parts_bf16(method, make_cfg, tiny_model_dir):
    # CPU bf16 autocast runs the same mixed-precision path as hardware=gpu_bf16 (frozen parts in bf16,
    # what trains in fp32 master weights, gradient clipping through Lightning's precision plugin)
    run = prepare_run(make_cfg(f"method={method}", "subject=sample_dog", *SHORT_RUNS[method], "eval=none",
                               "hardware.precision=bf16-mixed", "hardware.frozen_dtype=bfloat16"))
    module = run.module
    assert module.vae.dtype == torch.bfloat16
    fit(run)
    trained = [p for name in module.trains for p in module.trainables[name].parameters()]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    if method == "custom_diffusion":  # its processors train in fp32 on a UNet frozen in bf16
        assert module.unet.conv_in.weight.dtype == torch.bfloat16
    if method == "lora":
        assert module.text_encoder.dtype == torch.bfloat16
    ckpt = run.checkpoints()[-1]
    pipe = stock_pipeline(tiny_model_dir, ckpt)  # saved fp32, loads into the fp32 stock pipeline
    image = pipe(module.instance_prompt, num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(image).all()


def test_fp16_on_cpu_is_a_clear_error(make_cfg):
    from personalize.errors import PersonalizeError

    with pytest.raises(PersonalizeError, match="does not run on CPU: use hardware.precision=bf16-mixed"):
        prepare_run(make_cfg("method=finetune", "hardware.precision=16-mixed", "hardware.frozen_dtype=float16"))
