"""Config checks that turn a typo or a wrong name into one line before anything runs.

The schema is the conf/ folder itself, so it needs no upkeep: the known keys are those of the primary
config (train.yaml, ...) and the union of the keys of every option of each group (conf/<group>/*.yaml);
`method.stages.<any name>` takes the stage settings RULES declares. Files packaged `_global_` (experiment, debug,
local) only override: a key they set must exist elsewhere, so a new setting gets its default (and its
comment) in train.yaml or in a group file.

- `check_config(cfg)`: every key of a composed config is known (a key typo'd in a YAML file or added
  with `+` would otherwise be silently ignored).
- `check_values(cfg)`: every value is one its setting can take. The rules are one table, `RULES`
  (dotted key, `*` for any one name or list index -> rule): a number's kind and range (NaN and inf
  never pass), a choice's options, a non-empty string, a prompt template's placeholders. A new setting
  is one row; tests/test_schema.py fails on a setting of conf/ without one and generates the bad values
  of every row. What needs two settings or the model (checkpoint_every vs steps, the resolution vs the
  model's downsampling) is checked where both are known (methods/stages.py, train.check_model).
- `preflight(config_name, argv)`: the command line's group options and keys exist, and the values it
  sets are valid, checked before Hydra composes (so nothing is created; Hydra's own messages are many
  lines and exit 1). `checked_cli` wraps an entry point with it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import math
import re
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from personalize.config import CONF_DIR
from personalize.errors import PersonalizeError

_ANY = "*"  # a mapping whose keys are names the user picks (stage names)


def _stage_keys() -> dict:
    """A stage's settings: those RULES declares under `method.stages.*` (every setting has a rule), so the
    known keys need no import of methods/stages.py (which imports torch, and this module)."""
    prefix = f"method.stages.{_ANY}."
    return {key[len(prefix):]: None for key in RULES if key.startswith(prefix) and "." not in key[len(prefix):]}


def _is_global(path: Path) -> bool:
    head = path.read_text().lstrip().splitlines()[:3]
    return any(line.replace(" ", "").startswith("#@package_global_") for line in head)


def _merge(tree: dict, node) -> None:
    """Add the keys of a YAML mapping to a tree of known keys (a leaf is None)."""
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            child = tree.get(key)
            if not isinstance(child, dict):
                child = tree[key] = {}
            _merge(child, value)
        else:
            tree.setdefault(key, None)


@lru_cache(maxsize=None)
def known_keys(config_name: str = "train", conf_dir: str = str(CONF_DIR)) -> dict:
    """The tree of keys a composed `config_name` may have."""
    conf = Path(conf_dir)
    tree: dict = {}
    primary = OmegaConf.to_container(OmegaConf.load(conf / f"{config_name}.yaml"))
    for entry in primary.get("defaults", []):  # another primary config it builds on (report.yaml: train)
        if isinstance(entry, str) and entry != "_self_" and (conf / f"{entry}.yaml").is_file():
            _merge(tree, known_keys(entry, conf_dir))
    _merge(tree, primary)
    tree.pop("hydra", None)
    for group in sorted(p for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        subtree = tree.get(group.name) if isinstance(tree.get(group.name), dict) else {}
        for option in sorted(group.rglob("*.yaml")):
            if not _is_global(option):
                _merge(subtree, OmegaConf.to_container(OmegaConf.load(option)) or {})
        if subtree:  # groups of `_global_` files only (experiment, debug) add no key of their own
            tree[group.name] = subtree
    if isinstance(tree.get("method"), dict):
        tree["method"]["stages"] = {_ANY: _stage_keys()}
    return tree


def group_options(group: str, conf_dir: str = str(CONF_DIR)) -> list[str]:
    """The options of a group, as Hydra names them (`sub/name` for files in subfolders)."""
    root = Path(conf_dir) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.stem.startswith("_"))


def _unknown(tree: dict, parts: list[str]) -> str | None:
    """None if the key path is known, else a one-line message about the first unknown part."""
    node = tree
    for i, part in enumerate(parts):
        if node is None:  # below a leaf: a value the schema does not describe (free-form)
            return None
        if part in node:
            node = node[part]
        elif _ANY in node:
            node = node[_ANY]
        else:
            where = ".".join(parts[:i])
            names = sorted(k for k in node if k != _ANY)
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            shown = ", ".join(names[:15]) + (", ..." if len(names) > 15 else "")
            return (f"unknown config key '{'.'.join(parts[:i + 1])}': {hint}"
                    f"the keys {'under ' + repr(where) if where else 'at the top level'} are: {shown}")
    return None


def _key_paths(node, prefix: tuple = ()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (str(key),)
            yield from _key_paths(value, prefix + (str(key),))


def check_config(cfg: DictConfig, config_name: str = "train") -> None:
    """Every key of the composed config must be known (see the module docstring)."""
    tree = known_keys(config_name)
    container = OmegaConf.to_container(cfg, resolve=False)
    for parts in _key_paths(container):
        message = _unknown(tree, list(parts))
        if message:
            raise PersonalizeError(f"{message} (fix the key in your command line or config file)")


def check_run_settings(cfg: DictConfig, stages) -> None:
    """Settings whose problems would otherwise show up mid-run, and that involve more than one setting."""
    check_value("method.batch_size", cfg.method.batch_size)
    hw = cfg.hardware
    from personalize.methods.optim import check_optimizers  # imports torch: only when a run is prepared

    check_optimizers(stages, hw)  # a stage's optimizer (or hardware.optimizer's) needs a package not installed
    devices = hw.get("devices", 1)
    # -1 / "auto" / a list of ids may all mean several processes
    multi_process = (len(devices) > 1 if OmegaConf.is_list(devices) or isinstance(devices, list) else str(devices) != "1") \
        or int(hw.get("num_nodes", 1) or 1) > 1
    if multi_process and str(hw.strategy) in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        if len({tuple(sorted(s.train)) for s in stages}) > 1:
            raise PersonalizeError(
                f"hardware.strategy={hw.strategy} with method {cfg.method.name}: its stages train different parameters, "
                "which plain DDP cannot follow; use hardware.strategy=ddp_find_unused_parameters_true (hardware=ddp does)"
            )


# ---------------------------------------------------------------- values
_UNSET = "???"  # OmegaConf's mandatory value that nothing filled


def _show(value) -> str:
    """A value as the user would type it on the command line."""
    if isinstance(value, str):  # quoted as on a command line when it has spaces (or is empty)
        plain = value and not any(c.isspace() or c in "'\"" for c in value)
        return value if plain else repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


class Rule:
    """The values one setting can take. `problem(value)` says what is wrong with a value (None: nothing);
    `accepts()` names the valid values for the message."""

    means = ""  # what the setting is, shown in the message

    def problem(self, value) -> str | None:
        raise NotImplementedError

    def accepts(self) -> str:
        raise NotImplementedError

    def message(self, key: str, value, shown: str | None = None) -> str | None:
        """The one-line error for `key=value`, or None when the value is valid."""
        if value == _UNSET:
            problem = "is not set"
        else:
            problem = self.problem(value)
        if problem is None:
            return None
        what = f" ({self.means})" if self.means else ""
        head = f"{key} {problem}" if value == _UNSET else f"{key}={shown or _show(value)} {problem}"
        return f"{head}: use {self.accepts()}{what}"


@dataclass(frozen=True)
class Number(Rule):
    """An int (whole-valued floats such as 1e3 count) or float in [low, high]; a bound is excluded when
    its `*_open` is set; `null` says what null means where null is allowed. NaN and inf never pass."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    null: str | None = None
    means: str = ""

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.null else "is not allowed"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not a number"
        if not math.isfinite(value):
            return "is not a finite number"
        if self.kind is int and not float(value).is_integer():
            return "is not a whole number"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return "is out of range"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return "is out of range"
        return None

    def accepts(self) -> str:
        what = "a whole number" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            text = (f"{what} in {'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{what} {'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text = f"{what} {'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = f"a finite {what.split()[-1]}"
        return text + (f", or null ({self.null})" if self.null else "")


@dataclass(frozen=True)
class Flag(Rule):
    """true or false (Hydra reads `yes`/`no`/`1` as a string or int, which would otherwise count as true)."""

    means: str = ""

    def problem(self, value) -> str | None:
        return None if isinstance(value, bool) else "is not true or false"

    def accepts(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Choice(Rule):
    """One of a list of names (compared as text, so `precision=32` is '32'); `options` may be a function,
    for lists that live in a library or a module heavy to import."""

    options: Sequence | Callable[[], Sequence] = ()
    null: str | None = None
    means: str = ""

    def names(self) -> list[str]:
        return [str(o) for o in (self.options() if callable(self.options) else self.options)]

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.null else "is not allowed"
        return None if not isinstance(value, (Mapping, list, bool)) and str(value) in self.names() else "is not a valid choice"

    def accepts(self) -> str:
        names = self.names()
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        return "one of " + shown + (f", or null ({self.null})" if self.null else "")

    def message(self, key: str, value, shown: str | None = None) -> str | None:
        text = super().message(key, value, shown)
        if text and isinstance(value, str):  # name the closest option first: a typo is the usual cause
            close = difflib.get_close_matches(value, self.names(), n=1)
            if close:
                text = text.replace(": use one of", f" (did you mean '{close[0]}'?): use one of", 1)
        return text


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string (a name, a word, a path, a hub id); `empty` allows ''; `null` allows null."""

    empty: bool = False
    null: str | None = None
    means: str = ""

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.null else "is not allowed"
        if isinstance(value, (Mapping, list, bool)):
            return "is not a string"
        if not self.empty and not str(value).strip():
            return "is empty"
        return None

    def accepts(self) -> str:
        text = "a string" if self.empty else "a non-empty string"
        return text + (f", or null ({self.null})" if self.null else "")


@dataclass(frozen=True)
class Template(Rule):
    """A prompt template: a non-empty string whose {placeholders} are among the ones the code fills.

    Python's own parser finds them (string.Formatter().parse), so what passes here is exactly what
    `str.format(**fields)` fills without a KeyError; `{{` and `}}` are literal braces.
    """

    fields: tuple[str, ...] = ()
    null: str | None = None
    means: str = ""

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.null else "is not allowed"
        if not isinstance(value, str):
            return "is not a string"
        if not value.strip():
            return "is empty"
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as error:  # a lone { or }
            return f"is not a template ({error}; write {{{{ or }}}} for a literal brace)"
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in self.fields:
                shown = "{}" if name == "" else "{" + name + "}"
                return f"has the placeholder {shown}, which is never filled"
            if spec or conversion:
                return f"has {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}, not a plain placeholder"
        return None

    def accepts(self) -> str:
        names = ", ".join("{" + f + "}" for f in self.fields)
        return f"only the placeholder{'s' if len(self.fields) > 1 else ''} {names}" + (f", or null ({self.null})" if self.null else "")


@dataclass(frozen=True)
class Items(Rule):
    """A list (its items have rules of their own, under `<key>.*`), of `length` items or at least `min_len`."""

    length: int | None = None
    min_len: int = 0
    null: str | None = None
    means: str = ""

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.null else "is not allowed"
        if not isinstance(value, list):
            return "is not a list"
        if self.length is not None and len(value) != self.length:
            return f"has {len(value)} item{'' if len(value) == 1 else 's'}"
        if len(value) < self.min_len:
            return "has too few items" if value else "is empty"
        return None

    def accepts(self) -> str:
        text = (f"a list of {self.length}" if self.length is not None
                else f"a list of at least {self.min_len}" if self.min_len else "a list")
        return text + (f", or null ({self.null})" if self.null else "")


@dataclass(frozen=True)
class Devices(Rule):
    """Lightning's `devices`: a count >= 1, -1 (all), 'auto', or a list of device indices."""

    means: str = "how many devices, or which"

    def problem(self, value) -> str | None:
        if isinstance(value, bool):
            return "is not a device count"
        if isinstance(value, int):
            return None if value >= 1 or value == -1 else "is out of range"
        if isinstance(value, str):
            text = value.strip()
            if text == "auto" or text == "-1":
                return None
            parts = [p.strip() for p in text.split(",") if p.strip()]
            ok = parts and all(p.isdigit() for p in parts) and (len(parts) > 1 or text.endswith(",") or int(parts[0]) >= 1)
            return None if ok else "is not a device count or list"
        if isinstance(value, list):
            ok = value and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value) \
                and len(set(value)) == len(value)
            return None if ok else "is not a list of distinct device indices"
        return "is not a device count"

    def accepts(self) -> str:
        return "a count >= 1, -1 (all), auto, or a list of device indices such as [0,1]"


@dataclass(frozen=True)
class Free(Rule):
    """Anything: a setting whose value its own code checks (resume: true/false/a path)."""

    means: str = ""

    def problem(self, value) -> str | None:
        return None

    def accepts(self) -> str:
        return "anything"


@dataclass(frozen=True)
class Patterns(Rule):
    """PEFT's rank_pattern / alpha_pattern: null or {module name or regex: value}. Each key must compile as a
    regex; each value has the rule of the row `<key>.*` (the range of `method.lora.rank` or `alpha`)."""

    value: str = "value"  # what a pattern maps to, for the message
    example: str = "{to_k: 8}"

    def problem(self, value) -> str | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            return "is not a mapping"
        return None

    def accepts(self) -> str:
        return f"a mapping {{module name or regex: {self.value}}}, e.g. {self.example}, or null (none)"

    def message(self, key: str, value, shown: str | None = None) -> str | None:
        if isinstance(value, Mapping):
            for pattern in value:
                try:
                    re.compile(str(pattern))
                except re.error as error:
                    return (f"{key} has the key '{pattern}', which is not a regex ({error}): use a module name, "
                            "the end of one (to_k), or a valid regex")
        return super().message(key, value, shown)


def _samplers() -> list[str]:
    from personalize.models import SAMPLERS  # imports torch: only when a sampler is checked

    return list(SAMPLERS)


def _backbones() -> tuple[str, ...]:
    from personalize.backbones import BACKBONES  # imports torch: only when a model config is checked

    return tuple(BACKBONES)


def _weighting_schemes() -> tuple[str, ...]:
    from personalize.backbones.objectives import WEIGHTING_SCHEMES  # imports torch: only when a loss is checked

    return WEIGHTING_SCHEMES


def _trainables() -> tuple[str, ...]:
    from personalize.methods.trainables import TRAINABLES  # imports torch: only when a stage is checked

    return tuple(TRAINABLES)


def _optimizers() -> tuple[str, ...]:
    from personalize.methods.optim import OPTIMIZERS  # imports torch: only when a stage is checked

    return tuple(OPTIMIZERS)


def _lr_schedulers() -> tuple[str, ...]:
    from personalize.methods.optim import LR_SCHEDULERS

    return LR_SCHEDULERS


def _prompt_templates() -> tuple[str, ...]:
    from personalize.prompts import PROMPT_TEMPLATES

    return tuple(PROMPT_TEMPLATES)


def _precisions() -> list[str]:
    """What Lightning's Trainer accepts as `precision`, and our `auto`."""
    from typing import get_args

    from lightning.fabric.plugins.precision import precision as lp

    names = [get_args(getattr(lp, n, None)) for n in ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_INT", "_PRECISION_INPUT_STR_ALIAS")]
    return ["auto", *dict.fromkeys(str(n) for group in names for n in group)]


def _strategies() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ["auto", *StrategyRegistry.available_strategies()]


# The settings every filled prompt template may name: see train.prompts_for and sample.format_prompt.
PROMPT_FIELDS = ("identifier", "class_noun", "phrase")
# method.data: how a training image is cut from a photo, and the resize filter by PIL's names (personalize/data.py
# maps each name to its filter)
CROPS = ("center", "random")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
SEED = Number(int, 0, 2**32 - 1, means="a random seed; numpy's seeds are 32-bit")
SAMPLER = Choice(_samplers, means="the sampler of generation")
STEPS = Number(int, 1, means="denoising steps")
GUIDANCE = Number(float, 0, means="classifier-free guidance scale; 1 or less turns guidance off")
BATCH = Number(int, 1, means="images per batch")
PATH = Text(means="a folder")

# Every setting of the `personalize` (train) config and the values it can take. Keys are dotted paths
# into the composed config; `*` matches any one name or list index (a stage name, an item of a list).
# The most specific row wins (fewest `*`). Ranges are what the code and the libraries below accept:
# torch's AdamW (betas in [0, 1), eps and weight decay >= 0), PEFT's LoRA (rank >= 1, dropout a
# probability), Lightning (seed 32-bit, num_nodes >= 1; log_every_n_steps 0 = never), diffusers (steps >= 1).
RULES: dict[str, Rule] = {
    "task_name": Text(),
    "seed": SEED,
    "resume": Free(),
    "group": Text(means="the W&B group and sweep folder"),
    "tags": Items(),
    "tags.*": Text(),

    "class_images.count": Number(int, 1, means="class images for the prior loss; a stage trains without it "
                                               "with prior_loss_weight=0"),
    "class_images.prompt": Template(("class_noun",), means="the frozen base model makes them: it does not know "
                                                           "the identifier"),
    "class_images.negative_prompt": Text(empty=True, null="none"),
    "class_images.sampler": SAMPLER,
    "class_images.steps": STEPS,
    "class_images.guidance_scale": GUIDANCE,
    "class_images.batch_size": BATCH,
    "class_images.seed": SEED,

    "samples.prompts": Items(),
    "samples.prompts.*": Template(PROMPT_FIELDS),
    "samples.num_images": Number(int, 1, means="images per prompt"),
    "samples.sampler": SAMPLER,
    "samples.steps": STEPS,
    "samples.guidance_scale": GUIDANCE,
    "samples.seed": SEED,

    "trainer.log_every_n_steps": Number(int, 0, means="steps between logged losses; 0 = none"),
    "trainer.progress_bar": Flag(),

    "method.name": Text(),
    "method.identifier": Text(means="the word that names the subject"),
    "method.new_token.initializer": Text(means="the word whose embedding starts the new token"),
    "method.new_token.num_vectors": Number(int, 1, means="embedding vectors of the new token"),
    "method.phrase": Template(("identifier", "class_noun"), means="how prompts name the subject"),
    "method.instance_prompt": Template(PROMPT_FIELDS, means="the training prompt"),
    "method.class_prompt": Template(PROMPT_FIELDS, null="no prior loss"),
    "method.prompt_templates": Choice(_prompt_templates, null="every example trains on method.instance_prompt",
                                      means="the textual-inversion paper's training templates"),
    "method.batch_size": Number(int, 1, means="photos per step and process"),
    "method.flip": Flag(),
    "method.data_seed": SEED,
    "method.data.crop": Choice(CROPS, means="how a training image is cut from a photo"),
    "method.data.interpolation": Choice(INTERPOLATIONS, means="PIL's resize filter"),
    "method.optimizer.betas": Items(length=2, means="AdamW's beta1 and beta2"),
    "method.optimizer.betas.*": Number(float, 0, 1, high_open=True, means="an AdamW beta"),
    "method.optimizer.weight_decay": Number(float, 0, means="AdamW's decoupled weight decay"),
    "method.optimizer.eps": Number(float, 0, low_open=True, means="AdamW's epsilon"),
    "method.optimizer.max_grad_norm": Number(float, 0, null="no clipping", means="gradient clipping; 0 = none"),
    "method.optimizer.prodigy_use_bias_correction": Flag(),
    "method.optimizer.prodigy_safeguard_warmup": Flag(),
    "method.scale_lr": Flag(),
    "method.gradient_accumulation_steps": Number(int, 1, means="micro-batches of batch_size per optimizer step"),
    "method.noise.offset": Number(float, 0, means="the offset noise's scale; 0 = none"),
    "method.noise.input_perturbation": Number(float, 0, means="the input perturbation's scale; 0 = none"),
    "method.noise.min_timestep": Number(int, 0, means="the lowest training timestep"),
    "method.noise.max_timestep": Number(int, 1, null="the scheduler's num_train_timesteps",
                                        means="the training timesteps' exclusive upper bound"),
    "method.loss.snr_gamma": Number(float, 0, low_open=True, null="plain MSE", means="Min-SNR-γ's gamma"),
    "method.loss.weighting_scheme": Choice(_weighting_schemes, means="flow matching's timestep density or loss weight"),
    "method.loss.logit_mean": Number(float, means="the logit-normal timestep density's mean"),
    "method.loss.logit_std": Number(float, 0, low_open=True, means="the logit-normal timestep density's std"),
    "method.loss.mode_scale": Number(float, means="the mode timestep density's scale"),
    "method.lora.rank": Number(int, 1, means="the LoRA rank"),
    "method.lora.alpha": Number(float, 0, low_open=True, means="the LoRA scale is alpha / rank"),
    "method.lora.dropout": Number(float, 0, 1, high_open=True, means="the LoRA dropout probability"),
    "method.lora.target_modules": Items(min_len=1, null="the model family's default, Backbone.default_lora_targets",
                                        means="denoiser module names that get adapters"),
    "method.lora.target_modules.*": Text(),
    "method.lora.use_dora": Flag(),
    "method.lora.text_encoder_target_modules": Items(min_len=1, means="text encoder module names that get adapters"),
    "method.lora.text_encoder_target_modules.*": Text(),
    # {module name or regex: rank / alpha}; each value in the range of rank / alpha
    "method.lora.rank_pattern": Patterns(value="rank"),
    "method.lora.rank_pattern.*": Number(int, 1, means="the LoRA rank of the modules the pattern matches"),
    "method.lora.alpha_pattern": Patterns(value="alpha", example="{to_k: 4.0}"),
    "method.lora.alpha_pattern.*": Number(float, 0, low_open=True, means="the LoRA alpha of the modules the pattern matches"),
    "method.stages.*.train": Items(min_len=1, means="what the stage trains"),
    "method.stages.*.train.*": Choice(_trainables),
    "method.stages.*.steps": Number(int, 1, means="the stage's optimizer steps"),
    "method.stages.*.lr": Number(float, 0, low_open=True, means="the stage's learning rate"),
    "method.stages.*.prior_loss_weight": Number(float, 0, null="0", means="0 = no prior loss"),
    "method.stages.*.checkpoint_every": Number(int, 0, null="at the stage's end",
                                               means="steps between checkpoints; 0 = none in this stage"),
    "method.stages.*.lr_warmup_steps": Number(int, 0, null="none", means="linear warmup steps"),
    "method.stages.*.optimizer": Choice(_optimizers, means="the stage's optimizer"),
    "method.stages.*.lr_scheduler": Choice(_lr_schedulers, means="diffusers' get_scheduler names"),
    "method.stages.*.lr_num_cycles": Number(int, 1, means="hard restarts of cosine_with_restarts"),
    "method.stages.*.lr_power": Number(float, 0, low_open=True, means="the power of polynomial decay"),
    "method.stages.*.trainable_lr": Free(),  # {trainable: lr}: names and lrs checked in methods/stages.py
    "method.stages.*.trainable_frac": Free(),  # {trainable: fraction}: names and fractions checked in methods/stages.py

    "model.name": Text(),
    "model.backbone": Choice(_backbones, means="the model family"),
    "model.pretrained": Text(means="a hub id or a diffusers folder"),
    "model.revision": Text(null="the default branch"),
    "model.variant": Text(null="the default weights"),
    "model.original_id": Text(null="pretrained is not a copy", means="the hub id a mirror stands in for"),
    "model.mirrors": Items(null="none"),
    "model.mirrors.*": Text(means="a hub id"),
    # its form (64 hex digits) is checked by personalize.models.expected_unet_sha256 when the model loads
    "model.unet_sha256": Text(null="unchecked", means="the sha256 of the UNet weights file"),
    "model.vae": Text(null="the pipeline's own VAE", means="a hub id or folder of an AutoencoderKL"),
    "model.resolution": Number(int, 1, means="training image size in pixels"),
    "model.guidance_scale": GUIDANCE,  # the default of class_images, samples and eval: the stock pipeline's
    "model.tiny": Flag(),
    "model.eval_models.clip": Text(),
    "model.eval_models.dino": Text(),
    "model.eval_models.tiny": Flag(),
    "model.eval_models.fid_features": Text(),

    "hardware.name": Text(),
    "hardware.accelerator": Choice(("auto", "cpu", "gpu")),
    "hardware.devices": Devices(),
    "hardware.num_nodes": Number(int, 1, means="machines"),
    "hardware.strategy": Choice(_strategies, means="Lightning's strategy"),
    "hardware.precision": Choice(_precisions, means="Lightning's precision"),
    "hardware.frozen_dtype": Choice(("auto", "float32", "bfloat16", "float16"), means="the dtype of what never trains"),
    "hardware.gradient_checkpointing": Flag(),
    "hardware.optimizer": Choice(("adamw", "adamw8bit")),
    "hardware.compile_unet": Flag(),
    "hardware.channels_last": Flag(),
    "hardware.offload_text_encoders": Flag(),
    "hardware.nan_check_every": Number(int, 0, means="steps between loss checks; 0 = only at checkpoints"),
    "hardware.deterministic": Flag(),

    "logger.backend": Choice(("none", "wandb")),
    "logger.mode": Choice(("online", "offline")),
    "logger.project": Text(),
    "logger.entity": Text(null="your default entity"),

    "eval.enabled": Flag(),
    "eval.protocols": Items(),
    "eval.protocols.*": Text(),
    "eval.images_per_prompt.*": Number(int, 1, means="images per prompt of the protocol"),
    "eval.metrics": Items(),
    "eval.metrics.*": Text(),
    "eval.real_images": Flag(),
    "eval.clip_model": Text(null="none"),
    "eval.dino_model": Text(null="none"),
    "eval.tiny_models": Flag(),
    "eval.fid_features": Text(),
    "eval.sampler": SAMPLER,
    "eval.steps": STEPS,
    "eval.guidance_scale": GUIDANCE,
    "eval.seed": SEED,
    "eval.batch_size": BATCH,
    "eval.every_checkpoint": Flag(),
    "eval.base_image_dir": PATH,
    "eval.grid_size": Number(int, 1, means="images in the W&B grid"),
    "eval.progress_bar": Flag(),

    "paths.*": PATH,

    "subject.name": Text(),
    "subject.class_noun": Text(means="the class word of prompts, e.g. dog"),
    "subject.kind": Choice(("live", "object"), means="picks the DreamBooth prompt list"),
    "subject.init_word": Text(null="the last word of class_noun"),
    "subject.num_images": Number(int, 1, means="photos in the subject folder"),
    "subject.data_dir": PATH,
}


def _matches(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    return len(pattern) == len(parts) and all(p == "*" or p == q for p, q in zip(pattern, parts))


def _rows(rules: Mapping[str, Rule] | None) -> list[tuple[tuple[str, ...], Rule]]:
    """The table as (key parts, rule), the most specific (fewest `*`) first."""
    return sorted(((tuple(k.split(".")), r) for k, r in (RULES if rules is None else rules).items()),
                  key=lambda row: row[0].count("*"))


def rule_for(key: str | Sequence, rules: Mapping[str, Rule] | None = None, rows=None) -> Rule | None:
    """The rule of a dotted key (or its parts), the most specific row first; None if it has none."""
    parts = tuple(str(p) for p in (key.split(".") if isinstance(key, str) else key))
    return next((rule for pattern, rule in (rows or _rows(rules)) if _matches(pattern, parts)), None)


def _dotted(parts: Sequence) -> str:
    """`samples.prompts[1]`: OmegaConf's (and Hydra's) way of writing a key with a list index."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def check_template(key: str, template, fields: Sequence[str] = PROMPT_FIELDS) -> None:
    """One line if a prompt template has a placeholder other than `fields` (for the templates of configs
    without a row here: personalize-sample's `prompts`, the editing prompts)."""
    message = Template(tuple(fields)).message(key, template)
    if message:
        raise PersonalizeError(message)


def check_value(key: str, value, shown: str | None = None) -> None:
    """A PersonalizeError (one line naming the key, the value and what it accepts) if `value` is not one
    `key` can take. A key without a rule takes anything."""
    rule = rule_for(key.replace("[", ".").replace("]", ""))
    message = rule.message(key, value, shown) if rule is not None else None
    if message:
        raise PersonalizeError(message)


def _nodes(node, parts: tuple = ()):
    """(key parts, value) of every node below `node`: mappings, lists and leaves."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield parts + (str(key),), value
            yield from _nodes(value, parts + (str(key),))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield parts + (i,), value
            yield from _nodes(value, parts + (i,))


def _resolved(cfg: DictConfig):
    """The config as plain values with interpolations resolved; a value whose interpolation cannot be
    resolved here (a resolver or environment variable missing) stays as written and is not checked."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - one bad interpolation: resolve the others one by one
        pass
    raw = OmegaConf.to_container(cfg, resolve=False)

    def resolve(node, parts):
        if isinstance(node, Mapping):
            return {k: resolve(v, parts + (str(k),)) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, parts + (i,)) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            try:
                value = OmegaConf.select(cfg, _dotted(parts), throw_on_resolution_failure=True, throw_on_missing=False)
                return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except Exception:  # noqa: BLE001 - its own code reports it where it is used
                return _UNCHECKED
        return node

    return resolve(raw, ())


_UNCHECKED = object()


def check_values(cfg: DictConfig, rules: Mapping[str, Rule] | None = None) -> None:
    """Every value of a composed train config is one its setting can take (see RULES): one line otherwise.

    A value that comes from an interpolation names where it came from (`class_images.prompt` is
    `${method.class_prompt}` unless set), since that is the setting to fix.
    """
    resolved = _resolved(cfg)
    raw = dict(_nodes(OmegaConf.to_container(cfg, resolve=False)))
    rows = _rows(rules)
    copied = []  # values that come from another setting: checked after the settings written directly,
    for parts, value in _nodes(resolved):  # so the error names the one to fix where both are wrong
        if value is _UNCHECKED:
            continue
        written = raw.get(parts)
        if isinstance(written, str) and "${" in written:
            copied.append((parts, value, f"{_show(value)} (from {written})"))
        else:
            _check(parts, value, None, rows)
    for parts, value, shown in copied:
        _check(parts, value, shown, rows)


def _check(parts: tuple, value, shown: str | None, rows) -> None:
    rule = rule_for(parts, rows=rows)
    message = rule.message(_dotted(parts), value, shown) if rule is not None else None
    if message:
        raise PersonalizeError(message)


# ---------------------------------------------------------------- the command line
def preflight(config_name: str, argv: list[str]) -> None:
    """Check the command line's group options and config keys before Hydra composes anything."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # not a command line Hydra accepts either: let it say why
        return
    if args.shell_completion:  # `-sc install=bash` / `-sc query=bash`: words for Hydra, not overrides
        return
    config_name = args.config_name or config_name
    if args.config_path or args.config_dir or not (Path(CONF_DIR) / f"{config_name}.yaml").exists():
        return  # a config from elsewhere: Hydra checks it
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # a syntax error: Hydra reports it with its position
        return
    tree = known_keys(config_name)
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    for override in overrides:
        key = override.key_or_group
        if key.startswith("hydra") or "/" in key or override.is_delete():
            continue
        group = key.split("@")[0]
        if group in groups:
            options = group_options(group)
            if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
                if not override.value().filter(options):
                    raise PersonalizeError(f"{override.input_line}: matches no {group}; the {group}s are: {', '.join(options)}")
                continue
            if override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
                values = list(override.sweep_string_iterator())
            elif override.value_type == ValueType.ELEMENT:
                values = [override.value()]
            else:
                continue
            for value in values:
                if value is not None and str(value) not in options:
                    close = difflib.get_close_matches(str(value), options, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise PersonalizeError(f"unknown {group} '{value}'{hint}: the {group}s are: {', '.join(options)}")
        else:
            message = _unknown(tree, key.split("."))
            if message:
                raise PersonalizeError(f"{message} (in `{override.input_line}`)")
            # one value for every job: check it now, before Hydra makes a run dir (a sweep over values
            # runs its jobs, and each bad one is recorded as that job's failure)
            if config_name == "train" and override.value_type == ValueType.ELEMENT and "@" not in key:
                value = override.value()
                if not (isinstance(value, str) and "${" in value):  # an interpolation: checked once composed
                    check_value(key, value)


def stage_settings_override_or_add(argv: list[str]) -> list[str]:
    """`method.stages.<s>.<setting>=v` for a stage setting the method file may not write (lr_scheduler,
    optimizer, trainable_lr, ...: their defaults live in the code) becomes `++...`, Hydra's "override or add",
    so the README's `method.stages.lora.lr_scheduler=cosine` works whether or not the method names the key
    (plain Hydra wants `+` where it does not and refuses `+` where it does). A stage name the method does not
    have is one line from parse_stages."""
    stage_keys = _stage_keys()
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        parts = key.split(".")
        if ("=" in arg and not arg.startswith(("+", "~")) and len(parts) == 4 and parts[:2] == ["method", "stages"]
                and parts[3] in stage_keys):
            arg = "++" + arg
        out.append(arg)
    return out


def checked_cli(config_name: str):
    """Decorate a `@hydra.main` entry point: a bad command line is one `error:` line and exit code 2."""
    def wrap(main):
        @functools.wraps(main)
        def entry(*args, **kwargs):
            if config_name == "train":
                sys.argv[1:] = stage_settings_override_or_add(sys.argv[1:])
            try:
                preflight(config_name, sys.argv[1:])
            except PersonalizeError as error:
                print(f"error: {error}", file=sys.stderr)
                raise SystemExit(2)
            return main(*args, **kwargs)
        return entry
    return wrap
