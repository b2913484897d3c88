"""What an evaluation shows: its numbers and grids in W&B (at each checkpoint's step, and the
eval/summary table) and the fixed-width table it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from personalize.rundir import GRID_FILE, eval_dir, metrics_path


def metric_columns(records: Sequence[dict], metrics: Sequence[str] | None = None) -> list[str]:
    """The metrics to show, in the evaluation's order (`metrics`, else every known one), among those present."""
    # the known metrics' order lives beside the metrics (torchmetrics): only a caller without `metrics` pays for it
    from personalize.eval.metrics import METRIC_NAMES

    names = list(metrics) if metrics else [m for m in METRIC_NAMES if any(m in r for r in records)]
    return [m for m in names if any(m in r for r in records)]


def log_record(logger, record: dict, run_dir: Path, metrics: Sequence[str] | None = None) -> None:
    """eval/<protocol>/<metric> at the checkpoint's step (Lightning's WandbLogger puts it on the
    trainer/global_step axis), and the pair's grid as eval/<protocol>/grid. No-op without a logger."""
    if not logger:
        return
    step = int(record["step"])
    values = {f"eval/{record['protocol']}/{m}": record[m] for m in metric_columns([record], metrics)
              if record.get(m) is not None}
    if values:
        logger.log_metrics(values, step=step)
    grid = eval_dir(run_dir, record["checkpoint"], record["protocol"]) / GRID_FILE
    if grid.exists() and hasattr(logger, "log_image"):
        logger.log_image(key=f"eval/{record['protocol']}/grid", images=[str(grid)], step=step,
                         caption=[f"{record['checkpoint']} {record['protocol']}"])


def log_summary(logger, records: Sequence[dict], metrics: Sequence[str] | None = None) -> None:
    """The eval/summary table: one row per checkpoint x protocol, one column per metric."""
    if not logger or not records or not hasattr(logger, "log_table"):
        return
    columns = metric_columns(records, metrics)
    header = ["step", "stage", "stage_step", "protocol", *columns]
    rows = [[r["step"], r.get("stage"), r.get("stage_step"), r["protocol"], *(r.get(m) for m in columns)] for r in records]
    logger.log_table(key="eval/summary", columns=header, data=rows)


def format_table(records: Sequence[dict], metrics: Sequence[str] | None = None) -> str:
    """A fixed-width table: one row per checkpoint step x protocol, one column per metric."""
    columns = metric_columns(records, metrics)
    header = ["step", "stage", "protocol", *columns]
    rows = [[str(r["step"]), str(r.get("stage", "")), r["protocol"],
             *("-" if r.get(m) is None else f"{r[m]:.4f}" for m in columns)] for r in records]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    align = ["<" if i in (1, 2) else ">" for i in range(len(header))]
    lines = ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)) for row in [header, *rows]]
    return "\n".join(lines)


def print_table(records: Sequence[dict], run_dir: Path) -> None:
    if not records:
        return
    print(f"\nmetrics per checkpoint x protocol ({metrics_path(run_dir)}):")
    print(format_table(records))
