"""The value rules of the config schema (personalize/schema.py RULES), tested over the whole table.

The bad values are generated here from each row's declared kind and bounds (NaN, inf, not a number,
a bool, a fraction for a whole number, the float next to a closed bound, an open bound itself, null),
so a new row is tested without a new test; the table itself is held to conf/: every setting has a row
and every row names a setting. Where a bound comes from a library, the library is asked directly.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from personalize.config import CONF_DIR, compose
from personalize.errors import PersonalizeError
from personalize.schema import (
    RULES, Choice, Devices, Flag, Free, Items, Number, Patterns, Template, Text, check_value, check_values, group_options,
    known_keys, rule_for,
)

# dreambooth: the method with a prior loss, so every class-image setting is in use
BASE = ["debug=default", "method=dreambooth", "subject=sample_dog"]


@pytest.fixture(scope="module")
def base():
    return compose("train", BASE, output_dir="/unused/run")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip() == message
    return message


def shown(value) -> str:
    """How the message must write a value: as typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and (not value or " " in value):
        return repr(value)
    return str(value)


def dotted(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def concrete(pattern: str, container: dict) -> tuple:
    """Key parts for a table row, with each `*` replaced by a name (or index) the base config has."""
    parts, node = [], container
    for part in pattern.split("."):
        if part == "*":
            part = next(iter(node)) if isinstance(node, dict) and node else 0
        parts.append(part)
        node = node.get(part) if isinstance(node, dict) else (node[part] if isinstance(node, list) and len(node) > part else None)
    return tuple(parts)


def set_value(cfg, parts: tuple, value):
    """cfg[parts] = value, making the mappings and list items on the way (new_token, a stage field)."""
    with open_dict(cfg):
        node = cfg
        for part, child in zip(parts[:-1], parts[1:]):
            nxt = node[part] if (isinstance(part, int) and len(node) > part) or (not isinstance(part, int) and node.get(part) is not None) else None
            if nxt is None:
                node[part] = [] if isinstance(child, int) else {}
                nxt = node[part]
            node = nxt
        last = parts[-1]
        if isinstance(last, int):
            while len(node) <= last:
                node.append("filler")
        node[last] = value


def step_out(bound: float, kind: type, direction: int) -> float:
    """The nearest value beyond a closed bound: the next whole number, or the next float."""
    return bound + direction if kind is int else math.nextafter(bound, direction * math.inf)


def bad_numbers(rule: Number) -> list:
    values = [float("nan"), float("inf"), float("-inf"), "abc", True]
    if rule.kind is int:
        values.append((rule.low if rule.low is not None else 0) + 0.5)
    if rule.low is not None:
        values.append(rule.low if rule.low_open else step_out(rule.low, rule.kind, -1))
    if rule.high is not None:
        values.append(rule.high if rule.high_open else step_out(rule.high, rule.kind, +1))
    if rule.null is None:
        values.append(None)
    return values


def good_numbers(rule: Number) -> list:
    values = []
    if rule.low is not None:
        values.append(step_out(rule.low, rule.kind, +1) if rule.low_open else rule.kind(rule.low))
    if rule.high is not None:
        values.append(step_out(rule.high, rule.kind, -1) if rule.high_open else rule.kind(rule.high))
    if rule.kind is int:
        values.append(float(values[0]))  # 1e3 on a command line is a float: a whole one is fine
    if rule.null is not None:
        values.append(None)
    return values


NUMBERS = {key: rule for key, rule in RULES.items() if isinstance(rule, Number)}
NUMBER_CASES = [(key, value) for key, rule in NUMBERS.items() for value in bad_numbers(rule)]


def _id(value) -> str:
    return repr(value)[:20]


# ---------------------------------------------------------------- numbers, generated over the table
@pytest.mark.parametrize("key, value", NUMBER_CASES, ids=[f"{k}={_id(v)}" for k, v in NUMBER_CASES])
def test_every_number_rejects_what_its_range_excludes(key, value):
    with pytest.raises(PersonalizeError) as error:
        check_value(key, value)
    message = one_line(error)
    head = f"{key}=null is not allowed" if value is None else f"{key}={shown(value)} "
    assert message.startswith(head), message
    assert f": use {NUMBERS[key].accepts()}" in message  # and names what it takes


@pytest.mark.parametrize("key", NUMBERS)
def test_every_number_accepts_its_bounds(key):
    for value in good_numbers(NUMBERS[key]):
        check_value(key, value)


def representative_bad(rule):
    """One value each kind of rule must reject."""
    if isinstance(rule, Text) and rule.empty:
        return ["not a string"]
    return {Number: float("nan"), Flag: "yes", Choice: "nope", Text: "", Template: "a photo of {oops}",
            Items: "not a list", Devices: 0, Patterns: [8]}[type(rule)]


CONFIG_CASES = [key for key, rule in RULES.items() if not isinstance(rule, Free)]


@pytest.mark.parametrize("pattern", CONFIG_CASES)
def test_a_bad_value_anywhere_in_the_composed_config_is_one_line_naming_it(base, pattern):
    """Through check_values on a real composed config: the walk reaches every row's setting."""
    cfg = copy.deepcopy(base)
    value = representative_bad(RULES[pattern])
    parent = tuple(pattern.split(".")[:-1])
    if isinstance(rule_for(parent), Patterns):  # a value of {pattern: value}: the mapping is null in the base
        parts = (*parent, "to_k")
        set_value(cfg, parent, {"to_k": value})
    else:
        parts = concrete(pattern, OmegaConf.to_container(cfg))
        set_value(cfg, parts, value)
    with pytest.raises(PersonalizeError) as error:
        check_values(cfg)
    written = value if isinstance(value, list) else shown(value)
    assert one_line(error).startswith(f"{dotted(parts)}={written} "), str(error.value)


def test_the_shipped_configs_pass(base):
    """Every option of every group (and every experiment) composes to values the rules accept."""
    check_values(base)
    groups = {group: group_options(group) for group in ("method", "model", "hardware", "eval", "logger")}
    for i in range(max(map(len, groups.values()))):  # option i of every group in one config: 8 composes, not 26
        picks = [f"{group}={options[i]}" for group, options in groups.items() if i < len(options)]
        check_values(compose("train", ["debug=default", *picks], output_dir="/unused/run"))
    for option in group_options("experiment"):
        check_values(compose("train", [f"experiment={option}"], output_dir="/unused/run"))
    for option in group_options("subject"):  # 30-odd files of plain values: checked as written, no composing
        for key, value in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "subject" / f"{option}.yaml")).items():
            if not (isinstance(value, str) and ("${" in value or value == "???")):  # ???: the user's to set
                check_value(f"subject.{key}", value)


