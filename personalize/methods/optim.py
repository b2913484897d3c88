"""A stage's optimizer and its learning-rate schedule, as the diffusers training scripts build them.

- `method.stages.<stage>.optimizer`: `adamw` (torch; the fused kernel), `adamw8bit` (bitsandbytes) or
  `prodigy` (prodigyopt, whose lr is a multiplier of the step size it estimates: usually 1.0). The
  hardware preset `hardware.optimizer=adamw8bit` (hardware=low_memory) turns the stages on `adamw` into
  8-bit AdamW. A package that is missing is one line at config check time (`check_optimizers`).
- `method.stages.<stage>.lr_scheduler` (with `lr_warmup_steps`, `lr_num_cycles`, `lr_power`): diffusers'
  own `get_scheduler` over the stage's steps. The scripts step their scheduler after each optimizer
  step, so optimizer step s runs at `lr * lambda(s)` (step 0 of a warm-up at lr 0). They build it with
  warm-up and total steps times the number of processes and step it that many times per optimizer step:
  the same lambda at the same fraction of the run, so the lr does not depend on the process count.
  Here the lr is a pure function of the stage's step (`LrSchedule.apply`), so a resumed run gets the
  lr of the uninterrupted one at every step, with no scheduler state to save.
- `method.stages.<stage>.trainable_lr: {name: lr}`: one parameter group per trainable of the stage, at
  its own base lr (the stage's `lr` where not given); the schedule scales every group's base lr.
- `method.stages.<stage>.trainable_frac: {name: fraction}`: that trainable's group runs at lr 0 from stage
  step int(fraction x steps) on, in the same optimizer (pivotal tuning's token: its gradient still counts
  in the clipped norm, and the other groups' Adam state continues, as in diffusers' advanced script).
- `method.scale_lr`: every lr times batch size x gradient accumulation steps x processes, in the order
  the scripts' `--scale_lr` multiplies them (so the float is theirs too).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.optimization import get_scheduler

from personalize.devices import HardwareSettings
from personalize.errors import PersonalizeError

if TYPE_CHECKING:  # stages and settings import this module (check_schedule): types only
    from omegaconf import DictConfig

    from personalize.methods.settings import MethodSettings, OptimizerSettings
    from personalize.methods.stages import Stage
    from personalize.methods.trainables import Trainable

log = logging.getLogger(__name__)

# name -> (module to import, pip package, extra of this package) for the optimizers torch does not have
OPTIMIZERS: dict[str, tuple[str, str, str] | None] = {
    "adamw": None,
    "adamw8bit": ("bitsandbytes", "bitsandbytes", "bnb"),
    "prodigy": ("prodigyopt", "prodigyopt", "prodigy"),
}
DEFAULT_OPTIMIZER = "adamw"

# diffusers' SchedulerType names we take (piecewise_constant needs step rules of its own: not offered)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# which of the schedule's settings each schedule reads (get_scheduler passes num_cycles to
# cosine_with_restarts only, power to polynomial only); a setting a schedule ignores is refused
WARMUP = ("constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
NUM_CYCLES = ("cosine_with_restarts",)
POWER = ("polynomial",)
POLYNOMIAL_LR_END = 1e-7  # get_scheduler's polynomial decays to diffusers' default lr_end


# ---------------------------------------------------------------- which optimizer, and is it there
def optimizer_name(stage: Stage, hardware: HardwareSettings) -> str:
    """The optimizer a stage runs: its own, with `hardware.optimizer=adamw8bit` making adamw 8-bit."""
    if stage.optimizer == "adamw" and hardware.optimizer == "adamw8bit":
        return "adamw8bit"
    return stage.optimizer


def _setting(stage: Stage, hardware: HardwareSettings) -> str:
    """The setting that chose the stage's optimizer (what a user changes to fix it)."""
    chosen_by_hardware = optimizer_name(stage, hardware) != stage.optimizer
    return "hardware.optimizer" if chosen_by_hardware else f"method.stages.{stage.name}.optimizer"


