"""Lightning callbacks of a personalization run: checkpoints in diffusers formats, and a loss watchdog."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L

from personalize.checkpoints import checkpoint_dir
from personalize.errors import PersonalizeError
from personalize.methods.stages import checkpoint_steps

log = logging.getLogger(__name__)


class ArtifactCheckpoint(L.Callback):
    """Save `checkpoints/step-NNNNNN/` at the method's checkpoint steps (rank 0 only).

    Also stops the run with a clear error when the loss stops being finite, naming the step and the last
    good checkpoint. Reading the loss forces a device sync, so it is checked every `check_every` steps.
    """

    def __init__(self, run_dir: Path, check_every: int = 1):
        self.run_dir = Path(run_dir)
        self.check_every = check_every
        self.saved: list[Path] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if self.check_every and step % self.check_every == 0 and loss is not None and not math.isfinite(float(loss)):
            last = str(self.saved[-1]) if self.saved else "none yet"
            raise PersonalizeError(
                f"the loss became {float(loss)} at step {step}; last good checkpoint: {last}. "
                "Lower the learning rate or use hardware=gpu_bf16 instead of fp16"
            )
        if step in set(checkpoint_steps(module.stages)) and trainer.is_global_zero:
            path = module.save_artifacts(checkpoint_dir(self.run_dir, step), step)
            self.saved.append(path)
            log.info("saved checkpoint %s", path)
