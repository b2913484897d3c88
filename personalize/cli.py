"""Command-line entry points (Hydra apps). Each prints a PersonalizeError as one line, no traceback.

In a multirun a failing job, whatever the error, writes FAILED into its run dir and is re-raised as a
light `JobFailed`: Hydra records it for that job, runs the other jobs, and exits non-zero at the end.

Training and evaluation stop cleanly on SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 (preemption, a time limit,
Ctrl-C): at the next safe point, with INTERRUPTED in the run dir and exit code 128 + the signal; a job of
a multirun in a process of its own ends as `JobInterrupted` instead, and a requeued submitit/SLURM job
continues its own run dir (`run_task`, `_interrupted`, `continue_requeued_job`).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import personalize.help  # noqa: F401 - registers the resolver of every entry point's --help text
from personalize import signals
from personalize.config import CONF_DIR as _CONF_DIR
from personalize.errors import PersonalizeError
from personalize.io import atomic_write_text
from personalize.rundir import CONFIG_FILE, FAILED_FILE, resolve_checkpoint, samples_dir
from personalize.schema import check_template, checked_cli

# Each entry point imports the module of its task inside its main function, and quiet_libraries imports
# diffusers and transformers when a task runs: `personalize --help` and a bad option's one-line error
# come back in a fraction of a second, not after the seconds torch, diffusers and lightning take.

CONF_DIR = str(_CONF_DIR)
log = logging.getLogger("personalize")


def quiet_libraries() -> None:
    """Keep the console to our own progress: no per-file loading bars or library chatter."""
    import diffusers  # lazy: seconds to import (see above)
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", r".*module(s|\(s\))? in eval mode.*", ".*LeafSpec.*", ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:  # composed outside a Hydra app (tests)
        return False


def run_task(task, cfg: DictConfig, interruptible: bool = False):
    """Run `task(cfg)`; user errors become one line; in a multirun any failure is recorded, not fatal.

    `interruptible` (training, evaluation): SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 stop the task at its
    next safe point (`personalize.signals`) instead of killing it; see `_interrupted`.
    """
    quiet_libraries()
    stop = None
    try:
        if not interruptible:
            return task(cfg)
        with signals.deferred():
            return task(cfg)
    except signals.Interrupted as error:  # handled below, outside this block (see the note there)
        stop = signals.Interrupted(error.signals, error.phase, error.step, error.run_dir)  # without its frames
    except PersonalizeError as error:
        print(f"error: {error}", file=sys.stderr)
        if not _is_multirun():  # (a multirun keeps the job's folder: its FAILED note is what the sweep reports)
            remove_unused_run_dir()
            raise SystemExit(2)
        summary = f"error: {error}"
        _record_failure(cfg, f"{error}\n")
    except Exception as error:
        if not _is_multirun():
            raise  # a bug: keep its traceback
        summary = f"{type(error).__name__}: {error}"
        _record_failure(cfg, traceback.format_exc())
    # Outside the except block: nothing of the failed job (its frames, model, GPU memory) stays referenced
    # by the exception Hydra keeps until the end of the sweep, so it cannot pollute the next job.
    if stop is not None:
        _interrupted(cfg, stop)
    _free_memory()
    raise JobFailed(f"{Path(str(cfg.paths.output_dir)).name}: {summary}")


class JobFailed(Exception):
    """One multirun job failed (details in its run dir's FAILED); carries no frames of the job."""


class JobInterrupted(Exception):
    """One multirun job was stopped by a signal (its run dir has INTERRUPTED): not a failure, but not done."""


def _interrupted(cfg: DictConfig, stop: signals.Interrupted) -> None:
    """A task stopped by a signal: note it in the run dir, say how to continue, and end as the signal says.

    - One run, or a multirun whose jobs run in this process (the basic launcher): exit with 128 + the
      signal. The signal was meant for this process, so a sweep stops here, before its next job.
    - A job in a process of its own (submitit, joblib): the signal was for this job alone. Any handler
      that was installed before ours gets the signal now (submitit's checkpoints the job and requeues it,
      then exits; the requeued job continues this run dir, see `continue_requeued_job`); if the job is
      still here, it ends as `JobInterrupted`, which Hydra records for it while the others go on.
    """
    from personalize.resume import is_launch_rank_zero  # lazy: personalize.resume imports torch and lightning

    run_dir = stop.run_dir or Path(str(cfg.paths.output_dir))
    own_process = _is_multirun() and not _jobs_run_in_this_process()
    if is_launch_rank_zero():
        try:
            signals.mark_interrupted(run_dir, stop)
        except Exception:  # noqa: BLE001 - stopping matters more than the note
            log.exception("could not write the %s note", signals.INTERRUPTED_FILE)
    again = ("run the same command again: it evaluates only what is missing" if "run_dir" in cfg
             else f"run the same command with resume=true (or resume={run_dir})")
    kept = "the resume state of that step is saved" if stop.phase == "training" else "what is done is kept"
    message = f"{stop.describe()}: {kept}; {again}"
    log.warning("%s%s", message, "; the sweep stops here" if _is_multirun() and not own_process else "")
    print(f"interrupted: {message}", file=sys.stderr)
    _free_memory()
    signals.pass_on(stop.signals)
    if own_process:
        raise JobInterrupted(f"{run_dir.name}: {stop.describe()} (not a failure: {again})")
    raise SystemExit(stop.exit_code)


def _jobs_run_in_this_process() -> bool:
    """Whether the multirun's jobs run one after the other in the sweep's own process (basic launcher)."""
    return str(HydraConfig.get().launcher.get("_target_", "")).endswith(".BasicLauncher")


def continue_requeued_job(cfg: DictConfig) -> None:
    """A job that SLURM or submitit started again continues its own run dir, with no user action.

    A submitit job runs the sweep config it was pickled with, whose `${now:...}` is already resolved, so
    a requeued job gets the same run dir as its first start; there a `config.yaml` means the run began
    (and was preempted or timed out), so it continues as `resume=<that dir>` would. Only inside a
    submitit job (SUBMITIT_FOLDER) or a restarted SLURM job (SLURM_RESTART_COUNT > 0): an ordinary call
    never finds an earlier run in the fresh dir Hydra made for it. An explicit `resume` is left alone.
    """
    if cfg.get("resume") not in (None, False) and str(cfg.resume).lower() not in ("false", "none", "null", ""):
        return
    requeued = bool(os.environ.get("SUBMITIT_FOLDER")) or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    run_dir = Path(str(cfg.paths.output_dir))
    if requeued and (run_dir / CONFIG_FILE).exists():
        log.info("requeued job: continuing its own run %s", run_dir)
        cfg.resume = str(run_dir)


def _record_failure(cfg: DictConfig, details: str) -> None:
    try:
        atomic_write_text(Path(str(cfg.paths.output_dir)) / FAILED_FILE, details)
    except Exception:  # noqa: BLE001 - the job's own error matters more than a failed note
        log.exception("could not write the FAILED note")
    log.error("job failed (the sweep goes on):\n%s", details)


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes into hydra.output_subdir


def _log_files() -> list[logging.FileHandler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.FileHandler)]


