"""The report's numbers: every metric value of the runs as one long table, the checkpoint selected per
subject, means over subjects beside the paper's, the values by checkpoint step, and why a cell is missing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pandas as pd

from personalize.report.render import render_markdown
from personalize.report.runs import RunInfo, choose_runs
from personalize.report.spec import LOWER_IS_BETTER, REAL_IMAGES_ROW, Column, TableSpec
from personalize.rundir import REAL_IMAGES_METRICS, metric_names


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



REAL_IMAGES_COLUMNS = ["column", "protocol", "metric", "ours", "ours_std", "n", "expected", "paper"]


def real_images_row(spec: TableSpec, runs: Iterable[RunInfo]) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """The "real images" row, one entry per column whose metric has a real-images value (CLIP-I, DINO): per
    subject the real-images record's value (the mean over that subject's runs, which share its photos), then
    the mean over subjects, beside the paper's real-images row. Also its per-subject rows (the `subjects`
    frame's columns) and the notes that say what it is, or how to get it where no run has it.

    Empty where the table has no such column, or where no run has the record and the paper has no such row."""
    columns = [c for c in spec.columns if c.metric in REAL_IMAGES_METRICS]
    empty = pd.DataFrame(columns=REAL_IMAGES_COLUMNS)
    if not columns:
        return empty, [], []
    values: dict[tuple[str, str], list[float]] = {}  # (subject, metric) -> its runs' values
    for run in runs:
        if run.real_images and run.subject in spec.subjects:
            for metric in REAL_IMAGES_METRICS:
                if run.real_images.get(metric) is not None:
                    values.setdefault((run.subject, metric), []).append(float(run.real_images[metric]))
    per_subject = {key: sum(v) / len(v) for key, v in values.items()}
    if not per_subject and not any(spec.paper_value(REAL_IMAGES_ROW, c) is not None for c in columns):
        return empty, [], [
            "real images (the subject's photos scored against each other, the ceiling of CLIP-I and DINO) were not "
            "evaluated in these runs: set eval.real_images=true, or add them to a finished run in seconds with "
            "`personalize-eval run_dir=<run> eval.real_images=true`"]
    rows, subject_rows = [], []
    for column in columns:
        mine = pd.Series([per_subject[(s, column.metric)] for s in spec.subjects if (s, column.metric) in per_subject],
                         dtype=float)
        rows.append(dict(column=column.label, protocol=column.protocol, metric=column.metric,
                         ours=float(mine.mean()) if len(mine) else None,
                         ours_std=float(mine.std(ddof=0)) if len(mine) else None, n=int(len(mine)),
                         expected=len(spec.subjects), paper=spec.paper_value(REAL_IMAGES_ROW, column)))
        subject_rows += [dict(method=REAL_IMAGES_ROW, subject=s, column=column.label, protocol=column.protocol,
                              metric=column.metric, value=per_subject[(s, column.metric)],
                              # seeds: the runs averaged; no checkpoint's ("", so the column stays whole numbers)
                              seeds=len(values[(s, column.metric)]), stage_step="")
                         for s in spec.subjects if (s, column.metric) in per_subject]
    note = ("real images: the subject's own photos scored against each other (CLIP-I and DINO over every pair of "
            "distinct photos, with the evaluation's models and preprocessing; the mean per subject, then over "
            "subjects), the ceiling the methods' images are measured against; the same value in every protocol's column")
    return pd.DataFrame(rows, columns=REAL_IMAGES_COLUMNS), subject_rows, [note]


def paper_only_rows(spec: TableSpec) -> list[str]:
    """Notes naming the paper's rows that no method of the table stands beside (Ruiz: DreamBooth on Imagen)."""
    rows = (spec.paper or {}).get("rows") or {}
    ours = {spec.paper_row(m) for m in spec.methods} | {REAL_IMAGES_ROW}
    notes = []
    for row in rows:
        if row in ours:
            continue
        values = [f"{c.label} {spec.paper_value(row, c):g}" for c in spec.columns if spec.paper_value(row, c) is not None]
        notes.append(f"the paper's row {row} has no method here (reference only): {', '.join(values) or 'no value in these columns'}")
    return notes


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
    # the "real images" row (the subject's photos against each other; `real_images_row`): one entry per column
    # that has one, empty where it is not shown; its per-subject values are in `subjects` (method real_images)
    real_images: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=REAL_IMAGES_COLUMNS))
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
    real_images, real_subject_rows, real_notes = real_images_row(spec, in_table.values())
    subject_rows += real_subject_rows
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
    for row in real_images.to_dict("records"):  # the CSV and W&B table carry the row too, under its name
        table_rows.append(dict(row, method=REAL_IMAGES_ROW, delta=None if row["ours"] is None or row["paper"] is None
                               else row["ours"] - row["paper"], selection="every photo pair of the subject"))
    table = pd.DataFrame(table_rows, columns=["method", "column", "protocol", "metric", "ours", "ours_std", "n",
                                              "expected", "paper", "delta", "selection"])
    table["setup"] = spec.setup  # which setup the runs follow (the paper's text, the authors' code), in every row
    notes = notes + real_notes + paper_only_rows(spec)
    by_step = steps_frame(frame, spec)
    report = Report(spec, group, table, subjects, by_step, missing, list(in_table.values()), extra, superseded,
                    notes, list(sources), real_images)
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

