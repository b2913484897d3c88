"""The `personalize-report` task: collect the group's runs, build the report, print it, write its files
and the HTML page, and log it to W&B."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from personalize.errors import PersonalizeError
from personalize.report.page import PageSettings, write_page
from personalize.report.render import write_report
from personalize.report.runs import RunInfo, collect_runs
from personalize.report.spec import spec_from_cfg, spec_from_runs
from personalize.report.tables import Report, build_report
from personalize.tracking import finishing_wandb

log = logging.getLogger(__name__)


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
    import wandb  # seconds to import, and only a report that logs needs it

    os.environ.setdefault("WANDB_SILENT", "true")
    with finishing_wandb():
        run = wandb.init(project=str(cfg.logger.project), entity=cfg.logger.get("entity"), group=str(cfg.group),
                         job_type="report", name=f"report-{cfg.group}", dir=str(paths["markdown"].parent),
                         mode="offline" if cfg.logger.mode == "offline" else "online",
                         tags=["report", report.spec.name], config={"table": report.spec.name,
                                                                     "selection": report.spec.describe_selection(),
                                                                     "setup": report.spec.setup},
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

