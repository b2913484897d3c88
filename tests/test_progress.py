"""The training progress bar: method, stage, step of the stage and of the run, and the loss, rendered as the
user sees it (the tqdm line), in a real short fit on the tiny model."""

from __future__ import annotations

import os
import re
import signal

import lightning as L
import pytest

from personalize import signals
from personalize.methods.callbacks import RunProgressBar
from personalize.train import fit, prepare_run

# 5 token steps then 5 UNet steps; the loss is read every 2 steps (the watchdog's cadence)
RUN = ["method=two_stage", "subject=sample_dog", "eval=none", "trainer.progress_bar=true", "hardware.nan_check_every=2",
       "method.stages.token.steps=5", "method.stages.token.checkpoint_every=5", "method.stages.unet.steps=5",
       "method.stages.unet.checkpoint_every=5"]


class Capture(L.Callback):
    """After the bar has drawn each step: its rendered line, and the step's loss (read here, test only)."""

    def __init__(self):
        self.lines: dict[int, str] = {}
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        assert isinstance(trainer.progress_bar_callback, RunProgressBar)
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.lines[trainer.global_step] = str(trainer.progress_bar_callback.train_progress_bar)


def shown_loss(line: str) -> float | None:
    match = re.search(r"loss=([-+0-9.e]+)", line)
    return float(match.group(1)) if match else None


def test_bar_shows_method_stage_steps_and_the_mean_loss_read_every_n_steps(make_cfg):
    capture = Capture()
    fit(prepare_run(make_cfg(*RUN)), callbacks_after=[capture], sample=False, evaluate=False)
    line = capture.lines[8]
    assert line.startswith("two_stage · stage unet 3/5:") and "| 8/10 [" in line, line
    assert "Epoch" not in line
    assert capture.lines[5].startswith("two_stage · stage token 5/5:") and "5/10" in capture.lines[5]
    assert capture.lines[6].startswith("two_stage · stage unet 1/5:")
    # the loss shown is the mean since the last reading, read only at even steps: step 7 still shows 5-6's
    assert shown_loss(capture.lines[1]) is None  # nothing read yet
    for step, first in ((2, 1), (6, 5), (8, 7), (10, 9)):
        expected = (capture.losses[first] + capture.losses[first + 1]) / 2
        assert shown_loss(capture.lines[step]) == pytest.approx(expected, rel=1e-3), (step, capture.lines[step])
        assert shown_loss(capture.lines[step + 1 if step < 10 else step]) == shown_loss(capture.lines[step])


def test_a_resumed_run_starts_its_bar_at_the_step_it_resumes(make_cfg):
    class SignalAt(L.Callback):  # a real SIGTERM to this process, at the end of step 4
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(signals.Interrupted) as stopped:
        fit(prepare_run(make_cfg(*RUN)), callbacks_before=[SignalAt()], sample=False, evaluate=False)
    assert (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, 4)
    run_dir = stopped.value.run_dir

    capture = Capture()
    resumed = prepare_run(make_cfg(*RUN, f"resume={run_dir}", name="resumed"))
    assert resumed.resume_from.name == "step-000004"
    fit(resumed, callbacks_after=[capture], sample=False, evaluate=False)
    assert sorted(capture.lines) == [5, 6, 7, 8, 9, 10]
    assert capture.lines[5].startswith("two_stage · stage token 5/5:") and "| 5/10 [" in capture.lines[5]
    assert capture.lines[10].startswith("two_stage · stage unet 5/5:") and "| 10/10 [" in capture.lines[10]
