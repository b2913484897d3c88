"""personalize-sample: images from a run dir's checkpoint through the stock pipeline, one per prompt x seed."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

from personalize.config import PROJECT_ROOT
from personalize.train import train


def test_sample_cli_writes_prompt_by_image_grid_from_a_chosen_checkpoint(make_cfg, tmp_path):
    run = train(make_cfg("method=two_stage", "subject=sample_dog", "method.stages.token.steps=2",
                         "method.stages.unet.steps=4", "method.stages.unet.checkpoint_every=2", "eval=none"))
    out = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, "-c", "from personalize.cli import sample_main; sample_main()", f"run_dir={run.run_dir}",
         "step=4", "num_images=2", "steps=2", f"out_dir={out}", 'prompts=["a {phrase} in the snow","a photo of {class_noun}"]'],
        cwd=PROJECT_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["p00_i00.png", "p00_i01.png", "p01_i00.png", "p01_i01.png"]
    assert (out / "prompts.txt").read_text().splitlines() == ["a <rare> dog in the snow", "a photo of dog"]
    assert Image.open(out / "p00_i00.png").size == (64, 64)


def test_sample_cli_names_the_available_steps_when_one_is_missing(make_cfg):
    run = train(make_cfg("method=finetune", "subject=sample_dog", "method.stages.unet.steps=2",
                         "method.stages.unet.checkpoint_every=null", "eval=none"))
    result = subprocess.run(
        [sys.executable, "-c", "from personalize.cli import sample_main; sample_main()", f"run_dir={run.run_dir}", "step=7"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: run '{run.run_dir}' has no checkpoint at step 7: available steps are 2"
