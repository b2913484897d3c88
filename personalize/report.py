"""A paper's table from a sweep: our numbers beside the paper's, per subject, per checkpoint step.

    personalize-report experiment=zeng2023_table1                  # best checkpoint per subject, as the paper
    personalize-report experiment=zeng2023_table1 report.selection=400   # one fixed step for every subject
    personalize-report experiment=jindal2023_table1 report.source=wandb  # runs from the W&B API instead

The experiment config says what to compare (`table:` methods, subjects, columns, steps, selection);
`report.yaml` composes the same groups as training, so `experiment=X` gives the report the sweep's W&B
group and table. Runs come from local run dirs (every `config.yaml` of that group under
`report.runs_dirs`) and/or from the W&B API; their results are the `metrics.jsonl` records the
evaluation writes, one per checkpoint x protocol.

Steps are compared as *stage steps* of each method's last stage (`stage_step` in the records): two_stage's
global steps 300..900 are its fine-tuning steps 200..800, the steps DreamBooth calls 200..800.

Nothing is averaged away silently: a subject without a value (no run, a failed run, a run not evaluated,
a step or protocol missing) makes its cell say "n/N" and is listed under "Missing" with the reason.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import yaml
from omegaconf import DictConfig

from personalize.errors import PersonalizeError
from personalize.io import read_jsonl
# The page's helpers, re-exported: the notebook and users find a run's selected images here.
from personalize.report_html import PageSettings, eval_folder, eval_images, selected_step, write_page  # noqa: F401

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FAILED_FILE = "FAILED"
LOWER_IS_BETTER = {"fid"}
# Fields of a metrics record that are not metric values.
# (A superset of personalize.eval.evaluate.RECORD_FIELDS, kept here so the report never imports torch.)
RECORD_KEYS = {"step", "stage", "stage_step", "method", "subject", "checkpoint", "protocol", "references",
               "num_images", "key", "spec", "seconds", "time", "base_images", "seed", "run_dir", "metric_settings"}
# Folders inside a run dir that never hold another run (not walked, so a big sweep is read fast).
_NOT_RUNS = {"checkpoints", "eval", "samples", "resume", "wandb", ".hydra", ".submitit", "class_images", "models",
             "__pycache__"}
_UNSET = "—"


# ----------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Column:
    """One column of the paper's table: our (protocol, metric), and where the paper's value sits."""

    label: str
    protocol: str
    metric: str
    paper: str | None = None  # dotted path under the paper's row, e.g. "diverse.clip_i"


@dataclass
class TableSpec:
    """What a report compares. From an experiment's `table:` (+ `report.*` overrides), or from the runs."""

    name: str
    methods: list[str]
    subjects: list[str]
    columns: list[Column]
    steps: list[int] | None = None  # stage steps compared; None: every evaluated checkpoint
    selection: str = "best"  # best | last | <stage step>
    select_by: str = "clip_i"  # metric that picks the best checkpoint, or "each" (every metric its own best)
    paper: dict | None = None  # the paper's entry of paper_tables.yaml (source, rows, note)

    @property
    def fixed_step(self) -> int | None:
        return int(self.selection) if str(self.selection).lstrip("-").isdigit() else None

    def describe_selection(self) -> str:
        steps = f"stage steps {', '.join(map(str, self.steps))}" if self.steps else "the evaluated checkpoints"
        if self.fixed_step is not None:
            return f"the checkpoint at stage step {self.fixed_step} for every subject"
        if self.selection == "last":
            return f"the last of {steps} of each run"
        by = "each metric's own best" if self.select_by == "each" else f"highest {self.select_by}" + (
            " (lowest)" if self.select_by in LOWER_IS_BETTER else "")
        return f"best of {steps} per subject and protocol ({by})"

    def paper_value(self, method: str, column: Column) -> float | None:
        if not self.paper or not column.paper:
            return None
        node: Any = (self.paper.get("rows") or {}).get(method)
        for part in column.paper.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return float(node) if isinstance(node, (int, float)) else None