# ---------------------------------------------------------------- the table matches conf/
def _leaves(tree: dict, parts=()):
    for key, child in tree.items():
        if isinstance(child, dict):
            yield from _leaves(child, parts + (key,))
        else:
            yield parts + (key,)


def train_tree() -> dict:
    """The schema's key tree of the train config, without groups train.yaml does not compose (edit, table)."""
    primary = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train.yaml"))
    groups = {next(iter(e)).split(" ")[-1] for e in primary["defaults"] if isinstance(e, dict)}
    return {k: v for k, v in known_keys("train").items() if k in primary or k in groups}


def test_every_setting_has_a_rule():
    missing = [".".join(parts) for parts in _leaves(train_tree()) if rule_for(parts) is None]
    assert not missing, f"add a row to personalize/schema.py RULES for: {missing}"


def test_every_rule_names_a_setting():
    leaves = set(_leaves(train_tree()))

    def known(parts):
        if any(all(p == "*" or p == q for p, q in zip(parts, leaf)) and len(leaf) == len(parts) for leaf in leaves):
            return True
        # an item of a list setting: the list is a leaf with an Items rule
        # (`samples.prompts.*`), or a value of a {pattern: value} setting (`method.lora.rank_pattern.*`)
        return parts[-1] == "*" and isinstance(rule_for(parts[:-1]), (Items, Patterns)) and known(parts[:-1])

    stale = [key for key in RULES if not known(tuple(key.split(".")))]
    assert not stale, f"rows of RULES for settings conf/ does not have: {stale}"


