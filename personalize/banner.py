"""The few lines a run prints first (what it is about to do) and last (where everything went).

A researcher starting a run wants to see at a glance that it is the run they meant: method and stages,
subject, base model, what `hardware=auto` chose and why, where outputs go. At the end: the folders and
files to open next, and the commands that continue from them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from omegaconf import OmegaConf

from personalize.rundir import CHECKPOINTS_DIR, EVAL_DIR, WANDB_DIR, list_checkpoints, metrics_path, samples_dir, step_of
from personalize.devices import dtype_name, resolve_hardware
from personalize.methods.optim import scaled_lr


def hardware_choice(hw_cfg, accelerator: str, precision: str, frozen: torch.dtype) -> str:
    """What the hardware preset resolved to, and, where it was `auto`, why."""
    picked = f"{accelerator}, precision {precision}, frozen parts in {dtype_name(frozen)}"
    reasons = []
    if str(hw_cfg.accelerator) == "auto":
        reasons.append(f"a CUDA GPU is visible ({torch.cuda.get_device_name(0)})" if accelerator == "gpu"
                       else "no CUDA GPU is visible")
    if str(hw_cfg.precision) == "auto" and accelerator == "gpu":
        reasons.append("it supports bf16" if precision.startswith("bf16") else "it has no bf16: fp16 with loss scaling")
    return f"{hw_cfg.name} -> {picked}" + (f" ({'; '.join(reasons)})" if reasons else "")


def planned_world_size(hw_cfg) -> int | None:
    """How many processes the Trainer will run (devices x num_nodes, devices as Lightning parses them for
    the accelerator), known before it exists; None where Lightning would refuse the devices (it says why
    when the Trainer starts)."""
    accelerator = CUDAAccelerator if resolve_hardware(hw_cfg)[0] == "gpu" else CPUAccelerator
    devices = hw_cfg.get("devices", 1)
    devices = list(devices) if OmegaConf.is_list(devices) else devices
    try:
        parsed = accelerator.parse_devices(accelerator.auto_device_count() if devices == "auto" else devices)
    except Exception:  # noqa: BLE001 - e.g. more GPUs asked for than visible: the Trainer's own error says so
        return None
    count = len(parsed) if isinstance(parsed, (list, tuple)) else int(parsed or 0)
    return count * int(hw_cfg.get("num_nodes", 1) or 1) if count else None


def lr_text(lr: float, method_cfg, world_size: int | None) -> str:
    """An lr as it trains: with method.scale_lr, the scaled one and what it came from ("1e-05 (5e-06 x 2,
    scale_lr)"), computed by the optimizer's own `scaled_lr`."""
    if not method_cfg.get("scale_lr", False):
        return f"{lr:g}"
    per_process = int(method_cfg.get("gradient_accumulation_steps", 1) or 1) * int(method_cfg.batch_size)
    if world_size is None:
        return f"{lr:g} x {per_process} x the process count (scale_lr)"
    return f"{scaled_lr(lr, method_cfg, world_size):g} ({lr:g} x {per_process * world_size}, scale_lr)"


def stage_line(stage, method_cfg, world_size: int | None) -> str:
    """What a stage trains, for how long, at which lr: the stage's, then each trainable's own
    (`trainable_lr`) and how long it trains (`trainable_frac`), all as they train (scale_lr applied)."""
    own = []
    for name in stage.train:
        frozen_from = stage.frozen_from(name)
        if name not in dict(stage.trainable_lr) and frozen_from is None:
            continue
        part = name + (f" at lr {lr_text(stage.lr_for(name), method_cfg, world_size)}" if name in dict(stage.trainable_lr) else "")
        own.append(part + (f" for its first {frozen_from} steps" if frozen_from is not None else ""))
    return (f"  stage {stage.name}: trains {'+'.join(stage.train)} for {stage.steps} steps at lr "
            f"{lr_text(stage.lr, method_cfg, world_size)}" + "".join(f", {part}" for part in own)
            + (f", prior loss x{stage.prior_loss_weight:g}" if stage.prior_loss_weight > 0 else ""))


def start_lines(cfg, subject, stages, num_photos: int, hardware: str, run_dir: Path, resumed_from: str | None) -> list[str]:
    model = cfg.model
    provenance = model.get("original_id")
    model_line = f"{model.name}: {model.pretrained}" + (f" (mirror of {provenance})" if provenance and provenance != model.pretrained else "")
    world_size = planned_world_size(cfg.hardware) if cfg.method.get("scale_lr", False) else 1
    stage_lines = [stage_line(s, cfg.method, world_size) for s in stages]
    eval_cfg = cfg.get("eval")
    evaluation = ("none" if eval_cfg is None or not eval_cfg.get("enabled", True)
                  else ", ".join(str(p) for p in eval_cfg.get("protocols", [])) or "none")
    logger = cfg.logger.backend if cfg.logger.backend == "none" else f"{cfg.logger.backend} ({cfg.logger.get('mode', 'online')})"
    return [
        f"method    {cfg.method.name} ({len(stages)} stage{'s' if len(stages) > 1 else ''}, {stages[-1].end} steps)",
        *stage_lines,
        f"subject   {subject.name}: {num_photos} photos of a {subject.class_noun} from {subject.data_dir}",
        f"model     {model_line}, {int(model.resolution)} px",
        f"hardware  {hardware}",
        f"eval      {evaluation}; logger {logger}",
        f"outputs   {run_dir}" + (f" (resuming from {resumed_from})" if resumed_from else ""),
    ]


def end_lines(run_dir: Path, task_name: str = "train") -> list[str]:
    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir)
    lines = [f"run dir       {run_dir}"]
    if checkpoints:
        steps = ", ".join(str(step_of(c)) for c in checkpoints)
        lines.append(f"checkpoints   {run_dir / CHECKPOINTS_DIR} (steps {steps}; each loads in stock diffusers)")
    for label, path in (("samples", samples_dir(run_dir)), ("evaluation", run_dir / EVAL_DIR),
                        ("metrics", metrics_path(run_dir)), ("W&B run", run_dir / WANDB_DIR),
                        ("log", run_dir / f"{task_name}.log")):
        if path.exists():
            lines.append(f"{label:<13} {path}")
    lines.append(f"next          personalize-sample run_dir={run_dir} | personalize-eval run_dir={run_dir}")
    return lines
