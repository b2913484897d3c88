"""What a run prints first and last: the settings that matter, what hardware=auto chose, where things went."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from personalize.banner import hardware_choice

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