# ---------------------------------------------------------------- the bounds are the libraries'
def test_adamw_bounds_are_torchs(tmp_path):
    """betas in [0, 1) and weight_decay >= 0 are exactly what torch's AdamW accepts; eps it accepts at 0,
    where a parameter whose gradient is 0 becomes 0/0 = NaN on the first step: we refuse 0."""
    def torch_accepts(**kwargs) -> bool:
        try:
            torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-3, **kwargs)
            return True
        except ValueError:
            return False

    beta = RULES["method.optimizer.betas.*"]
    for value in bad_numbers(beta)[1:] + good_numbers(beta):  # nan aside: torch's check lets it through
        if isinstance(value, float) and not isinstance(value, bool):
            ours = rule_for("method.optimizer.betas.0").problem(value) is None
            assert torch_accepts(betas=(value, 0.9)) == ours == torch_accepts(betas=(0.9, value)), value
    for value in (-1e-9, math.nextafter(0.0, -1.0), 0.0, 1e-2, 10.0):
        assert torch_accepts(weight_decay=value) == (RULES["method.optimizer.weight_decay"].problem(value) is None)
    assert not torch_accepts(eps=-1e-12) and RULES["method.optimizer.eps"].problem(-1e-12)
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.zeros(2)
    torch.optim.AdamW([param], lr=1e-3, eps=0.0, weight_decay=0.0).step()
    assert torch.isnan(param).all() and RULES["method.optimizer.eps"].problem(0.0)


def test_seed_bounds_are_lightnings():
    import lightning as L

    seed = RULES["seed"]
    for value in (-1, 0, 2**32 - 1, 2**32):
        try:
            L.seed_everything(value, verbose=False)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == (seed.problem(value) is None), value


# ---------------------------------------------------------------- prompt templates
@pytest.mark.parametrize("key, template, problem", [
    ("method.instance_prompt", "a photo of {phrase} {oops}", "has the placeholder {oops}, which is never filled"),
    ("method.instance_prompt", "a photo of {}", "has the placeholder {}"),
    ("method.instance_prompt", "a photo of {0}", "has the placeholder {0}"),
    ("method.instance_prompt", "a photo of {phrase", "is not a template"),
    ("method.instance_prompt", "a photo of } {phrase}", "is not a template"),
    ("method.instance_prompt", "a photo of {phrase!r}", "not a plain placeholder"),
    ("method.instance_prompt", "a photo of {phrase.upper}", "has the placeholder {phrase.upper}"),
    ("method.phrase", "{phrase}", "has the placeholder {phrase}"),  # the phrase is what it defines
    ("method.class_prompt", "a photo of {class}", "has the placeholder {class}"),
    ("class_images.prompt", "a photo of {identifier} {class_noun}", "has the placeholder {identifier}"),
    ("samples.prompts[1]", "a {phrase} in {city}", "has the placeholder {city}"),
    ("method.instance_prompt", "  ", "is empty"),
])
def test_templates_name_the_placeholder_and_the_allowed_ones(key, template, problem):
    with pytest.raises(PersonalizeError) as error:
        check_value(key, template)
    message = one_line(error)
    assert message.startswith(f"{key}={shown(template)} ") and problem in message.split(": use")[0], message
    allowed = rule_for(key.replace("[", ".").replace("]", "")).fields
    assert "use only the placeholder" in message and all("{" + name + "}" in message for name in allowed)


@pytest.mark.parametrize("key, template", [
    ("method.instance_prompt", "a photo of {phrase}, {{not a placeholder}}"),
    ("method.instance_prompt", "{identifier} {class_noun} {phrase}"),
    ("method.phrase", "{identifier} {class_noun}"),
    ("class_images.prompt", "a photo of a {class_noun}"),
    ("samples.prompts[0]", "a photo"),
])
def test_templates_we_fill_pass_and_fill_without_error(key, template):
    check_value(key, template)
    rule = rule_for(key.replace("[", ".").replace("]", ""))
    template.format(**{name: "x" for name in rule.fields})  # exactly what the code's str.format does


