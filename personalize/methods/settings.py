"""The method's settings (`conf/method`) as typed values, parsed once at the config boundary.

`MethodSettings.from_cfg(cfg.method)` runs in `train.prepare_run` after the schema checks
(`schema.check_config` / `check_values`: known keys, each value in its range); the parsing calls the
checks that need more than one value (`parse_stages`: the stages and their schedules), so their one-line
messages come from where they always came. Everything below it (the LightningModule, the Trainables,
the optimizer) reads these fields, never the config, so a Personalizer can be built without Hydra.

What stays on the config: `recipe.overrides` (what checkpoint.json lists as set away from the method's
file compares config trees), the resume checks (`resume._structure`, `Trainable.structure`: they compare
the saved config.yaml of a run with this one's) and the banner.

The hardware preset's settings are `personalize.devices.HardwareSettings`, beside the device and dtype
choices they feed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from personalize.backbones.objectives import LossSettings, NoiseSettings
from personalize.data import DataSettings
from personalize.errors import PersonalizeError
from personalize.methods.stages import Stage, parse_stages

_COMMON = "conf/method/_common.yaml"


def _plain(cfg) -> dict:
    """A config node (or mapping) as a plain dict with interpolations resolved; {} for null."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _required(values: Mapping, key: str, where: str):
    """A setting every method file has through `_common.yaml`; one line where a file starts from elsewhere."""
    if values.get(key) is None:
        raise PersonalizeError(f"{where}.{key} is not set: give it a value (the method files take it from {_COMMON} "
                               "through `defaults: [_common, _self_]`)")
    return values[key]


@dataclass(frozen=True)
class OptimizerSettings:
    """`method.optimizer`: the settings of every stage's optimizer (methods/optim.py)."""

    betas: tuple[float, float]
    weight_decay: float
    eps: float
    max_grad_norm: float | None = None  # None or 0: no gradient clipping
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True

    @classmethod
    def from_cfg(cls, cfg) -> OptimizerSettings:
        c, where = _plain(cfg), "method.optimizer"
        norm = c.get("max_grad_norm")
        return cls(betas=tuple(float(b) for b in _required(c, "betas", where)),
                   weight_decay=float(_required(c, "weight_decay", where)), eps=float(_required(c, "eps", where)),
                   max_grad_norm=None if norm is None else float(norm),
                   prodigy_use_bias_correction=bool(c.get("prodigy_use_bias_correction", True)),
                   prodigy_safeguard_warmup=bool(c.get("prodigy_safeguard_warmup", True)))

    @property
    def clips(self) -> bool:
        """Whether gradients are clipped to `max_grad_norm`."""
        return bool(self.max_grad_norm) and self.max_grad_norm > 0


@dataclass(frozen=True)
class NewTokenSettings:
    """`method.new_token`: the placeholder added to the vocabulary (the `token` trainable)."""

    initializer: str  # a one-token word whose embedding starts every new row
    num_vectors: int = 1  # n > 1: the tokens <id>, <id>_1 ... <id>_{n-1}

    @classmethod
    def from_cfg(cls, cfg) -> NewTokenSettings | None:
        """None where the method adds no token (`new_token: null`)."""
        c = _plain(cfg)
        if not c:
            return None
        return cls(initializer=str(_required(c, "initializer", "method.new_token")),
                   num_vectors=int(c.get("num_vectors", 1) or 1))


def _target_modules(lora: Mapping, where: str):
    """`method.lora.target_modules`: null in the method files means the model family's default, which
    `Backbone.fill_method_defaults` writes in before the settings are parsed (train.prepare_run)."""
    if lora.get("target_modules") is None:
        raise PersonalizeError(f"{where}.target_modules=null (the model family's default) is not filled in: call "
                               "backbone_for(cfg.model).fill_method_defaults(cfg.method) first, as train.prepare_run "
                               "does, or give a list of module names")
    return lora["target_modules"]


