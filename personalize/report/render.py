"""The report written out: the markdown it prints (paper's table, per subject, by step, what is
missing), the CSV tables, and the metrics-vs-step plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from personalize.io import atomic_write_text
from personalize.report.spec import REAL_IMAGES_ROW

if TYPE_CHECKING:  # tables.py builds a Report and renders it here
    from personalize.report.tables import Report

_UNSET = "—"



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
    if spec.setup:
        out.append(f"Setup: {spec.setup}")
    out.append("")
    out.append(f"W&B group / run group `{report.group}`; runs from {', '.join(report.sources) or 'nowhere'}.")
    models = sorted({r.base_model for r in report.runs if r.base_model})
    if models:
        out.append(f"Base model: {'; '.join(models)}.")
    # a table without a paper's values (dreambench_sdxl/flux: no paper prints them) shows ours alone: say so
    cells = "**ours / paper**; ours is" if spec.paper else "**ours** (no paper values for this table):"
    out.append(f"Checkpoint: {spec.describe_selection()}. Each cell: {cells} the mean over "
               f"{len(spec.subjects)} subject(s); `n/N` marks a mean over fewer subjects (see Missing).")
    out.append("")
    header = ["method"] + [c.label for c in spec.columns]
    rows = []
    for method in spec.methods:
        row = [spec.method_label(method)]
        for column in spec.columns:
            cell = report.table[(report.table.method == method) & (report.table.column == column.label)].iloc[0]
            ours = _fmt(cell.ours)
            if cell.n < cell.expected:
                ours += f" ({cell.n}/{cell.expected})"
            row.append(f"{ours} / {_fmt(cell.paper)}" if spec.paper else ours)
        rows.append(row)
    if not report.real_images.empty:  # the ceiling: the subject's photos against each other
        row = ["real images"]
        for column in spec.columns:
            part = report.real_images[report.real_images.column == column.label]
            if part.empty:  # a metric without a real-images value (CLIP-T, FID, ...)
                row.append(_UNSET)
                continue
            cell = part.iloc[0]
            ours = _fmt(cell.ours) + (f" ({cell.n}/{cell.expected})" if 0 < cell.n < cell.expected else "")
            row.append(f"{ours} / {_fmt(cell.paper)}" if spec.paper else ours)
        rows.append(row)
    out.append(_md_table(header, rows))
    if paper.get("note"):
        out += ["", f"Note (paper): {paper['note']}"]
    for note in report.notes:
        out += ["", f"Note: {note}"]

    out += ["", "## Per subject", "", "Each cell: value @ stage step of the selected checkpoint.", ""]
    real_columns = list(report.real_images.column)
    header = (["subject"] + [f"{m} {c.label}" for m in spec.methods for c in spec.columns]
              + [f"real images {label}" for label in real_columns])
    rows = []
    for subject in spec.subjects:
        row = [subject]
        for method in spec.methods:
            for column in spec.columns:
                part = report.subjects[(report.subjects.method == method) & (report.subjects.subject == subject)
                                       & (report.subjects.column == column.label)]
                row.append(_UNSET if part.empty else f"{_fmt(part.value.iloc[0])} @{part.stage_step.iloc[0]}")
        for label in real_columns:
            part = report.subjects[(report.subjects.method == REAL_IMAGES_ROW) & (report.subjects.subject == subject)
                                   & (report.subjects.column == label)]
            row.append(_UNSET if part.empty else _fmt(part.value.iloc[0]))
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
    import matplotlib  # a second to import: only when a plot is drawn

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
            ceiling = report.real_images[report.real_images.metric == metric].ours.dropna()
            if len(ceiling):  # the real-images row: the photos against each other
                ax.axhline(float(ceiling.iloc[0]), color="black", linestyle="-.", linewidth=1, label="real images")
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