def test_a_template_from_an_interpolation_names_where_it_came_from(base):
    cfg = copy.deepcopy(base)
    cfg.method.class_prompt = "a photo of {phrase}"  # fine for the prior loss's prompt...
    with pytest.raises(PersonalizeError) as error:  # ...but the frozen model that makes class images has no {phrase}
        check_values(cfg)
    assert one_line(error).startswith(
        "class_images.prompt='a photo of {phrase}' (from ${method.class_prompt}) has the placeholder {phrase}")
    cfg.method.class_prompt = "a photo of {oops}"  # a setting written directly is reported before what copies it
    with pytest.raises(PersonalizeError, match=r"^method.class_prompt='a photo of \{oops\}' has the placeholder"):
        check_values(cfg)


# ---------------------------------------------------------------- strings, choices, lists
@pytest.mark.parametrize("key, value, problem", [
    ("method.identifier", "", "is empty"),
    ("method.identifier", "   ", "is empty"),
    ("method.identifier", None, "is not allowed"),
    ("subject.class_noun", "", "is empty"),
    ("method.new_token.initializer", "", "is empty"),
    ("model.pretrained", "", "is empty"),
    ("method.lora.target_modules[0]", "", "is empty"),
    ("hardware.frozen_dtype", "float64", "is not a valid choice"),
    ("hardware.compile_unet", "no", "is not true or false"),  # a string: bool("no") would be True
    ("method.stages.unet.train[0]", "vae", "is not a valid choice"),
    ("method.optimizer.betas", [0.9], "has 1 item"),
    ("method.lora.target_modules", [], "is empty"),
    ("hardware.devices", 0, "is out of range"),
    ("hardware.devices", [0, 0], "is not a list of distinct device indices"),
])
def test_strings_choices_and_lists(key, value, problem):
    with pytest.raises(PersonalizeError) as error:
        check_value(key, value)
    message = one_line(error)
    head = f"{key}=null " if value is None else f"{key}={shown(value) if not isinstance(value, list) else value} "
    assert message.startswith(head) and problem in message and ": use " in message, message


def test_a_typo_in_a_choice_is_named():
    with pytest.raises(PersonalizeError, match=r"class_images.sampler=dpm_multstep is not a valid choice "
                                               r"\(did you mean 'dpm_multistep'\?\): use one of dpm_multistep, ddim"):
        check_value("class_images.sampler", "dpm_multstep")
    for key, value in (("hardware.devices", -1), ("hardware.devices", "auto"), ("hardware.devices", [0, 1]),
                       ("hardware.devices", "0,1"), ("hardware.precision", "bf16-mixed"), ("hardware.precision", 32),
                       ("hardware.strategy", "ddp_find_unused_parameters_true")):
        check_value(key, value)


# ---------------------------------------------------------------- the resolution suits the model
def _factors(model_dir):
    """The model's downsampling, read here from its config files, independently of train.check_model."""
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1), 2 ** (len(unet["down_block_types"]) - 1)


@pytest.mark.parametrize("resolution", [100, 72, 8])
def test_a_resolution_the_model_cannot_take_names_valid_ones(make_cfg, tiny_model_dir, resolution):
    from personalize.train import check_model

    vae_factor, unet_factor = _factors(tiny_model_dir)
    multiple = vae_factor * unet_factor
    assert (vae_factor, unet_factor) == (8, 2) and resolution % multiple
    with pytest.raises(PersonalizeError) as error:
        check_model(make_cfg(f"model.resolution={resolution}"))
    lower = resolution // multiple * multiple
    expected = f"{lower} or {lower + multiple}" if lower else str(multiple)
    assert one_line(error).startswith(f"model.resolution={resolution} does not suit model '{tiny_model_dir}': "
                                      f"use a multiple of {multiple}")
    assert str(error.value).endswith(f"e.g. {expected}")


