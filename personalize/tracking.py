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
    from lightning.pytorch.loggers import WandbLogger

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
def finishing_wandb():
    """Always close the W&B run, even when the job fails, so the next multirun job starts clean.

    A failing job is closed with exit code 1, so the dashboard shows it as failed, not finished.
    """
    exit_code = 1
    try:
        yield
        exit_code = 0
    finally:
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=exit_code)
        except ImportError:
            pass


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline W&B runs under a run dir (`<run>/wandb/offline-run-*`), oldest first."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def read_offline_history(wandb_run: Path, wait_s: float = 30.0) -> list[dict]:
    """The history rows (each `log` call) of an offline W&B run, read from its `.wandb` file.

    wandb has no public reader for offline runs, so this parses the file directly: a LevelDB-style log
    (7-byte file header, 32 KiB blocks, records split into FULL/FIRST/MIDDLE/LAST chunks) of protobuf
    `Record`s; history items carry JSON values. `wandb.finish()` can return before wandb's service has
    written the file out, so this waits (up to `wait_s`) for the run's closing `exit` record.
    """
    import time

    deadline = time.monotonic() + wait_s
    while True:
        rows, complete = _parse_offline_run(Path(wandb_run))
        if complete or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _parse_offline_run(wandb_run: Path) -> tuple[list[dict], bool]:
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    path = next(Path(wandb_run).glob("*.wandb"))
    raw = path.read_bytes()
    block, header = 32768, 7
    rows, pos, pending, complete = [], 7, b"", False
    while pos + header <= len(raw):
        if block - pos % block < header:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + header])
        pos += header
        data, pos = raw[pos:pos + length], pos + length
        if pos > len(raw):  # the writer is mid-record
            break
        if kind in (1, 2):  # FULL, FIRST
            pending = data
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += data
        else:
            continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            record_type = record.WhichOneof("record_type")
            if record_type == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
            complete = complete or record_type == "exit"
    return rows, complete