def unused_run_dir_files(run_dir: Path, output_subdir: str | None, log_files: list[Path]) -> list[Path] | None:
    """The files to delete if `run_dir` holds only what Hydra made for this job (its config copy in
    `output_subdir` and the job's log files), else None: anything more belongs to a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or run_dir.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        return None  # hydra.run.dir=. (or above): the user's own folder
    logs = {Path(p).resolve() for p in log_files}
    files = []
    for entry in run_dir.iterdir():
        if output_subdir and entry.name == output_subdir and entry.is_dir() and not entry.is_symlink():
            inner = list(entry.iterdir())
            if not all(p.name in HYDRA_FILES and p.is_file() for p in inner):
                return None
            files += inner
        elif entry.is_file() and entry.resolve() in logs:
            files.append(entry)
        else:
            return None  # config.yaml, checkpoints/, resume/, FAILED, class images...: a run's, keep it all
    return files


def remove_unused_run_dir() -> None:
    """A job that failed on its input before writing anything leaves no folder behind.

    Hydra makes the run dir (its `.hydra/` copy of the config, the job's log file) before the task runs,
    so a bad setting would leave an empty `outputs/train/runs/<time>_...` per try. This removes it when
    it holds nothing else; the folder of a run that began (config.yaml, checkpoints/, resume/), a resumed
    run's own dir (never Hydra's dir of this call) and the working directory are never touched.
    """
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not inside a Hydra app
        return
    run_dir = Path(hydra_cfg.runtime.output_dir)
    handlers = [h for h in _log_files() if Path(h.baseFilename).resolve().parent == run_dir.resolve()]
    files = unused_run_dir_files(run_dir, hydra_cfg.output_subdir, [Path(h.baseFilename) for h in handlers])
    if files is None:
        return
    for handler in handlers:  # nothing more is logged into a file about to go
        handler.close()
        for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(lg, logging.Logger) and handler in lg.handlers:
                lg.removeHandler(handler)
    try:
        for path in files:
            path.unlink()
        if hydra_cfg.output_subdir and (run_dir / hydra_cfg.output_subdir).is_dir():
            (run_dir / hydra_cfg.output_subdir).rmdir()
        run_dir.rmdir()  # fails, and keeps the folder, if anything appeared in it meanwhile
    except OSError as error:
        log.debug("kept %s: %s", run_dir, error)


@checked_cli("train")  # unknown group option / key: one line, exit 2
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_main(cfg: DictConfig):
    from personalize.train import train

    def task(cfg):
        continue_requeued_job(cfg)
        return train(cfg)

    result = run_task(task, cfg, interruptible=True)
    return str(result.run_dir)


@checked_cli("sample")  # unknown group option / key: one line, exit 2
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def sample_main(cfg: DictConfig):
    from personalize.devices import resolve_device
    from personalize.sample import sample_checkpoint

    def task(cfg):
        device = resolve_device(cfg.device)  # auto: cuda if a GPU is visible; cuda without one: one line
        for i, template in enumerate(cfg.prompts):  # filled from checkpoint.json: a stray {x} is a KeyError there
            check_template(f"prompts[{i}]", template)
        ckpt = resolve_checkpoint(Path(cfg.run_dir), cfg.step)
        out = Path(cfg.out_dir) if cfg.out_dir else samples_dir(Path(cfg.run_dir)) / f"{ckpt.name}-cli"
        paths = sample_checkpoint(ckpt, list(cfg.prompts), out, num_images=int(cfg.num_images), seed=int(cfg.seed),
                                  steps=int(cfg.steps), guidance_scale=float(cfg.guidance_scale), sampler=str(cfg.sampler),
                                  device=device)
        print(f"wrote {len(paths)} images to {out}")
        return out

    return run_task(task, cfg)


@checked_cli("edit")  # unknown group option / key: one line, exit 2
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="edit")
def edit_main(cfg: DictConfig):
    """personalize-edit run_dir=<run> [image=<photo>] [edit=fast|replace|refine|reweight|local_blend] ..."""
    from personalize.edit.runner import run_edit

    result = run_task(run_edit, cfg)
    return None if result is None else str(result)


@checked_cli("evaluate")  # unknown group option / key: one line, exit 2
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def eval_main(cfg: DictConfig):
    """personalize-eval run_dir=<run> [eval=jindal]: evaluate an existing run's checkpoints, no training."""
    def task(cfg):
        from personalize.eval.publish import print_table
        from personalize.eval.rerun import evaluate_run_dir

        records = evaluate_run_dir(cfg)
        signals.clear_interrupted(Path(cfg.run_dir), phases=("evaluation",))  # training's note stays: not done
        print_table(records, Path(cfg.run_dir))
        return records

    return run_task(task, cfg, interruptible=True)


@checked_cli("report")  # unknown group option / key: one line, exit 2
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def report_main(cfg: DictConfig):
    """personalize-report experiment=<name> [report.selection=best|last|<step>] [report.source=local|wandb|both]"""
    from personalize.report.command import report

    run_task(report, cfg)


@checked_cli("download")  # unknown group option / key: one line, exit 2
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="download")
def download_main(cfg: DictConfig):
    """personalize-download model=<name>: fetch a base model (only the files we load) and verify its hash."""
    from personalize.download import download

    return str(run_task(download, cfg))


@checked_cli("data")  # unknown key: one line, exit 2
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="data")
def data_main(cfg: DictConfig):
    """personalize-data [verify_only=true] [force=true]: fetch and verify the DreamBooth dataset in paths.dreambooth_dir."""
    from personalize.dataset import data_task

    # not run_task: it first imports diffusers and transformers to quiet them, seconds this never needs
    try:
        return str(data_task(cfg))
    except PersonalizeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":  # python -m personalize.cli ...
    train_main()