def test_the_resolutions_we_accept_run_and_one_we_refuse_would_not(tiny_model_dir):
    """At a multiple of 16 the tiny VAE and UNet give back what they got; at 100 (not even a multiple of
    the VAE's 8) the VAE's round trip no longer has the photo's size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    with torch.no_grad():
        for resolution in (80,):  # a multiple of 16, not of 32 or 64
            latents = vae.encode(torch.zeros(1, 3, resolution, resolution)).latent_dist.mean
            assert latents.shape[-1] == resolution // 8
            pred = unet(latents, 10, encoder_hidden_states=torch.zeros(1, 77, unet.config.cross_attention_dim)).sample
            assert pred.shape == latents.shape
            assert vae.decode(latents).sample.shape[-1] == resolution
        latents = vae.encode(torch.zeros(1, 3, 100, 100)).latent_dist.mean
        assert vae.decode(latents).sample.shape[-1] != 100


# ---------------------------------------------------------------- prediction_type
@pytest.mark.parametrize("kind, accepted", [("epsilon", True), ("v_prediction", True), ("sample", False)])
def test_a_prediction_type_our_loss_cannot_train_is_one_line(make_cfg, tiny_model_dir, tmp_path, kind, accepted):
    from personalize.train import check_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))  # configs are enough
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), prediction_type=kind)))
    cfg = make_cfg("model.tiny=false", f"model.pretrained={model}")
    if accepted:
        check_model(cfg)
        return
    with pytest.raises(PersonalizeError) as error:
        check_model(cfg)
    assert one_line(error) == (
        f"model '{model}' has prediction_type=sample (scheduler/scheduler_config.json), which this training cannot "
        "target: use a model whose scheduler predicts one of epsilon, v_prediction")


def test_a_value_hydra_alone_can_resolve_does_not_hide_the_others():
    """Composed outside a Hydra app, paths.output_dir (${hydra:runtime.output_dir}) cannot resolve: it is left
    to the code that uses it, and every other value is still checked."""
    cfg = compose("train", ["debug=default", "model.resolution=0"])
    with pytest.raises(PersonalizeError, match=r"^model.resolution=0 is out of range"):
        check_values(cfg)
    check_values(compose("train", ["debug=default"]))


# ---------------------------------------------------------------- stage settings on the command line
def test_a_stage_setting_overrides_or_adds_whether_or_not_the_method_file_names_it():
    from personalize.schema import stage_settings_override_or_add

    argv = ["method=pivotal", "method.stages.pivotal.lr_scheduler=cosine", "method.stages.pivotal.trainable_lr.token=1e-3",
            "+method.stages.pivotal.optimizer=prodigy", "method.stages.pivotal.steps=10", "method.lora.rank=8",
            "method.stages.pivotal.lr_warmup_steps=5,10"]
    assert stage_settings_override_or_add(argv) == [
        "method=pivotal", "++method.stages.pivotal.lr_scheduler=cosine", "method.stages.pivotal.trainable_lr.token=1e-3",
        "+method.stages.pivotal.optimizer=prodigy", "++method.stages.pivotal.steps=10", "method.lora.rank=8",
        "++method.stages.pivotal.lr_warmup_steps=5,10"]


def test_the_readme_stage_options_work_without_a_plus_on_the_command_line(tmp_path):
    """lr_scheduler is in no method file, trainable_lr is in pivotal's: both plain overrides compose."""
    import subprocess
    import sys

    from personalize.config import PROJECT_ROOT

    code = "from personalize.cli import train_main; train_main()"
    args = ["method=pivotal", "method.stages.pivotal.lr_scheduler=cosine", "method.stages.pivotal.trainable_lr={token: 1e-3}",
            "debug=default", f"paths.log_dir={tmp_path}", "--cfg", "job"]
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stage = OmegaConf.create(result.stdout).method.stages.pivotal
    assert stage.lr_scheduler == "cosine" and dict(stage.trainable_lr) == {"token": 1e-3} and stage.train == ["lora", "token"]


def test_a_stage_name_the_method_does_not_have_is_one_line(make_cfg, tmp_path):
    from personalize.train import prepare_run

    with pytest.raises(PersonalizeError) as error:
        prepare_run(make_cfg("method=lora", "subject=sample_dog", "++method.stages.lorra.lr_scheduler=cosine", name="bad"))
    assert one_line(error).startswith("method.stages.lorra: the method has no stage 'lorra' (only lr_scheduler was set "
                                      "for it): its stages are lora")
    assert not (tmp_path / "bad").exists()
