"""A method is a sequence of stages; a stage says what trains, for how long, how fast, with which loss.

textual_inversion = [token]; two_stage = [token, unet] (no prior); dreambooth = [unet + prior];
lora = [lora]; finetune = [unet]; custom_diffusion = [token + custom_diffusion]; pivotal = [lora + token,
the token frozen after half the steps (trainable_frac)]. A two-stage method whose second stage is LoRA is
just `method.stages.unet.train=[lora]`: no new code.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf

from personalize.errors import PersonalizeError
from personalize.methods.optim import check_schedule
from personalize.methods.trainables import TRAINABLES  # what a stage can train, by name
from personalize.schema import check_value, rule_for

# the settings of a stage's optimisation that have a row of their own in the schema (trainable_lr: see below)
SCHEDULE_FIELDS = ("optimizer", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power")


@dataclass(frozen=True)
class Stage:
    name: str
    train: tuple[str, ...]
    steps: int
    lr: float
    start: int  # global step at which the stage begins
    prior_loss_weight: float = 0.0  # lambda of DreamBooth's prior-preservation term; 0 = no class images
    checkpoint_every: int | None = None  # None: only at the stage's end; 0: none in this stage
    # how it optimises (personalize/methods/optim.py): the optimizer, diffusers' lr schedule over the
    # stage's steps, and a base lr per trainable where it is not `lr` ({trainable: lr}, as pairs)
    optimizer: str = "adamw"
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    trainable_lr: tuple[tuple[str, float], ...] = ()
    # {trainable: the fraction of the stage's steps it trains}, as pairs: after it, its lr is 0 (frozen) while
    # the stage's optimizer runs on, e.g. pivotal tuning's token (diffusers' --train_text_encoder_ti_frac)
    trainable_frac: tuple[tuple[str, float], ...] = ()

    def lr_for(self, trainable: str) -> float:
        """The base lr of one trainable's parameters (before schedule and scale_lr)."""
        return dict(self.trainable_lr).get(trainable, self.lr)

    def frozen_from(self, trainable: str) -> int | None:
        """The stage step from which `trainable`'s lr is 0: int(fraction x steps), as the advanced script
        takes int(ti_frac x epochs); None when it trains the whole stage."""
        fraction = dict(self.trainable_frac).get(trainable)
        return None if fraction is None or fraction >= 1 else int(fraction * self.steps)

    @property
    def end(self) -> int:
        return self.start + self.steps

    def checkpoint_steps(self) -> list[int]:
        """Global steps after which this stage saves a checkpoint."""
        if self.checkpoint_every == 0:
            return []
        every = self.checkpoint_every or self.steps
        steps = list(range(self.start + every, self.end + 1, every))
        return steps if steps and steps[-1] == self.end else steps + [self.end]