def import_optimizer_package(key: str, name: str):
    """The package an optimizer needs (None for torch's); one line naming `key`, the value and the fix if
    it is missing."""
    need = OPTIMIZERS[name]
    if need is None:
        return None
    module, pip, extra = need
    fix = f"pip install {pip} (or 'personalize[{extra}]'), or use {key}={DEFAULT_OPTIMIZER}"
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PersonalizeError(f"{key}={name} needs the package {pip}, which is not installed: {fix}") from None
    except Exception as error:  # noqa: BLE001 - e.g. a native library that does not load on this machine
        raise PersonalizeError(f"{key}={name} needs {pip}, which is installed but does not import "
                               f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): {fix}") from None


def check_optimizers(stages: list[Stage], hardware: HardwareSettings | DictConfig) -> None:
    """Every stage's optimizer can be built here: checked with the config, before anything is written.

    The config checks (schema.check_run_settings) pass the `hardware` preset's config, parsed here."""
    if not isinstance(hardware, HardwareSettings):
        hardware = HardwareSettings.from_cfg(hardware)
    for stage in stages:
        import_optimizer_package(_setting(stage, hardware), optimizer_name(stage, hardware))


# ---------------------------------------------------------------- a stage's settings, checked together
def check_schedule(stage: Stage) -> None:
    """Schedule settings that only make sense together (each value's own range is the schema's)."""
    key = f"method.stages.{stage.name}"
    name = stage.lr_scheduler
    if stage.lr_warmup_steps and name not in WARMUP:
        raise PersonalizeError(
            f"{key}.lr_warmup_steps={stage.lr_warmup_steps} has no effect with lr_scheduler={name}: "
            f"use {key}.lr_scheduler=constant_with_warmup (or one of {', '.join(WARMUP[1:])}), or lr_warmup_steps=0")
    if stage.lr_num_cycles != 1 and name not in NUM_CYCLES:
        raise PersonalizeError(
            f"{key}.lr_num_cycles={stage.lr_num_cycles} has no effect with lr_scheduler={name}: "
            f"use {key}.lr_scheduler=cosine_with_restarts, or lr_num_cycles=1")
    if stage.lr_power != 1.0 and name not in POWER:
        raise PersonalizeError(
            f"{key}.lr_power={stage.lr_power:g} has no effect with lr_scheduler={name}: "
            f"use {key}.lr_scheduler=polynomial, or lr_power=1")
    if name == "polynomial" and stage.lr <= POLYNOMIAL_LR_END:  # get_scheduler's own ValueError, said first
        raise PersonalizeError(
            f"{key}.lr={stage.lr:g} with lr_scheduler=polynomial, which decays to {POLYNOMIAL_LR_END:g}: "
            f"use an lr above {POLYNOMIAL_LR_END:g}, or another lr_scheduler")


# ---------------------------------------------------------------- learning rates
def scaled_lr(lr: float, method: MethodSettings, world_size: int) -> float:
    """`lr`, times batch x accumulation x processes when `method.scale_lr` is on (the scripts' order).

    Reads the three fields by attribute, so the composed `method` config does too (banner.py prints the
    run's lrs from it before the settings exist)."""
    if not method.scale_lr:
        return lr
    accumulation = int(method.gradient_accumulation_steps or 1)
    return lr * accumulation * int(method.batch_size) * world_size


