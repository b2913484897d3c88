"""The runs of a report: found in local run dirs (their config.yaml, metrics.jsonl, FAILED, read through
`personalize.rundir`) or in the W&B API, one per method x subject x seed."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from personalize.errors import PersonalizeError
from personalize.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FAILED_FILE,
    HYDRA_CONFIG_FILE,
    REAL_IMAGES_PROTOCOL,
    RUN_SUBDIRS,
    current_records,
    load_run_config,
    metrics_path,
    read_records,
    run_config_path,
)

log = logging.getLogger(__name__)

# Folders inside a run dir that never hold another run (not walked, so a big sweep is read fast).
_NOT_RUNS = {*RUN_SUBDIRS, HYDRA_CONFIG_FILE.parent.name, ".submitit", "class_images", "models", "__pycache__"}


@dataclass
class RunInfo:
    """One personalization run: who it is, how it ended, and its evaluation records."""

    run_dir: str  # a folder, or wandb://entity/project/id
    group: str | None
    method: str | None
    subject: str | None
    seed: int | None
    status: str  # ok | failed | not evaluated | incomplete
    error: str | None = None
    mtime: float = 0.0
    records: list[dict] = field(default_factory=list)  # one per checkpoint x protocol
    real_images: dict | None = None  # the record of the subject's photos scored against each other (eval.real_images)
    source: str = "local"
    subject_dir: str | None = None  # the subject's photos, as the run's config names them (the HTML page shows them)
    base_model: str | None = None  # what it trained on, with provenance (describe_base_model)

    @property
    def key(self) -> tuple:
        return (self.method, self.subject, self.seed)

    @property
    def label(self) -> str:
        return f"{self.method}-{self.subject}-s{self.seed}"

    def reason(self) -> str:
        if self.status == "failed":
            return f"run failed ({self.error})" if self.error else "run failed"
        if self.status == "not evaluated":
            return "run not evaluated (no metrics.jsonl: `personalize-eval run_dir=...`)"
        if self.status == "incomplete":
            return "run incomplete (no checkpoint: still running, killed or crashed)"
        return "no value"



def last_stage_start(config: dict) -> int | None:
    """Global step at which the method's last stage begins (from a run's method.stages)."""
    stages = ((config.get("method") or {}).get("stages")) or {}
    try:
        steps = [int(stage["steps"]) for stage in stages.values()]
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return sum(steps[:-1]) if steps else None



def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # a traceback's last line names the exception; a user error is one line
    return (lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")).strip()[:300]



def read_run(run_dir: Path) -> RunInfo | None:
    """A RunInfo from a run dir (its resolved config.yaml, or Hydra's .hydra/config.yaml if the run died early)."""
    run_dir = Path(run_dir)
    config_path = run_config_path(run_dir, early=True)
    if config_path is None:
        return None
    try:
        config = OmegaConf.to_container(load_run_config(run_dir, early=True), resolve=False)
    except PersonalizeError as error:
        log.warning("%s: skipped", error)
        return None
    if config.get("task_name", "train") != "train" or "method" not in config:
        return None
    seed = config.get("seed")
    info = RunInfo(
        run_dir=str(run_dir), group=None if config.get("group") is None else str(config.get("group")),
        method=(config.get("method") or {}).get("name"), subject=(config.get("subject") or {}).get("name"),
        seed=int(seed) if isinstance(seed, int) else None, status="incomplete",
        subject_dir=_subject_dir(config), base_model=describe_base_model(config.get("model")),
    )
    failed = run_dir / FAILED_FILE
    info.mtime = max(p.stat().st_mtime for p in (config_path, metrics_path(run_dir), failed) if p.exists())
    info.records, info.real_images = split_real_images(current_records(read_records(run_dir)))
    start = last_stage_start(config)
    for record in info.records:
        if record.get("stage_step") is None and start is not None:
            record["stage_step"] = int(record["step"]) - start
    checkpoints = run_dir / CHECKPOINTS_DIR
    if failed.exists():
        info.status, info.error = "failed", _first_line(failed.read_text())
    elif info.records:
        info.status = "ok"
    elif checkpoints.is_dir() and any(checkpoints.iterdir()):
        info.status = "not evaluated"
    return info


def split_real_images(records: list[dict]) -> tuple[list[dict], dict | None]:
    """(the checkpoints' records, the run's real-images record or None): the latter is no checkpoint's, so
    no step is selected for it; the report shows it as the row above the methods."""
    real = [r for r in records if r.get("protocol") == REAL_IMAGES_PROTOCOL]
    return [r for r in records if r.get("protocol") != REAL_IMAGES_PROTOCOL], (real[-1] if real else None)


def describe_base_model(model: dict | None) -> str | None:
    """The base model a run's config names, with provenance: the id loaded, the id it is a copy of, and the
    UNet hash that loading checked (a run whose UNet did not match never trained)."""
    if not isinstance(model, dict) or not model.get("pretrained"):
        return None
    notes = []
    if model.get("original_id") and model["original_id"] != model["pretrained"]:
        notes.append(f"copy of {model['original_id']}")
    if model.get("unet_sha256"):
        notes.append(f"UNet sha256 {str(model['unet_sha256'])[:12]}… checked")
    return str(model["pretrained"]) + (f" ({'; '.join(notes)})" if notes else "")



def _subject_dir(config: dict) -> str | None:
    folder = (config.get("subject") or {}).get("data_dir")
    return None if folder in (None, "") else str(folder)



def find_local_runs(roots: Iterable[str | Path], group: str | None = None) -> list[RunInfo]:
    """Every run under `roots` (of `group` when given), walking past the big folders inside runs."""
    runs: list[RunInfo] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for here, dirs, files in os.walk(root):
            if CONFIG_FILE in files or HYDRA_CONFIG_FILE.parent.name in dirs:
                info = read_run(Path(here))
                if info is not None and (group is None or info.group == group):
                    runs.append(info)
            dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS)
    return runs