def parse_stages(stages_cfg) -> list[Stage]:
    """Validated stages, in config order, with their global start steps."""
    if not stages_cfg:
        raise PersonalizeError("method.stages is empty: a method needs at least one stage")
    stages, start = [], 0
    real = [str(n) for n, c in stages_cfg.items() if "train" in c or "steps" in c]
    for name, cfg in stages_cfg.items():
        if str(name) not in real:  # only an override named it (`method.stages.<typo>.lr_scheduler=cosine`)
            raise PersonalizeError(
                f"method.stages.{name}: the method has no stage '{name}' (only {', '.join(sorted(cfg))} was set for it): "
                f"its stages are {', '.join(real)}, e.g. method.stages.{real[0] if real else name}.{next(iter(cfg), 'lr')}=...")
        for field in ("steps", "lr", "prior_loss_weight", "checkpoint_every", *SCHEDULE_FIELDS):
            if field in cfg or field in ("steps", "lr"):  # the ranges are the schema's (personalize/schema.py)
                check_value(f"method.stages.{name}.{field}", cfg.get(field))
        train = tuple(cfg.train) if OmegaConf.is_list(cfg.get("train")) or isinstance(cfg.get("train"), list) else ()
        unknown = set(map(str, train)) - set(TRAINABLES)
        if not train or unknown:
            raise PersonalizeError(
                f"method.stages.{name}.train={list(train) if train else cfg.get('train')}: "
                f"each stage trains one or more of {', '.join(TRAINABLES)}"
            )
        weight = float(cfg.get("prior_loss_weight", 0.0) or 0.0)
        every = cfg.get("checkpoint_every")
        if every is not None and int(every) > int(cfg.steps):
            raise PersonalizeError(
                f"method.stages.{name}.checkpoint_every={every} but the stage has {cfg.steps} steps: "
                "use a value between 1 and the stage's steps (null = at the stage's end, 0 = never)"
            )
        stage = Stage(
            name=str(name), train=train, steps=int(cfg.steps), lr=float(cfg.lr), start=start,
            prior_loss_weight=weight, checkpoint_every=None if every is None else int(every),
            optimizer=str(cfg.get("optimizer") or "adamw"), lr_scheduler=str(cfg.get("lr_scheduler") or "constant"),
            lr_warmup_steps=int(cfg.get("lr_warmup_steps", 0) or 0), lr_num_cycles=int(cfg.get("lr_num_cycles", 1)),
            lr_power=float(cfg.get("lr_power", 1.0)), trainable_lr=_trainable_lrs(str(name), cfg.get("trainable_lr"), train),
            trainable_frac=_trainable_fracs(str(name), cfg.get("trainable_frac"), train, int(cfg.steps)),
        )
        check_schedule(stage)
        stages.append(stage)
        start += int(cfg.steps)
    return stages


def _per_trainable(key: str, value, train: tuple[str, ...], what: str, example, check) -> tuple[tuple[str, float], ...]:
    """A stage's `{trainable: number}` setting (`trainable_lr`, `trainable_frac`), checked: a mapping, only names
    the stage trains, and each number accepted by `check(setting, number)` (which raises the one line)."""
    if value is None:
        return ()
    if not (OmegaConf.is_dict(value) or isinstance(value, dict)):
        raise PersonalizeError(f"{key}={value} is not a mapping: use {{trainable: {what}}}, e.g. {key}={{{train[0]}: {example}}}")
    pairs = []
    for trainable, number in value.items():
        if str(trainable) not in train:
            raise PersonalizeError(f"{key}.{trainable}={number}: the stage trains {', '.join(train)}, not {trainable}: "
                                   f"give {what}s to those, e.g. {key}.{train[0]}={number}")
        check(f"{key}.{trainable}", number)
        pairs.append((str(trainable), float(number)))
    return tuple(pairs)


def _trainable_lrs(stage: str, value, train: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """`trainable_lr: {trainable: lr}`: lrs the stage's `lr` could be."""
    def check(setting, lr):
        message = rule_for("method.stages.*.lr").message(setting, lr)  # the range of a stage's lr
        if message:
            raise PersonalizeError(message)

    return _per_trainable(f"method.stages.{stage}.trainable_lr", value, train, "lr", "1.0e-4", check)


def _trainable_fracs(stage: str, value, train: tuple[str, ...], steps: int) -> tuple[tuple[str, float], ...]:
    """`trainable_frac: {trainable: fraction}`: fractions in (0, 1] that leave the trainable at least one step."""
    def check(setting, fraction):
        ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1
        if not ok or int(fraction * steps) < 1:
            raise PersonalizeError(
                f"{setting}={fraction} is not a fraction of the stage's {steps} steps that trains it at least "
                f"one step: use a number in [{1 / steps:.3g}, 1] (the share of the steps it trains before its lr is 0)")

    return _per_trainable(f"method.stages.{stage}.trainable_frac", value, train, "fraction", "0.5", check)


def checkpoint_steps(stages: list[Stage]) -> list[int]:
    """Every global step that saves a checkpoint; the run's last step always does."""
    steps = sorted({s for stage in stages for s in stage.checkpoint_steps()} | {stages[-1].end})
    return steps


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that the optimizer step number `step` (0-based) belongs to."""
    for stage in stages:
        if step < stage.end:
            return stage
    return stages[-1]