def param_groups(stage: Stage, trainables: dict[str, Trainable], lr_of: Callable[[float], float]) -> list[dict]:
    """One parameter group per trainable of the stage, at its base lr (`lr_of` its configured lr).

    A parameter two of them list (a new token's row is also a parameter of the text encoder) goes to
    the one with parameters of its own (the token, at the token's lr), not to the component trained in
    place, which gets the rest."""
    own_first = sorted(stage.train, key=lambda name: bool(trainables[name].trains_in_place))
    seen: set[int] = set()
    groups = []
    for name in own_first:
        params = [p for p in trainables[name].parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": lr_of(stage.lr_for(name)), "trainable": name})
    return groups


@dataclass
class LrSchedule:
    """The lr of every parameter group at each step of one stage: its base lr times the schedule's factor."""

    base_lrs: list[float]  # per parameter group, in the optimizer's order
    factor: Callable[[int], float]  # the schedule's lambda of the stage step (get_scheduler's)
    # per group, the stage step from which its lr is 0 (its trainable's `trainable_frac` is over); None: never
    frozen_from: list[int | None] | None = None

    @classmethod
    def for_stage(cls, stage: Stage, base_lrs: list[float], default_lr: float,
                  group_trainables: list[str] | None = None) -> LrSchedule:
        """diffusers' `get_scheduler` for the stage, on a stand-in optimizer at `default_lr` (the optimizer's
        own lr: polynomial decay reads it to reach lr_end), of which we keep the lambda."""
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=default_lr)
        scheduler = get_scheduler(stage.lr_scheduler, stand_in, num_warmup_steps=stage.lr_warmup_steps,
                                  num_training_steps=stage.steps, num_cycles=stage.lr_num_cycles, power=stage.lr_power)
        frozen = [stage.frozen_from(name) for name in group_trainables] if group_trainables else None
        return cls(base_lrs, scheduler.lr_lambdas[0], frozen)

    def lrs(self, stage_step: int) -> list[float]:
        factor = self.factor(stage_step)
        # LambdaLR's own product, base_lr * lambda(step); 0 for a group frozen by then (diffusers' advanced
        # script freezes pivotal tuning's token so, in its one optimizer: the others' Adam state runs on)
        frozen = self.frozen_from or [None] * len(self.base_lrs)
        return [0.0 if stop is not None and stage_step >= stop else base * factor
                for base, stop in zip(self.base_lrs, frozen)]

    def apply(self, optimizer: torch.optim.Optimizer, stage_step: int) -> None:
        for group, lr in zip(optimizer.param_groups, self.lrs(stage_step)):
            group["lr"] = lr


# ---------------------------------------------------------------- the optimizer
def build_optimizer(stage: Stage, trainables: dict[str, Trainable], method: MethodSettings, hardware: HardwareSettings,
                    world_size: int = 1, mixed_precision: bool = False) -> tuple[torch.optim.Optimizer, LrSchedule]:
    """The stage's optimizer over what it trains (a group per trainable), and its lr schedule."""
    name = optimizer_name(stage, hardware)
    package = import_optimizer_package(_setting(stage, hardware), name)
    opt: OptimizerSettings = method.optimizer
    default_lr = scaled_lr(stage.lr, method, world_size)
    groups = param_groups(stage, trainables, lambda lr: scaled_lr(lr, method, world_size))
    kwargs = dict(lr=default_lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, eps=opt.eps)
    if name == "adamw8bit":
        optimizer = package.optim.AdamW8bit(groups, **kwargs)
    elif name == "prodigy":
        if stage.lr < 0.1:
            log.warning("stage '%s' runs prodigy at lr %g: prodigy estimates the step size itself and its lr "
                        "multiplies it; the usual lr is 1.0", stage.name, stage.lr)
        optimizer = package.Prodigy(groups, **kwargs, use_bias_correction=opt.prodigy_use_bias_correction,
                                    safeguard_warmup=opt.prodigy_safeguard_warmup)
    else:
        optimizer = _torch_adamw(groups, kwargs, mixed_precision)
    schedule = LrSchedule.for_stage(stage, [group["lr"] for group in optimizer.param_groups], default_lr,
                                    [group["trainable"] for group in optimizer.param_groups])
    return optimizer, schedule


def _torch_adamw(groups: list[dict], kwargs: dict, mixed_precision: bool) -> torch.optim.AdamW:
    # One kernel for all tensors instead of a loop over them: the UNet has ~700 parameter tensors, and
    # the per-tensor loop alone was 7% of a CPU training step (make bench, finetune). Fused AdamW
    # unscales gradients itself, which Lightning's mixed-precision plugins refuse to combine with
    # gradient clipping; there the multi-tensor `foreach` kernel (CUDA's default) does the job.
    try:
        return torch.optim.AdamW(groups, **({"foreach": True} if mixed_precision else {"fused": True}), **kwargs)
    except (RuntimeError, ValueError):  # a device/dtype without that kernel
        return torch.optim.AdamW(groups, **kwargs)
