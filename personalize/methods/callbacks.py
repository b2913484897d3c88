"""Lightning callbacks of a personalization run: checkpoints in diffusers formats, resume states, a loss watchdog."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L

from personalize.checkpoints import checkpoint_dir, list_checkpoints
from personalize.errors import PersonalizeError
from personalize.methods.stages import checkpoint_steps, stage_at
from personalize.resume import prune_resume_states, resume_state_dir

log = logging.getLogger(__name__)


class ArtifactCheckpoint(L.Callback):
    """At the method's checkpoint steps: `checkpoints/step-NNNNNN/` (rank 0), then `resume/step-NNNNNN/`.

    The artifacts come first: a kill between the two resumes from the previous state and re-saves the
    same artifacts, never skipping them. Only the newest resume state is kept.

    Also stops the run with a clear error when the loss stops being finite, naming the step and the last
    good checkpoint. Reading the loss forces a device sync, so it is checked every `check_every` steps. A
    step's loss only vouches for the weights before its update, so before a checkpoint is saved the new
    weights get one forward pass of their own (`Personalizer.predicts_finite`): every checkpoint and
    resume state on disk is one that still works, and the newest is the last good one.
    """

    def __init__(self, run_dir: Path, check_every: int = 1, save_resume_state: bool = True):
        self.run_dir = Path(run_dir)
        self.check_every = check_every
        self.save_resume_state = save_resume_state
        self.saved: list[Path] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        saves = step in set(checkpoint_steps(module.stages))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and (saves or (self.check_every and step % self.check_every == 0)):
            self._stop_unless(trainer, math.isfinite(float(loss)), module, step, f"the loss became {float(loss)}")
        if not saves:
            return
        with trainer.precision_plugin.forward_context():
            finite = module.predicts_finite()
        self._stop_unless(trainer, finite, module, step, "the model's prediction became non-finite")
        if trainer.is_global_zero:
            path = module.save_artifacts(checkpoint_dir(self.run_dir, step), step)
            self.saved.append(path)
            log.info("saved checkpoint %s", path)
        if self.save_resume_state:
            state = resume_state_dir(self.run_dir, step)
            trainer.save_checkpoint(state, weights_only=False)  # every rank takes part; rank 0 writes
            if trainer.is_global_zero:
                prune_resume_states(self.run_dir, keep=state)

    def _stop_unless(self, trainer, finite: bool, module, step: int, what: str) -> None:
        # every rank must stop together, else the others would wait forever in the next all-reduce
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        stage = stage_at(module.stages, step - 1)
        good = [c for c in list_checkpoints(self.run_dir) if int(c.name.split("-")[1]) < step]
        last = f"{good[-1]} (resume={self.run_dir} continues from it)" if good else "none yet"
        raise PersonalizeError(
            f"{what}{' on another rank' if finite else ''} at step {step} (stage '{stage.name}'); "
            f"last good checkpoint: {last}. Lower method.stages.{stage.name}.lr, or use hardware=gpu_bf16 instead of fp16"
        )
