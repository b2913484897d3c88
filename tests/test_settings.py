"""The typed settings at the config boundary (personalize/methods/settings.py, devices.HardwareSettings):

- a Personalizer built without Hydra (settings written out here, the tiny model loaded from its folder)
  trains the same tensors, bit for bit, as the run `prepare_run` builds from the composed config: the
  module depends on the settings alone, and `from_cfg` gives exactly the settings written here;
- `MethodSettings.from_cfg` of every shipped method, and `HardwareSettings.from_cfg` of every hardware
  preset, hold every key of the composed config at its value (a key a file leaves out: the default);
- a method config without what every method file gets from `_common.yaml` is one line naming the setting.
"""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from personalize.backbones import load_components
from personalize.backbones.objectives import LossSettings, NoiseSettings
from personalize.config import CONF_DIR, PROJECT_ROOT, compose
from personalize.data import DataSettings, load_subject_photos
from personalize.devices import HardwareSettings
from personalize.errors import PersonalizeError
from personalize.methods.module import Personalizer
from personalize.methods.settings import LoraSettings, MethodSettings, NewTokenSettings, OptimizerSettings
from personalize.methods.stages import Stage
from personalize.methods.trainables import Lora, component_dtypes
from personalize.train import prepare_run
from tests.helpers import method_settings, snapshot

SAMPLE_DOG = PROJECT_ROOT / "data" / "samples" / "dog"
STEPS = 4
# pivotal tuning with most options away from their defaults, so that each one has to reach the module
OVERRIDES = [
    "method=pivotal", "subject=sample_dog", "eval=none", f"method.stages.pivotal.steps={STEPS}",
    "method.stages.pivotal.checkpoint_every=2", "method.stages.pivotal.trainable_lr.token=1e-3",
    "method.batch_size=2", "method.gradient_accumulation_steps=2", "method.flip=true", "method.data_seed=3",
    "method.prompt_templates=object", "method.data.crop=random", "method.noise.offset=0.1",
    "method.loss.snr_gamma=5.0", "method.lora.rank=2", "method.lora.alpha=3", "method.optimizer.eps=1e-6",
]
# the same settings, written out: what those overrides on conf/method/pivotal.yaml (over _common.yaml) mean
METHOD = MethodSettings(
    name="pivotal", identifier="<s0>", phrase="{identifier} {class_noun}", instance_prompt="a photo of {phrase}",
    class_prompt="a photo of {class_noun}", batch_size=2, gradient_accumulation_steps=2, flip=True, data_seed=3,
    prompt_templates="object", data=DataSettings(crop="random", interpolation="bicubic"),
    stages=(Stage(name="pivotal", train=("lora", "token"), steps=STEPS, lr=1e-4, start=0, checkpoint_every=2,
                  trainable_lr=(("token", 1e-3),), trainable_frac=(("token", 0.5),)),),
    optimizer=OptimizerSettings(betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-6, max_grad_norm=1.0),
    noise=NoiseSettings(offset=0.1), loss=LossSettings(snr_gamma=5.0),
    new_token=NewTokenSettings(initializer="dog", num_vectors=2),
    lora=LoraSettings(rank=2, alpha=3.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"),
                      text_encoder_target_modules=("q_proj", "k_proj", "v_proj", "out_proj")),
)
CPU = HardwareSettings(name="cpu", accelerator="cpu", precision="32-true", frozen_dtype="float32", devices=1,
                       num_nodes=1, strategy="auto", nan_check_every=1, optimizer="adamw")


def train_steps(module: Personalizer, root) -> None:
    """The module's steps under a bare Trainer (what `fit` runs, without its checkpoints and sampling)."""
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=module.total_steps(),
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        default_root_dir=str(root))
    trainer.fit(module)


def test_a_personalizer_built_without_hydra_trains_what_prepare_run_builds(make_cfg, tiny_model_dir, tmp_path):
    cfg = make_cfg(*OVERRIDES)
    assert method_settings(cfg) == METHOD
    assert HardwareSettings.from_cfg(cfg.hardware) == CPU
    composed = prepare_run(cfg).module
    assert (composed.method, composed.hardware) == (METHOD, CPU)

    # without Hydra: the photos from their folder, the tiny model from its folder, the prompts filled here
    photos = load_subject_photos(SAMPLE_DOG, 64, METHOD.data)
    identifier, phrase = "<s0>", "<s0> dog"
    prompts = {"identifier": identifier, "phrase": phrase, "instance": f"a photo of {phrase}", "class": "a photo of dog",
               "captions": photos.captions_by_name(identifier, "dog", phrase)}
    L.seed_everything(0, workers=True, verbose=False)  # as prepare_run, before the components: LoRA's init draws from it
    components = load_components(OmegaConf.create({"pretrained": str(tiny_model_dir)}),
                                 component_dtypes(METHOD.trained, torch.float32))
    direct = Personalizer(components, METHOD, prompts, photos.images, hardware=CPU, seed=0,
                          uncropped_images=photos.uncropped, instance_sizes=photos.sizes)

    start = snapshot(direct)
    assert all(torch.equal(start[part][name], tensor) for part, tensors in snapshot(composed).items()
               for name, tensor in tensors.items())  # the same start, LoRA's random init included
    train_steps(composed, tmp_path / "composed")
    train_steps(direct, tmp_path / "direct")
    assert direct.global_step == composed.global_step == STEPS

    trained, reference = snapshot(direct), snapshot(composed)
    assert reference.keys() == trained.keys()
    for part in reference:
        assert reference[part].keys() == trained[part].keys()
        for name in reference[part]:
            assert torch.equal(trained[part][name], reference[part][name]), f"{part}: {name}"
    for part in ("lora", "token"):  # it trained: the comparison is of moved tensors
        assert any(not torch.equal(start[part][n], trained[part][n]) for n in start[part]), part