def _validate_selection(selection: str, select_by: str) -> None:
    if selection not in ("best", "last") and not str(selection).lstrip("-").isdigit():
        raise PersonalizeError(f"report.selection={selection!r}: use best, last or a checkpoint step (e.g. 400)")
    if not select_by:
        raise PersonalizeError("report.select_by is empty: name a metric (clip_i, dino, ...) or 'each'")


def load_paper_tables(path: str | Path | None) -> dict:
    """The papers' reference numbers (experiments/paper_tables.yaml); {} when the file is absent."""
    if not path or not Path(path).is_file():
        if path:
            log.warning("paper tables '%s' not found: the report shows our numbers only", path)
        return {}
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise PersonalizeError(f"paper tables '{path}' are not valid YAML ({error}): fix the file or set report.paper_tables")


def spec_from_cfg(cfg: DictConfig) -> TableSpec | None:
    """The table of the experiment (`cfg.table`), with the `cfg.report` overrides; None when there is none."""
    rep = cfg.report
    table = cfg.get("table")
    if table is None:
        return None
    selection, select_by = str(rep.selection), str(rep.select_by)
    _validate_selection(selection, select_by)
    paper = load_paper_tables(rep.get("paper_tables")).get(str(table.name))
    columns = [Column(str(c.label), str(c.protocol), str(c.metric), None if c.get("paper") is None else str(c.paper))
               for c in table.columns]
    steps = rep.get("steps")
    return TableSpec(
        name=str(table.name), methods=[str(m) for m in table.methods], subjects=[str(s) for s in table.subjects],
        columns=columns, steps=None if steps is None else [int(s) for s in steps],
        selection=selection, select_by=select_by, paper=paper,
    )


def spec_from_runs(name: str, runs: Sequence["RunInfo"], selection: str = "best", select_by: str = "clip_i",
                   steps: Sequence[int] | None = None) -> TableSpec:
    """A table for a group without a paper table: every method, subject, protocol and metric found."""
    _validate_selection(selection, select_by)
    methods = sorted({r.method for r in runs if r.method})
    subjects = sorted({r.subject for r in runs if r.subject})
    pairs = sorted({(rec["protocol"], m) for r in runs for rec in r.records for m in metric_names(rec)})
    columns = [Column(f"{p} {m}", p, m) for p, m in pairs]
    return TableSpec(name, methods, subjects, columns, None if steps is None else list(steps), selection, select_by)


# ----------------------------------------------------------------------------------------------- runs


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
    records: list[dict] = field(default_factory=list)
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


def metric_names(record: dict) -> list[str]:
    """The metric values of a metrics record (numbers that are not one of its identifying fields)."""
    return [k for k, v in record.items()
            if k not in RECORD_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)]


