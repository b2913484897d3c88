"""The typed settings at the config boundary (personalize/methods/settings.py, devices.HardwareSettings):

- `MethodSettings.from_cfg` of every shipped method, and `HardwareSettings.from_cfg` of every hardware
  preset, hold every key of the composed config at its value (a key a file leaves out: the default);
- a method config without what every method file gets from `_common.yaml` is one line naming the setting.
"""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from personalize.config import CONF_DIR, compose
from personalize.devices import HardwareSettings
from personalize.errors import PersonalizeError
from personalize.methods.settings import MethodSettings
from personalize.methods.stages import Stage


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
    node = OmegaConf.to_container(cfg.method, resolve=True)  # ${subject.init_word} filled, as the run fills it
    settings = MethodSettings.from_cfg(cfg.method)
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
