"""Every method x several subjects composes from Hydra and builds its module; subject configs match the data."""

from __future__ import annotations

from pathlib import Path

import pytest

from personalize.config import CONF_DIR, compose
from personalize.data import list_images
from personalize.methods.stages import parse_stages
from personalize.train import prepare_run
from tests.conftest import SHARED_DREAMBOOTH

METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml") if not p.stem.startswith("_"))
DREAMBOOTH_SUBJECTS = sorted(p.stem for p in (CONF_DIR / "subject").glob("*.yaml")
                             if not p.stem.startswith("sample_") and p.stem != "folder")  # folder: your own photos
SAMPLE_SUBJECTS = ["sample_dog", "sample_dog2", "sample_backpack"]


def test_the_six_methods_and_thirty_subjects_exist():
    assert METHODS == ["custom_diffusion", "dreambooth", "finetune", "lora", "pivotal", "textual_inversion", "two_stage"]
    assert len(DREAMBOOTH_SUBJECTS) == 30


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("subject", ["sample_dog", "sample_backpack"])
def test_every_method_composes_and_instantiates(method, subject, make_cfg):
    cfg = make_cfg(f"method={method}", f"subject={subject}", "class_images.count=2")
    run = prepare_run(cfg)
    assert run.module.total_steps() == sum(stage.steps for stage in parse_stages(cfg.method.stages))
    assert run.module.instance_prompt.startswith("a photo of ")
    assert (Path(cfg.paths.output_dir) / "config.yaml").exists()


@pytest.mark.parametrize("model", ["sd21_base", "sd14", "sd15", "tiny"])
@pytest.mark.parametrize("hardware", ["auto", "cpu", "gpu", "gpu_bf16", "gpu_fp16", "low_memory", "ddp"])
def test_model_and_hardware_groups_compose(model, hardware):
    cfg = compose("train", [f"model={model}", f"hardware={hardware}"], output_dir="/unused")
    assert cfg.model.resolution in (64, 512)
    assert cfg.hardware.name == hardware


def test_paper_defaults_of_the_methods():
    two_stage = compose("train", ["method=two_stage"], output_dir="/unused").method
    assert two_stage.identifier == "<rare>" and two_stage.new_token.initializer == "rare"
    token, unet = parse_stages(two_stage.stages)
    assert (token.train, token.steps, token.lr) == (("token",), 100, 5e-4)
    assert (unet.train, unet.steps, unet.lr, unet.prior_loss_weight) == (("unet",), 800, 5e-6, 0.0)
    assert unet.checkpoint_steps() == [300, 500, 700, 900]  # every 200 steps of stage 2

    dreambooth = compose("train", ["method=dreambooth"], output_dir="/unused")
    assert parse_stages(dreambooth.method.stages)[0].prior_loss_weight == 1.0
    assert dreambooth.class_images.count == 200
    assert dreambooth.class_images.prompt.format(class_noun="dog") == "a photo of dog"

    lora = compose("train", ["method=lora"], output_dir="/unused").method
    assert (lora.lora.rank, lora.lora.target_modules) == (4, None)  # null: the model family's default
    assert parse_stages(lora.stages)[0].lr == 1e-4


# the diffusers scripts' default LoRA targets: train_dreambooth_lora.py / _sdxl.py adapt the attention projections,
# train_dreambooth_lora_flux.py (no --lora_layers) both attention streams and both feed-forwards
SCRIPT_LORA_TARGETS = {
    "tiny": ["to_q", "to_k", "to_v", "to_out.0"], "tiny_sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
    "tiny_flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2"],
}


@pytest.mark.parametrize("model", list(SCRIPT_LORA_TARGETS))
def test_the_lora_targets_default_to_the_model_familys_and_a_given_list_is_kept(model):
    from personalize.backbones import backbone_for

    cfg = compose("train", [f"model={model}", "method=lora"], output_dir="/unused")
    backbone_for(cfg.model).fill_method_defaults(cfg.method)
    assert sorted(cfg.method.lora.target_modules) == sorted(SCRIPT_LORA_TARGETS[model])
    given = compose("train", [f"model={model}", "method=lora", "method.lora.target_modules=[to_q]"], output_dir="/unused")
    backbone_for(given.model).fill_method_defaults(given.method)
    assert list(given.method.lora.target_modules) == ["to_q"]


@pytest.mark.parametrize("subject", DREAMBOOTH_SUBJECTS + SAMPLE_SUBJECTS)
def test_subject_config_points_at_its_photos(subject):
    cfg = compose("train", [f"subject={subject}"], output_dir="/unused").subject
    assert cfg.kind in ("live", "object") and cfg.class_noun and cfg.init_word
    if subject.startswith("sample_") or SHARED_DREAMBOOTH.is_dir():
        assert len(list_images(Path(cfg.data_dir))) == cfg.num_images


def test_live_subjects_are_the_nine_animals():
    live = {s for s in DREAMBOOTH_SUBJECTS if compose("train", [f"subject={s}"], output_dir="/u").subject.kind == "live"}
    assert live == {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


@pytest.mark.parametrize("model", ["sd14", "sd15", "sd21_base", "tiny", "sdxl", "tiny_sdxl", "flux_dev", "tiny_flux"])
def test_sampling_guides_with_the_stock_pipelines_default_unless_set(model):
    """class_images, samples and eval default to the model's guidance_scale, which is its stock pipeline's own
    `guidance_scale` default (read from the pipeline's signature here); an explicit setting wins."""
    import inspect

    import diffusers

    cfg = compose("train", [f"model={model}"], output_dir="/unused")
    pipeline = getattr(diffusers, backbone_pipeline(cfg.model))
    stock = inspect.signature(pipeline.__call__).parameters["guidance_scale"].default
    assert cfg.class_images.guidance_scale == cfg.samples.guidance_scale == cfg.eval.guidance_scale == stock
    set_ = compose("train", [f"model={model}", "eval.guidance_scale=2.0"], output_dir="/unused")
    assert (set_.eval.guidance_scale, set_.samples.guidance_scale) == (2.0, stock)


def backbone_pipeline(model_cfg) -> str:
    from personalize.backbones import backbone_for

    return backbone_for(model_cfg).pipeline_class
