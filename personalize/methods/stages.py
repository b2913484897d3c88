"""A method is a sequence of stages; a stage says what trains, for how long, how fast, with which loss.

textual_inversion = [token]; two_stage = [token, unet] (no prior); dreambooth = [unet + prior];
lora = [lora]; finetune = [unet]; custom_diffusion = [token + custom_diffusion]. A two-stage method
whose second stage is LoRA is just `method.stages.unet.train=[lora]`: no new code.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf

from personalize.errors import PersonalizeError
from personalize.methods.trainables import TRAINABLES  # what a stage can train, by name
from personalize.schema import check_value


@dataclass(frozen=True)
class Stage:
    name: str
    train: tuple[str, ...]
    steps: int
    lr: float
    start: int  # global step at which the stage begins
    prior_loss_weight: float = 0.0  # lambda of DreamBooth's prior-preservation term; 0 = no class images
    checkpoint_every: int | None = None  # None: only at the stage's end; 0: none in this stage
    lr_warmup_steps: int = 0

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
    for name, cfg in stages_cfg.items():
        for field in ("steps", "lr", "prior_loss_weight", "checkpoint_every", "lr_warmup_steps"):
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
        stages.append(Stage(
            name=str(name), train=train, steps=int(cfg.steps), lr=float(cfg.lr), start=start,
            prior_loss_weight=weight, checkpoint_every=None if every is None else int(every),
            lr_warmup_steps=int(cfg.get("lr_warmup_steps", 0) or 0),
        ))
        start += int(cfg.steps)
    return stages


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