def find_wandb_runs(project: str, group: str, entity: str | None = None, api=None) -> list[RunInfo]:
    """The group's training runs from the W&B API, with `eval/<protocol>/<metric>` history as records.

    Needs `wandb login` (or WANDB_API_KEY); `api` may be any object with wandb.Api's `runs()`.
    """
    if api is None:
        try:
            import wandb

            api = wandb.Api()
        except Exception as error:  # no network, not logged in
            raise PersonalizeError(f"cannot reach the W&B API ({error}): log in (`wandb login`) or use report.source=local")
    path = f"{entity}/{project}" if entity else project
    runs = []
    for run in api.runs(path, filters={"group": group}):
        if getattr(run, "job_type", None) not in (None, "", "train"):
            continue  # the report's own runs, evaluation-only runs
        config = dict(run.config or {})
        method = (config.get("method") or {}).get("name")
        subject = (config.get("subject") or {}).get("name")
        seed = config.get("seed")
        start = last_stage_start(config)
        records, real_images = split_real_images(_wandb_records(run.scan_history(), method, subject, start))
        state = getattr(run, "state", "finished")
        status = "ok" if records else ("failed" if state in ("failed", "crashed") else
                                       "incomplete" if state == "running" else "not evaluated")
        stamp = getattr(run, "updated_at", None) or getattr(run, "created_at", None)
        runs.append(RunInfo(
            run_dir=f"wandb://{path}/{run.id}", group=group, method=method, subject=subject,
            seed=int(seed) if isinstance(seed, int) else None, status=status,
            error=f"W&B state {state}" if status == "failed" else None,
            mtime=pd.Timestamp(stamp).timestamp() if stamp else 0.0, records=records, real_images=real_images,
            source="wandb",
            subject_dir=_subject_dir(config), base_model=describe_base_model(config.get("model")),
        ))
    return runs



def _wandb_records(rows: Iterable[dict], method, subject, start: int | None) -> list[dict]:
    """History rows {"eval/dreambooth/clip_i": .., "trainer/global_step": 300} -> metrics records."""
    by_key: dict[tuple[int, str], dict] = {}
    for row in rows:
        step = row.get("trainer/global_step", row.get("step", row.get("_step")))
        if step is None:
            continue
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != "eval" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            protocol, metric = parts[1], parts[2]
            record = by_key.setdefault((int(step), protocol), {
                "step": int(step), "stage_step": int(step) - start if start is not None else int(step),
                "method": method, "subject": subject, "protocol": protocol,
            })
            record[metric] = float(value)
    return [by_key[k] for k in sorted(by_key)]



def choose_runs(runs: Sequence[RunInfo]) -> tuple[dict[tuple, RunInfo], list[RunInfo]]:
    """One run per (method, subject, seed): the newest with results, else the newest. Also the others."""
    chosen: dict[tuple, RunInfo] = {}
    for run in sorted(runs, key=lambda r: (r.status == "ok", r.mtime)):
        chosen[run.key] = run  # later (better, newer) wins
    superseded = [r for r in runs if chosen[r.key] is not r]
    return chosen, superseded



def collect_runs(cfg: DictConfig) -> tuple[list[RunInfo], list[str]]:
    """The group's runs from the sources named by `report.source` (local, wandb or both)."""
    source = str(cfg.report.source)
    if source not in ("local", "wandb", "both"):
        raise PersonalizeError(f"report.source={source!r}: use local, wandb or both")
    group = str(cfg.group)
    runs, sources = [], []
    if source in ("local", "both"):
        roots = [str(r) for r in cfg.report.runs_dirs]
        runs += find_local_runs(roots, group)
        sources += roots
    if source in ("wandb", "both"):
        remote = find_wandb_runs(str(cfg.logger.project), group, cfg.logger.get("entity"))
        if source == "both":  # local results win; W&B fills what is not on this machine
            have = {r.key for r in runs if r.status == "ok"}
            remote = [r for r in remote if r.key not in have]
        runs += remote
        sources.append(f"W&B {cfg.logger.get('entity') or ''}/{cfg.logger.project}".replace(" /", " "))
    return runs, sources