def read_metrics(path: Path) -> list[dict]:
    """The current record of each (step, protocol) of a metrics.jsonl.

    The evaluation appends a record per (checkpoint, protocol, settings key) and may append again for the
    same ones (resumed, a metric added): later records extend earlier ones, and of several settings keys
    the one written last counts. A line that does not parse is skipped with a warning.
    """
    merged: dict[tuple, dict] = {}
    latest_key: dict[tuple, tuple] = {}
    for record in read_jsonl(path, log):
        if "protocol" in record and "step" in record:
            pair = (int(record["step"]), str(record["protocol"]))
            full = pair + (str(record.get("key")),)
            merged[full] = {**merged.get(full, {}), **{k: v for k, v in record.items() if v is not None}}
            latest_key[pair] = full
    return [merged[latest_key[pair]] for pair in sorted(latest_key)]


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
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        return None
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError:
        log.warning("unreadable config %s: skipped", config_path)
        return None
    if not isinstance(config, dict) or config.get("task_name", "train") != "train" or "method" not in config:
        return None
    seed = config.get("seed")
    info = RunInfo(
        run_dir=str(run_dir), group=None if config.get("group") is None else str(config.get("group")),
        method=(config.get("method") or {}).get("name"), subject=(config.get("subject") or {}).get("name"),
        seed=int(seed) if isinstance(seed, int) else None, status="incomplete",
        subject_dir=_subject_dir(config), base_model=describe_base_model(config.get("model")),
    )
    stamps = [p.stat().st_mtime for p in (config_path, run_dir / METRICS_FILE, run_dir / FAILED_FILE) if p.exists()]
    info.mtime = max(stamps)
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        info.records = read_metrics(metrics)
    start = last_stage_start(config)
    for record in info.records:
        if record.get("stage_step") is None and start is not None:
            record["stage_step"] = int(record["step"]) - start
    if (run_dir / FAILED_FILE).exists():
        info.status, info.error = "failed", _first_line((run_dir / FAILED_FILE).read_text())
    elif info.records:
        info.status = "ok"
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        info.status = "not evaluated"
    return info


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
            if "config.yaml" in files or ".hydra" in dirs:
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
        records = _wandb_records(run.scan_history(), method, subject, start)
        state = getattr(run, "state", "finished")
        status = "ok" if records else ("failed" if state in ("failed", "crashed") else
                                       "incomplete" if state == "running" else "not evaluated")
        stamp = getattr(run, "updated_at", None) or getattr(run, "created_at", None)
        runs.append(RunInfo(
            run_dir=f"wandb://{path}/{run.id}", group=group, method=method, subject=subject,
            seed=int(seed) if isinstance(seed, int) else None, status=status,
            error=f"W&B state {state}" if status == "failed" else None,
            mtime=pd.Timestamp(stamp).timestamp() if stamp else 0.0, records=records, source="wandb",
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


# ------------------------------------------------------------------------------------------- tables


def records_frame(runs: Iterable[RunInfo]) -> pd.DataFrame:
    """Long table of every metric value: method, subject, seed, run_dir, protocol, step, stage_step, metric, value."""
    rows = []
    for run in runs:
        for record in run.records:
            stage_step = record.get("stage_step", record["step"])
            for metric in metric_names(record):
                value = float(record[metric])
                if math.isfinite(value):
                    rows.append(dict(method=run.method, subject=run.subject, seed=run.seed, run_dir=run.run_dir,
                                     protocol=str(record["protocol"]), step=int(record["step"]),
                                     stage_step=int(stage_step), metric=metric, value=value))
    columns = ["method", "subject", "seed", "run_dir", "protocol", "step", "stage_step", "metric", "value"]
    return pd.DataFrame(rows, columns=columns)


def select_checkpoints(frame: pd.DataFrame, spec: TableSpec) -> tuple[pd.DataFrame, list[str]]:
    """Per (method, subject, seed, protocol) the values at the selected checkpoint. Also notes on fallbacks."""
    notes: list[str] = []
    columns = list(frame.columns)
    if spec.steps:
        frame = frame[frame.stage_step.isin(spec.steps)]
    if frame.empty:
        return frame, notes
    group = ["method", "subject", "seed", "protocol"]
    if spec.fixed_step is not None:
        return frame[frame.stage_step == spec.fixed_step], notes
    if spec.selection == "last":
        last = frame.groupby(group, dropna=False).stage_step.transform("max")
        return frame[frame.stage_step == last], notes
    if spec.select_by == "each":
        picked = []
        for _, part in frame.groupby(group + ["metric"], dropna=False):
            ascending = part.metric.iloc[0] in LOWER_IS_BETTER
            picked.append(part.sort_values(["value", "stage_step"], ascending=[ascending, True]).iloc[:1])
        return pd.concat(picked, ignore_index=True) if picked else frame.iloc[:0], notes
    picked = []
    for keys, part in frame.groupby(group, dropna=False):
        by = part[part.metric == spec.select_by]
        if by.empty:  # this protocol has no such metric: fall back to its first table metric
            fallback = next((c.metric for c in spec.columns if c.protocol == keys[3] and
                             (part.metric == c.metric).any()), None)
            note = f"protocol {keys[3]} has no {spec.select_by}: best checkpoint by {fallback}"
            if note not in notes:
                notes.append(note)
            if fallback is None:
                continue
            by = part[part.metric == fallback]
        ascending = by.metric.iloc[0] in LOWER_IS_BETTER
        best = by.sort_values(["value", "stage_step"], ascending=[ascending, True]).stage_step.iloc[0]
        picked.append(part[part.stage_step == best])
    return (pd.concat(picked, ignore_index=True) if picked else pd.DataFrame(columns=columns)), notes


@dataclass
class Report:
    """Everything a report shows; `markdown` is what it prints and writes."""

    spec: TableSpec
    group: str
    table: pd.DataFrame  # method x column: ours, paper, n ...
    subjects: pd.DataFrame  # method x subject x column: value, stage_step
    by_step: pd.DataFrame  # method x protocol x metric x stage_step: mean over subjects
    missing: pd.DataFrame  # method, subject, column, reason
    runs: list[RunInfo]
    extra: list[RunInfo]  # runs of the group outside the table's methods x subjects
    superseded: list[RunInfo]
    notes: list[str]
    sources: list[str]
    markdown: str = ""

    @property
    def complete(self) -> bool:
        return self.missing.empty


def build_report(spec: TableSpec, runs: Sequence[RunInfo], group: str, sources: Sequence[str] = ()) -> Report:
    """Select checkpoints, average over subjects, put the paper beside, list what is missing."""
    chosen, superseded = choose_runs(runs)
    in_table = {k: r for k, r in chosen.items() if r.method in spec.methods and r.subject in spec.subjects}
    extra = [r for k, r in chosen.items() if k not in in_table]
    frame = records_frame(in_table.values())
    selected, notes = select_checkpoints(frame, spec)

    # Per subject: mean over seeds of the selected values (one seed: just the value).
    subject_rows, missing_rows = [], []
    runs_of: dict[tuple[str, str], list[RunInfo]] = {}
    for run in in_table.values():
        runs_of.setdefault((run.method, run.subject), []).append(run)
    for method in spec.methods:
        for subject in spec.subjects:
            mine = runs_of.get((method, subject), [])
            for column in spec.columns:
                part = selected[(selected.method == method) & (selected.subject == subject)
                                & (selected.protocol == column.protocol) & (selected.metric == column.metric)]
                if part.empty:
                    missing_rows.append(dict(method=method, subject=subject, column=column.label,
                                             reason=_why_missing(mine, frame, column, spec)))
                    continue
                steps = sorted(set(int(s) for s in part.stage_step))
                subject_rows.append(dict(
                    method=method, subject=subject, column=column.label, protocol=column.protocol,
                    metric=column.metric, value=float(part.value.mean()), seeds=int(part.seed.nunique(dropna=False)),
                    stage_step=steps[0] if len(steps) == 1 else "/".join(map(str, steps)),
                ))
    subjects = pd.DataFrame(subject_rows, columns=["method", "subject", "column", "protocol", "metric", "value",
                                                   "seeds", "stage_step"])
    missing = pd.DataFrame(missing_rows, columns=["method", "subject", "column", "reason"])

    table_rows = []
    for method in spec.methods:
        for column in spec.columns:
            values = subjects[(subjects.method == method) & (subjects.column == column.label)].value
            paper = spec.paper_value(method, column)
            ours = float(values.mean()) if len(values) else None
            table_rows.append(dict(
                method=method, column=column.label, protocol=column.protocol, metric=column.metric, ours=ours,
                ours_std=float(values.std(ddof=0)) if len(values) else None, n=int(len(values)),
                expected=len(spec.subjects), paper=paper,
                delta=None if ours is None or paper is None else ours - paper, selection=spec.describe_selection(),
            ))
    table = pd.DataFrame(table_rows, columns=["method", "column", "protocol", "metric", "ours", "ours_std", "n",
                                              "expected", "paper", "delta", "selection"])
    by_step = steps_frame(frame, spec)
    report = Report(spec, group, table, subjects, by_step, missing, list(in_table.values()), extra, superseded,
                    notes, list(sources))
    report.markdown = render_markdown(report)
    return report


def steps_frame(frame: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Mean (over seeds, then subjects) of every metric at every stage step, per method and protocol."""
    columns = ["method", "protocol", "metric", "stage_step", "mean", "std", "n"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    if spec.steps:
        frame = frame[frame.stage_step.isin(spec.steps)]
    per_subject = frame.groupby(["method", "protocol", "metric", "stage_step", "subject"], dropna=False).value.mean()
    grouped = per_subject.groupby(level=[0, 1, 2, 3])
    out = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=0), "n": grouped.size()}).reset_index()
    return out[columns].sort_values(["method", "protocol", "metric", "stage_step"], ignore_index=True)


def _why_missing(runs: list[RunInfo], frame: pd.DataFrame, column: Column, spec: TableSpec) -> str:
    if not runs:
        return "no run"
    bad = [r for r in runs if r.status != "ok"]
    if bad and len(bad) == len(runs):
        return "; ".join(r.reason() for r in bad)
    part = frame[(frame.run_dir.isin([r.run_dir for r in runs])) & (frame.protocol == column.protocol)]
    if part.empty:
        return f"protocol {column.protocol} not evaluated"
    have = part[part.metric == column.metric]
    if have.empty:
        return f"metric {column.metric} not computed for protocol {column.protocol}"
    steps = sorted(set(int(s) for s in have.stage_step))
    wanted = [spec.fixed_step] if spec.fixed_step is not None else spec.steps
    return f"no evaluated checkpoint at stage step(s) {wanted}; evaluated: {steps}"


# ------------------------------------------------------------------------------------------ render


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _UNSET
    return f"{value:.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    spec = report.spec
    paper = spec.paper or {}
    out = [f"# {spec.name}"]
    if paper.get("source"):
        out.append(f"{paper['source']}")
    out.append("")
    out.append(f"W&B group / run group `{report.group}`; runs from {', '.join(report.sources) or 'nowhere'}.")
    models = sorted({r.base_model for r in report.runs if r.base_model})
    if models:
        out.append(f"Base model: {'; '.join(models)}.")
    out.append(f"Checkpoint: {spec.describe_selection()}. Each cell: **ours / paper**; ours is the mean over "
               f"{len(spec.subjects)} subject(s); `n/N` marks a mean over fewer subjects (see Missing).")
    out.append("")
    header = ["method"] + [c.label for c in spec.columns]
    rows = []
    for method in spec.methods:
        row = [method]
        for column in spec.columns:
            cell = report.table[(report.table.method == method) & (report.table.column == column.label)].iloc[0]
            ours = _fmt(cell.ours)
            if cell.n < cell.expected:
                ours += f" ({cell.n}/{cell.expected})"
            row.append(f"{ours} / {_fmt(cell.paper)}" if spec.paper else ours)
        rows.append(row)
    out.append(_md_table(header, rows))
    if paper.get("note"):
        out += ["", f"Note (paper): {paper['note']}"]
    for note in report.notes:
        out += ["", f"Note: {note}"]

    out += ["", "## Per subject", "", "Each cell: value @ stage step of the selected checkpoint.", ""]
    header = ["subject"] + [f"{m} {c.label}" for m in spec.methods for c in spec.columns]
    rows = []
    for subject in spec.subjects:
        row = [subject]
        for method in spec.methods:
            for column in spec.columns:
                part = report.subjects[(report.subjects.method == method) & (report.subjects.subject == subject)
                                       & (report.subjects.column == column.label)]
                row.append(_UNSET if part.empty else f"{_fmt(part.value.iloc[0])} @{part.stage_step.iloc[0]}")
        rows.append(row)
    out.append(_md_table(header, rows))

    if not report.by_step.empty:
        out += ["", "## By checkpoint step", "", "Mean over subjects at each stage step (the plot's data).", ""]
        steps = sorted(set(int(s) for s in report.by_step.stage_step))
        rows = []
        for (method, protocol, metric), part in report.by_step.groupby(["method", "protocol", "metric"], sort=True):
            values = dict(zip(part.stage_step.astype(int), part["mean"]))
            rows.append([method, protocol, metric] + [_fmt(values.get(s)) for s in steps])
        out.append(_md_table(["method", "protocol", "metric"] + [str(s) for s in steps], rows))

    out += ["", f"## Missing ({len(report.missing)} cell(s))", ""]
    if report.missing.empty:
        out.append("None: every method x subject x column has a value.")
    else:
        for (method, subject, reason), part in report.missing.groupby(["method", "subject", "reason"], sort=False):
            out.append(f"- {method} / {subject} ({', '.join(part.column)}): {reason}")
    if report.extra:
        out += ["", f"## Runs outside the table ({len(report.extra)})", ""]
        out += [f"- {r.label} [{r.status}] {r.run_dir}" for r in sorted(report.extra, key=lambda r: r.label)]
    if report.superseded:
        out += ["", f"## Superseded runs ({len(report.superseded)}): a newer run of the same method/subject/seed is used", ""]
        out += [f"- {r.label} [{r.status}] {r.run_dir}" for r in sorted(report.superseded, key=lambda r: r.label)]
    return "\n".join(out) + "\n"


def plot_steps(report: Report, path: Path) -> Path | None:
    """PNG: every metric against the checkpoint's stage step, one line per method (mean +- std over subjects)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    data = report.by_step
    if data.empty:
        return None
    panels = sorted(set(zip(data.protocol, data.metric)))
    protocols = sorted({p for p, _ in panels})
    metrics = sorted({m for _, m in panels})
    fig, axes = plt.subplots(len(protocols), len(metrics), figsize=(3.6 * len(metrics), 2.9 * len(protocols)),
                             squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(report.spec.methods + sorted(set(data.method) - set(report.spec.methods)))}
    for i, protocol in enumerate(protocols):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            part = data[(data.protocol == protocol) & (data.metric == metric)]
            if part.empty:
                ax.set_visible(False)
                continue
            order = {m: k for k, m in enumerate(colors)}
            for method, line in sorted(part.groupby("method", sort=False), key=lambda kv: order[kv[0]]):
                line = line.sort_values("stage_step")
                ax.plot(line.stage_step, line["mean"], marker="o", color=colors[method], label=method)
                if (line.n > 1).any():
                    std = line["std"].fillna(0)
                    ax.fill_between(line.stage_step, line["mean"] - std, line["mean"] + std, color=colors[method],
                                    alpha=0.15, linewidth=0)
                column = next((c for c in report.spec.columns if c.protocol == protocol and c.metric == metric), None)
                paper = report.spec.paper_value(method, column) if column else None
                if paper is not None:
                    ax.axhline(paper, color=colors[method], linestyle="--", linewidth=1, label=f"{method}: paper")
            if report.spec.fixed_step is not None:
                ax.axvline(report.spec.fixed_step, color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{protocol} / {metric}", fontsize=10)
            ax.set_xlabel("stage step")
            ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    axes[0][0].legend(list(legend.values()), list(legend), fontsize=7)
    fig.suptitle(f"{report.spec.name} ({report.group}): metrics vs checkpoint step, mean over subjects", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """report.md, table.csv, subjects.csv, steps.csv, missing.csv, runs.csv and metrics_vs_step.png."""
    from personalize.io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "table": out_dir / "table.csv", "subjects": out_dir / "subjects.csv",
             "steps": out_dir / "steps.csv", "missing": out_dir / "missing.csv", "runs": out_dir / "runs.csv"}
    atomic_write_text(paths["markdown"], report.markdown)
    for name in ("table", "subjects", "missing"):
        atomic_write_text(paths[name], getattr(report, name).to_csv(index=False))
    atomic_write_text(paths["steps"], report.by_step.to_csv(index=False))
    runs = pd.DataFrame([dict(method=r.method, subject=r.subject, seed=r.seed, status=r.status, error=r.error,
                              records=len(r.records), in_table=r in report.runs, superseded=r in report.superseded,
                              base_model=r.base_model,
                              run_dir=r.run_dir) for r in report.runs + report.extra + report.superseded])
    atomic_write_text(paths["runs"], runs.to_csv(index=False))
    plot = plot_steps(report, out_dir / "metrics_vs_step.png")
    if plot is not None:
        paths["plot"] = plot
    return paths


# ---------------------------------------------------------------------------------------------- entry


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


def make_report(cfg: DictConfig, runs: Sequence[RunInfo] | None = None) -> Report:
    """The report of `cfg` (a composed report config), from `runs` or from its sources."""
    sources: list[str] = []
    if runs is None:
        runs, sources = collect_runs(cfg)
    group = str(cfg.group)
    if not runs:
        where = ", ".join(sources) or "the given runs"
        experiment = group if cfg.get("table") is not None else "<name>"
        raise PersonalizeError(
            f"no runs of group '{group}' under {where}: run the sweep first "
            f"(personalize -m experiment={experiment}) or point report.runs_dirs at its outputs"
        )
    spec = spec_from_cfg(cfg)
    if spec is None:
        steps = cfg.report.get("steps")
        spec = spec_from_runs(group, runs, str(cfg.report.selection), str(cfg.report.select_by),
                              None if steps is None else [int(s) for s in steps])
    return build_report(spec, runs, group, sources)


def log_to_wandb(cfg: DictConfig, report: Report, paths: dict[str, Path]) -> None:
    """The plot and the table as a W&B run of the sweep's group (job_type=report), when a logger is on;
    the HTML page (`paths["html"]`) as report/page and as an artifact of type "report"."""
    if cfg.logger.backend == "none":
        return
    import wandb

    from personalize.tracking import finishing_wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    with finishing_wandb():
        run = wandb.init(project=str(cfg.logger.project), entity=cfg.logger.get("entity"), group=str(cfg.group),
                         job_type="report", name=f"report-{cfg.group}", dir=str(paths["markdown"].parent),
                         mode="offline" if cfg.logger.mode == "offline" else "online",
                         tags=["report", report.spec.name], config={"table": report.spec.name,
                                                                     "selection": report.spec.describe_selection()},
                         reinit=True)
        payload: dict[str, Any] = {"report/table": wandb.Table(dataframe=report.table.astype({"selection": str})),
                                   "report/subjects": wandb.Table(dataframe=report.subjects.astype(str))}
        if "plot" in paths:
            payload["report/metrics_vs_step"] = wandb.Image(str(paths["plot"]))
        if "html" in paths:
            # inject=False: W&B's default adds a stylesheet link from its servers; the page stays self-contained
            payload["report/page"] = wandb.Html(str(paths["html"]), inject=False)
            artifact = wandb.Artifact(_artifact_name(f"report-{cfg.group}"), type="report",
                                      description=f"{report.spec.name}: the report as one self-contained HTML page")
            artifact.add_file(str(paths["html"]))
            run.log_artifact(artifact)
        run.log(payload)
        run.summary["missing_cells"] = int(len(report.missing))


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.' only."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def report(cfg: DictConfig) -> Report:
    """The `personalize-report` task: collect, select, print, write, log."""
    page = PageSettings.from_cfg(cfg.report.get("html"))  # its numbers are checked before any run is read
    result = make_report(cfg)
    page = page.for_report(result)  # and its protocol before anything is written
    print(result.markdown)
    paths = write_report(result, Path(cfg.report.out_dir))
    html_page = write_page(result, paths.get("plot"), page)
    if html_page is not None:
        paths["html"] = html_page
    log_to_wandb(cfg, result, paths)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if not result.complete:
        log.warning("%d cell(s) missing: listed under 'Missing' in %s", len(result.missing), paths["markdown"])
    return result
