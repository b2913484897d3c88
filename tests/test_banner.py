"""What a run prints first and last: the settings that matter, what hardware=auto chose, where things went."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from personalize.banner import hardware_choice, start_lines
from personalize.data import Subject
from personalize.methods.stages import parse_stages

BIN = Path(sys.executable).parent


def test_auto_hardware_says_what_it_chose_and_why():
    auto = OmegaConf.create({"name": "auto", "accelerator": "auto", "precision": "auto"})
    assert hardware_choice(auto, "cpu", "32-true", torch.float32) == (
        "auto -> cpu, precision 32-true, frozen parts in fp32 (no CUDA GPU is visible)")
    fixed = OmegaConf.create({"name": "cpu", "accelerator": "cpu", "precision": "bf16-mixed"})
    assert hardware_choice(fixed, "cpu", "bf16-mixed", torch.bfloat16) == "cpu -> cpu, precision bf16-mixed, frozen parts in bf16"


def test_a_run_prints_its_settings_first_and_where_everything_went_last(tmp_path):
    env = {**os.environ, "PERSONALIZE_OUTPUTS": str(tmp_path / "outputs")}
    result = subprocess.run(
        [str(BIN / "personalize"), "debug=default", "method=two_stage", "subject=sample_dog", "eval=none",
         "method.stages.token.steps=1", "method.stages.unet.steps=1", "method.stages.unet.checkpoint_every=null",
         "hardware=cpu"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split("] - ", 1)[-1] for line in (result.stdout + result.stderr).splitlines()]
    run_dir = next(Path(line.split()[-1]) for line in lines if line.startswith("outputs "))
    first = lines.index(next(line for line in lines if line.startswith("method ")))
    assert lines[first] == "method    two_stage (2 stages, 2 steps)"
    assert lines[first + 1] == "  stage token: trains token for 1 steps at lr 0.0005"
    assert lines[first + 2] == "  stage unet: trains unet for 1 steps at lr 5e-06"
    assert lines[first + 3].startswith("subject   sample_dog: 5 photos of a dog from ")
    assert lines[first + 4].startswith("model     tiny: ") and lines[first + 4].endswith(", 64 px")
    assert lines[first + 5] == "hardware  cpu -> cpu, precision 32-true, frozen parts in fp32"
    assert lines[first + 6] == "eval      none; logger none"
    assert run_dir.is_dir() and str(run_dir).startswith(str(tmp_path / "outputs"))
    end = {line.split()[0]: line for line in lines[first:] if line.split() and line.split()[0] in ("checkpoints", "samples", "next")}
    assert end["checkpoints"].startswith(f"checkpoints   {run_dir / 'checkpoints'} (steps 2;")
    assert end["samples"] == f"samples       {run_dir / 'samples'}"
    assert f"personalize-eval run_dir={run_dir}" in end["next"]


def _stage_lines(cfg, tmp_path) -> list[str]:
    stages = parse_stages(cfg.method.stages)
    lines = start_lines(cfg, Subject.from_cfg(cfg.subject), stages, 5, "cpu", tmp_path, None)
    return lines[1:1 + len(stages)]


def test_stage_lines_show_the_lr_that_trains_under_scale_lr(make_cfg, tmp_path):
    """scale_lr multiplies every lr by batch x accumulation x processes (here 2 x 2 x the 2 processes of
    ddp_cpu): the banner shows that product and what it came from."""
    cfg = make_cfg("method=two_stage", "method.scale_lr=true", "method.batch_size=2", "method.gradient_accumulation_steps=2",
                   "hardware=ddp_cpu")
    method = cfg.method
    factor = int(method.batch_size) * int(method.gradient_accumulation_steps) * int(cfg.hardware.devices)
    assert factor == 8
    token, unet = method.stages.token, method.stages.unet
    assert _stage_lines(cfg, tmp_path) == [
        f"  stage token: trains token for {token.steps} steps at lr {token.lr * factor:g} ({token.lr:g} x 8, scale_lr)",
        f"  stage unet: trains unet for {unet.steps} steps at lr {unet.lr * factor:g} ({unet.lr:g} x 8, scale_lr)",
    ]
    assert _stage_lines(make_cfg("method=two_stage"), tmp_path) == [  # without it, the lrs as configured
        f"  stage token: trains token for {token.steps} steps at lr {token.lr:g}",
        f"  stage unet: trains unet for {unet.steps} steps at lr {unet.lr:g}",
    ]


def test_stage_lines_show_each_trainables_own_lr_and_how_long_it_trains(make_cfg, tmp_path):
    cfg = make_cfg("method=pivotal")
    stage = cfg.method.stages.pivotal
    token_lr, token_steps = stage.trainable_lr.token, int(stage.trainable_frac.token * stage.steps)
    assert _stage_lines(cfg, tmp_path) == [
        f"  stage pivotal: trains lora+token for {stage.steps} steps at lr {stage.lr:g}, "
        f"token at lr {token_lr:g} for its first {token_steps} steps"]

    scaled = make_cfg("method=pivotal", "method.scale_lr=true", "method.stages.pivotal.trainable_lr={token: 2.5e-6}")
    factor = int(scaled.method.batch_size)  # one process, no accumulation
    assert _stage_lines(scaled, tmp_path) == [
        f"  stage pivotal: trains lora+token for {stage.steps} steps at lr {stage.lr * factor:g} ({stage.lr:g} x {factor}, "
        f"scale_lr), token at lr {2.5e-6 * factor:g} (2.5e-06 x {factor}, scale_lr) for its first {token_steps} steps"]
