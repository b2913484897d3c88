"""Weights & Biases: offline by default, grouped by experiment, tagged by method/subject/model.

Lightning's WandbLogger does the logging; this module only builds it, keeps secrets out of the saved
config, and guarantees `wandb.finish()` so a failed job in a multirun never leaks into the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from personalize.signals import Interrupted, signal_name

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
_NOT_SECRET = {"identifier", "new_token", "tokenizer"}  # our config's own words that look like secrets


def redact(container):
    """A copy of a config container with every secret-looking value replaced."""
    if isinstance(container, dict):
        return {
            k: ("<redacted>" if _SECRET_KEY.search(str(k)) and str(k) not in _NOT_SECRET and isinstance(v, str) else redact(v))
            for k, v in container.items()
        }
    if isinstance(container, list):
        return [redact(v) for v in container]
    return container


def resolved_config(cfg: DictConfig) -> dict:
    return redact(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.method.name}-{cfg.subject.name}-s{cfg.seed}"


def run_id(run_dir: Path, task_name: str) -> str:
    """A W&B run id fixed by the run dir and task: a resumed run continues the same W&B run."""
    return hashlib.sha1(f"{Path(run_dir).resolve()}:{task_name}".encode()).hexdigest()[:16]


def build_logger(cfg: DictConfig, run_dir: Path):
    """A Lightning WandbLogger per `cfg.logger`, or False for `logger=none`."""
    if cfg.logger.backend == "none":
        return False
    from lightning.pytorch.loggers import WandbLogger  # lazy: imports torch, and the torch-free report imports this module

    os.environ.setdefault("WANDB_SILENT", "true")
    offline = cfg.logger.mode == "offline"
    logger = WandbLogger(
        name=run_name(cfg), project=cfg.logger.project, entity=cfg.logger.get("entity"),
        group=str(cfg.group), tags=[cfg.method.name, cfg.subject.name, cfg.model.name, *cfg.get("tags", [])],
        save_dir=str(run_dir), offline=offline, config=resolved_config(cfg), job_type=str(cfg.task_name),
        id=run_id(run_dir, str(cfg.task_name)), resume="allow",
    )
    # Lightning always passes anonymous=None, and wandb warns about the setting whatever its value
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


@contextlib.contextmanager
def finishing_wandb(continues_interrupted: bool = False):
    """Always close the W&B run, even when the job fails, so the next multirun job starts clean.

    A failing job is closed with exit code 1, so the dashboard shows it as failed, not finished. A job
    stopped by a signal (`signals.Interrupted`) is closed with the process's exit code (128 + the
    signal), after `mark_preempting()`: W&B shows it as preempted, not as finished or failed by a bug,
    and its summary says which signal stopped it at which step (`interrupted/*`). The W&B run continues
    under the same id when the run is resumed (`run_id`); `continues_interrupted` says this call resumes
    an interrupted run, whose summary keys are then removed when it finishes (an offline run cannot look
    them up).
    """
    exit_code, stop = 1, None
    try:
        yield
        exit_code = 0
    except Interrupted as interrupted:
        exit_code, stop = interrupted.exit_code, interrupted
        raise
    finally:
        try:
            import wandb  # optional: a run without W&B installed has nothing to close

            if wandb.run is not None:
                _mark_interruption(wandb.run, stop, continues_interrupted)
                wandb.finish(exit_code=exit_code)
        except ImportError:
            pass


_INTERRUPTED_KEYS = ("interrupted/signal", "interrupted/step", "interrupted/phase")


def _mark_interruption(run, stop: Interrupted | None, continues_interrupted: bool) -> None:
    if stop is not None:
        run.summary.update(dict(zip(_INTERRUPTED_KEYS, (signal_name(stop.signum), stop.step, stop.phase))))
        run.mark_preempting()
    elif continues_interrupted:  # finished: the earlier interruption of this resumed run is over
        for key in _INTERRUPTED_KEYS:
            del run.summary[key]
