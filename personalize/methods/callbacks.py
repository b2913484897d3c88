"""Lightning callbacks of a personalization run: checkpoints in diffusers formats, resume states, a loss
watchdog, a clean stop on a signal, and the progress bar."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from personalize import signals
from personalize.rundir import checkpoint_dir, list_checkpoints, resume_state_dir, step_of
from personalize.errors import PersonalizeError
from personalize.methods.stages import checkpoint_steps, stage_at
from personalize.resume import prune_resume_states

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

    A stop signal (`personalize.signals`: SIGTERM, SIGINT, SIGUSR1, SIGUSR2) ends the run after the step
    it arrived in: the resume state of that step is written (checked like any other), then `Interrupted`
    is raised. No `checkpoints/step-NNNNNN/` is written for it: checkpoints are at the method's steps,
    every one of them is evaluated and compared across runs, and an odd step (794 of 800) would add an
    evaluation and a row that an uninterrupted run does not have (and 3.4 GB for an SD UNet); the resume
    state is all a resumed run needs to end bit-identical to an uninterrupted one. With several
    processes every rank must stop at the same step (else the others wait forever in the next
    all-reduce): the signal is agreed on with one all-reduce every `check_every` steps (at the steps the
    loss is read anyway); a single process looks at its flag every step, which costs nothing.
    """

    def __init__(self, run_dir: Path, check_every: int = 1, save_resume_state: bool = True):
        self.run_dir = Path(run_dir)
        self.check_every = check_every
        self.save_resume_state = save_resume_state
        self.saved: list[Path] = []

    def on_train_start(self, trainer, module) -> None:
        signals.reclaim()  # Lightning has just put its own SIGTERM handler in place of ours
        stop = self._stop_signals(trainer, trainer.global_step, agree=True)
        if stop:  # it came while the model loaded: nothing trained since the last resume state
            raise signals.Interrupted(stop, "training", trainer.global_step, self.run_dir)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        saves = step in set(checkpoint_steps(module.stages))
        stop = self._stop_signals(trainer, step, agree=saves or self._checks(step))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and (saves or stop or self._checks(step)):
            self._stop_unless(trainer, math.isfinite(float(loss)), module, step, f"the loss became {float(loss)}")
        if not saves and not stop:
            return
        with trainer.precision_plugin.forward_context():
            finite = module.predicts_finite()
        self._stop_unless(trainer, finite, module, step, "the model's prediction became non-finite")
        if saves and trainer.is_global_zero:
            path = module.save_artifacts(checkpoint_dir(self.run_dir, step), step)
            self.saved.append(path)
            log.info("saved checkpoint %s", path)
        if self.save_resume_state:
            state = resume_state_dir(self.run_dir, step)
            trainer.save_checkpoint(state, weights_only=False)  # every rank takes part; rank 0 writes
            if trainer.is_global_zero:
                prune_resume_states(self.run_dir, keep=state)
                if stop:
                    log.warning("%s: saved the resume state %s", signals.signal_name(stop[0]), state)
            if not stop:  # one that came while this step's checkpoint was written: stop now, it is saved
                stop = self._stop_signals(trainer, step, agree=True)
        if stop:
            raise signals.Interrupted(stop, "training", step, self.run_dir)

    def _checks(self, step: int) -> bool:
        return bool(self.check_every) and step % self.check_every == 0

    def _stop_signals(self, trainer, step: int, agree: bool) -> list[int]:
        """The stop signals this step ends the run for: this process's own, or, with several processes,
        the one any rank received (agreed on only when `agree`, so that every rank stops together)."""
        mine = signals.pending()
        if trainer.world_size == 1:
            return mine
        if not agree:
            return []
        first = torch.tensor(mine[0] if mine else 0, device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(first, reduce_op="max"))
        return mine or ([agreed] if agreed else [])

    def _stop_unless(self, trainer, finite: bool, module, step: int, what: str) -> None:
        # every rank must stop together, else the others would wait forever in the next all-reduce
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        stage = stage_at(module.stages, step - 1)
        good = [c for c in list_checkpoints(self.run_dir) if step_of(c) < step]
        last = f"{good[-1]} (resume={self.run_dir} continues from it)" if good else "none yet"
        raise PersonalizeError(
            f"{what}{' on another rank' if finite else ''} at step {step} (stage '{stage.name}'); "
            f"last good checkpoint: {last}. Lower method.stages.{stage.name}.lr, or use hardware=gpu_bf16 instead of fp16"
        )


class RunProgressBar(TQDMProgressBar):
    """One bar for the whole run, in steps, with the method, the stage and the loss:

        two_stage · stage unet 3/5:  80%|████████  | 8/10 [00:04<00:01,  2.01it/s, loss=0.1523]

    "3/5" is the step within the stage, "8/10" the step of the run (a resumed run starts the bar where it
    resumed). The loss is the mean over the steps since the last reading, summed on the device each step
    and read on the host only every `loss_every` steps (give it the watchdog's `hardware.nan_check_every`,
    whose steps sync anyway): a per-step `float(loss)` would stall a GPU every step.

    tqdm rather than Rich (Lightning's default when rich is importable): tqdm is a dependency of ours,
    and writes a readable line to a log file (a SLURM job's output), where Rich's live display does not.
    """

    def __init__(self, method: str, loss_every: int = 10, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.method = method
        self.loss_every = max(1, int(loss_every))
        self.loss: float | None = None  # the last value read
        self._sum: torch.Tensor | None = None  # losses since the last reading, still on the device
        self._count = 0

    def description(self, module, step: int) -> str:
        stage = stage_at(module.stages, max(step - 1, 0))
        return f"{self.method} · stage {stage.name} {step - stage.start}/{stage.steps}"

    def on_train_start(self, trainer, module) -> None:
        super().on_train_start(trainer, module)
        self._start(trainer, module)

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start(trainer, module)  # (not called when a run resumes in the middle of its one epoch)

    def _start(self, trainer, module) -> None:
        # the run is one long epoch: Lightning's "Epoch 0" and its batch count say nothing about it
        bar = self.train_progress_bar
        bar.reset(total=module.total_steps())
        bar.initial = bar.n = trainer.global_step
        bar.set_description(self.description(module, trainer.global_step))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not self.is_enabled or self.train_progress_bar is None:
            return
        step = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            loss = loss.detach().float()
            self._sum = loss if self._sum is None else self._sum + loss  # on the device: no sync
            self._count += 1
        last = step >= module.total_steps()
        if self._sum is not None and (step % self.loss_every == 0 or last):
            self.loss = float(self._sum) / self._count  # the only host sync, every loss_every steps
            self._sum, self._count = None, 0
        bar = self.train_progress_bar
        if self._should_update(step, bar.total):
            bar.set_description(self.description(module, step), refresh=False)
            bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
            bar.n = step
            bar.refresh()

    def get_metrics(self, trainer, module) -> dict:
        return {} if self.loss is None else {"loss": f"{self.loss:.4g}"}