@dataclass(frozen=True)
class LoraSettings:
    """`method.lora`: the adapters of the `lora` (UNet) and `text_encoder_lora` trainables."""

    rank: int
    alpha: float  # the update is scaled by alpha / rank
    target_modules: tuple[str, ...]  # denoiser modules (PEFT's rule: a whole name or its end after a dot)
    text_encoder_target_modules: tuple[str, ...]
    dropout: float = 0.0
    use_dora: bool = False
    # PEFT's rank / alpha per module, {module name or regex: value}, the values as the config gives them (the
    # messages quote them so; the PEFT config takes int ranks and float alphas)
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg) -> LoraSettings | None:
        """None where the method has no `lora` block."""
        c, where = _plain(cfg), "method.lora"
        if not c:
            return None
        return cls(rank=int(_required(c, "rank", where)), alpha=float(_required(c, "alpha", where)),
                   target_modules=tuple(str(t) for t in _target_modules(c, where)),
                   text_encoder_target_modules=tuple(str(t) for t in _required(c, "text_encoder_target_modules", where)),
                   dropout=float(c.get("dropout") or 0.0), use_dora=bool(c.get("use_dora", False)),
                   rank_pattern=_patterns(c.get("rank_pattern")), alpha_pattern=_patterns(c.get("alpha_pattern")))


def _patterns(value) -> dict[str, Any]:
    """rank_pattern / alpha_pattern as {str: value}; {} for null. The schema has checked them (a mapping, keys
    that compile, values in range: schema.Patterns); which modules they match is Trainable.check_against's."""
    return {} if value is None else {str(k): v for k, v in value.items()}


@dataclass(frozen=True)
class MethodSettings:
    """`conf/method` as plain values: what the LightningModule, the Trainables and the optimizer read."""

    name: str
    identifier: str  # the word that names the subject (a new token's placeholder where new_token is set)
    phrase: str  # how prompts name the subject: "{identifier} {class_noun}"
    instance_prompt: str  # the training prompt, "a photo of {phrase}"
    batch_size: int  # photos per micro-batch and process
    stages: tuple[Stage, ...]
    optimizer: OptimizerSettings
    class_prompt: str | None = None  # of the class images (stages with prior_loss_weight > 0)
    prompt_templates: str | None = None  # a set of PROMPT_TEMPLATES; None: every example trains on the prompt
    gradient_accumulation_steps: int = 1
    scale_lr: bool = False  # every lr x batch_size x gradient_accumulation_steps x processes
    flip: bool = False  # also train on mirrored photos
    data_seed: int = 0  # the data order and the template drawn for each example
    data: DataSettings = DataSettings()
    noise: NoiseSettings = NoiseSettings()
    loss: LossSettings = LossSettings()
    new_token: NewTokenSettings | None = None
    lora: LoraSettings | None = None

    @classmethod
    def from_cfg(cls, method_cfg) -> MethodSettings:
        """The composed `method` config, parsed and checked (after the schema's checks of each value)."""
        if not isinstance(method_cfg, DictConfig):  # parse_stages reads config nodes (a plain mapping in tests)
            method_cfg = OmegaConf.create(dict(method_cfg or {}))
        c, where = _plain(method_cfg), "method"
        templates = c.get("prompt_templates")
        class_prompt = c.get("class_prompt")
        return cls(
            name=str(_required(c, "name", where)), identifier=str(_required(c, "identifier", where)),
            phrase=str(_required(c, "phrase", where)), instance_prompt=str(_required(c, "instance_prompt", where)),
            batch_size=int(_required(c, "batch_size", where)),
            stages=tuple(parse_stages(method_cfg.get("stages"))),  # on the config node: its checks name the settings as given
            optimizer=OptimizerSettings.from_cfg(_required(c, "optimizer", where)),
            class_prompt=str(class_prompt) if class_prompt else None,
            prompt_templates=str(templates) if templates else None,
            gradient_accumulation_steps=int(c.get("gradient_accumulation_steps", 1) or 1),
            scale_lr=bool(c.get("scale_lr", False)), flip=bool(c.get("flip", False)),
            data_seed=int(c.get("data_seed", 0) or 0), data=DataSettings.from_cfg(c),
            noise=NoiseSettings.from_cfg(c.get("noise")), loss=LossSettings.from_cfg(c.get("loss")),
            new_token=NewTokenSettings.from_cfg(c.get("new_token")), lora=LoraSettings.from_cfg(c.get("lora")),
        )

    @property
    def trained(self) -> set[str]:
        """The names of everything some stage trains."""
        return {name for stage in self.stages for name in stage.train}

    @property
    def rows_per_step(self) -> int:
        """Instance rows of one optimizer step and process: batch_size x gradient_accumulation_steps."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def num_vectors(self) -> int:
        """Embedding vectors of the new token (1 where the method adds none)."""
        return self.new_token.num_vectors if self.new_token is not None else 1