# ---------------------------------------------------------------- from_cfg holds every key of the config
def _shipped(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def _field_names(settings) -> set[str]:
    return {f.name for f in dataclasses.fields(settings)}


def _check_node(settings, node: dict, where: str, skip: tuple[str, ...] = ()) -> None:
    """Every key of a config mapping is a field of `settings` with the same value (lists as tuples, a null
    pattern mapping as {}), recursing into nested settings; a field the config leaves out (a new token's
    num_vectors) is at its default, as the code before the settings read a missing key."""
    assert set(node) <= _field_names(settings), where
    for missing in dataclasses.fields(settings):
        if missing.name not in node:
            assert missing.default is not dataclasses.MISSING, f"{where}.{missing.name}"
            assert getattr(settings, missing.name) == missing.default, f"{where}.{missing.name}"
    for key, value in node.items():
        if key in skip:
            continue
        ours = getattr(settings, key)
        if dataclasses.is_dataclass(ours):
            _check_node(ours, value, f"{where}.{key}")
        elif isinstance(ours, dict):  # rank_pattern / alpha_pattern: null = no pattern
            assert ours == (value or {}), f"{where}.{key}"
        else:
            expected = tuple(value) if isinstance(value, list) else value
            assert ours == expected and type(ours) is not list, f"{where}.{key}: {ours!r} != {expected!r}"


@pytest.mark.parametrize("name", _shipped("method"))
def test_method_settings_hold_every_key_of_each_shipped_method(name, tmp_path):
    cfg = compose("train", [f"method={name}", "subject=sample_dog"], output_dir=tmp_path)
    settings = method_settings(cfg)  # the family's LoRA targets filled in, as prepare_run fills them
    node = OmegaConf.to_container(cfg.method, resolve=True)  # ${subject.init_word} filled, as the run fills it
    _check_node(settings, node, "method", skip=("stages",))
    # the stages: in config order, each key of each stage at its value, starting where the previous ended
    stages = node["stages"]
    assert [s.name for s in settings.stages] == list(stages)
    start = 0
    for stage in settings.stages:
        given = stages[stage.name]
        assert set(given) <= _field_names(Stage), stage.name
        for key, value in given.items():
            ours, expected = getattr(stage, key), tuple(value) if isinstance(value, list) else value
            if key in ("trainable_lr", "trainable_frac"):  # {trainable: number}, kept as pairs
                ours, expected = dict(ours), value
            assert ours == expected, f"method.stages.{stage.name}.{key}: {ours!r} != {expected!r}"
        assert stage.start == start
        start += stage.steps


@pytest.mark.parametrize("name", _shipped("hardware"))
def test_hardware_settings_hold_every_key_of_each_preset(name, tmp_path):
    cfg = compose("train", [f"hardware={name}"], output_dir=tmp_path)
    node = OmegaConf.to_container(cfg.hardware, resolve=True)
    settings = HardwareSettings.from_cfg(cfg.hardware)
    _check_node(settings, node, f"hardware={name}")
    assert settings.trainer_devices == node["devices"]  # what the Trainer gets, as the config gave it


# ---------------------------------------------------------------- what a method file cannot leave out
def test_a_method_without_the_common_settings_is_one_line():
    method = OmegaConf.to_container(compose("train", ["method=lora"], output_dir="/unused").method, resolve=True)
    del method["optimizer"]["eps"]
    with pytest.raises(PersonalizeError) as error:
        MethodSettings.from_cfg(method)
    assert str(error.value) == ("method.optimizer.eps is not set: give it a value (the method files take it from "
                                "conf/method/_common.yaml through `defaults: [_common, _self_]`)")
    with pytest.raises(PersonalizeError) as error:
        Lora.settings(dataclasses.replace(METHOD, lora=None))
    assert str(error.value) == ("a stage trains 'lora' but method.lora is not set: give its rank, alpha and "
                                "target_modules (conf/method/_common.yaml has them)")
