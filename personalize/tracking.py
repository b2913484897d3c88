"""Weights & Biases: offline by default, grouped by experiment, tagged by method/subject/model.

Lightning's WandbLogger does the logging; this module only builds it, keeps secrets out of the saved
config, and guarantees `wandb.finish()` so a failed job in a multirun never leaks into the next one.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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


def build_logger(cfg: DictConfig, run_dir: Path):
    """A Lightning WandbLogger per `cfg.logger`, or False for `logger=none`."""
    if cfg.logger.backend == "none":
        return False
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    offline = cfg.logger.mode == "offline"
    return WandbLogger(
        name=run_name(cfg), project=cfg.logger.project, entity=cfg.logger.get("entity"),
        group=str(cfg.group), tags=[cfg.method.name, cfg.subject.name, cfg.model.name, *cfg.get("tags", [])],
        save_dir=str(run_dir), offline=offline, config=resolved_config(cfg), job_type=str(cfg.task_name),
    )


@contextlib.contextmanager
def finishing_wandb():
    """Always close the W&B run, even when the job fails, so the next multirun job starts clean."""
    try:
        yield
    finally:
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        except ImportError:
            pass
