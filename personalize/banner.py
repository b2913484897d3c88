"""The few lines a run prints first (what it is about to do) and last (where everything went).

A researcher starting a run wants to see at a glance that it is the run they meant: method and stages,
subject, base model, what `hardware=auto` chose and why, where outputs go. At the end: the folders and
files to open next, and the commands that continue from them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.rundir import CHECKPOINTS_DIR, EVAL_DIR, WANDB_DIR, list_checkpoints, metrics_path, samples_dir, step_of
from personalize.devices import dtype_name


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


def start_lines(cfg, subject, stages, num_photos: int, hardware: str, run_dir: Path, resumed_from: str | None) -> list[str]:
    model = cfg.model
    provenance = model.get("original_id")
    model_line = f"{model.name}: {model.pretrained}" + (f" (mirror of {provenance})" if provenance and provenance != model.pretrained else "")
    stage_lines = [
        f"  stage {s.name}: trains {'+'.join(s.train)} for {s.steps} steps at lr {s.lr:g}"
        + (f", prior loss x{s.prior_loss_weight:g}" if s.prior_loss_weight > 0 else "")
        for s in stages
    ]
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
