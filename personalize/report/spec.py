"""What a report compares: the columns of a paper's table (our protocol x metric beside the paper's
value), which methods and subjects, which checkpoint counts; from an experiment's `table:` or from the runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml
from omegaconf import DictConfig

from personalize.errors import PersonalizeError
from personalize.rundir import REAL_IMAGES_PROTOCOL, metric_names

if TYPE_CHECKING:  # runs.py reads runs; a spec only looks at their records
    from personalize.report.runs import RunInfo

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"fid"}
# The row of the subject's photos scored against each other (eval.real_images): its name in our table and CSV,
# and in paper_tables.yaml where a paper has one (Ruiz et al.'s "Real Images")
REAL_IMAGES_ROW = REAL_IMAGES_PROTOCOL



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
    # which setup the runs follow, said under the title (Jindal's table: the paper's text or the authors' code)
    setup: str | None = None
    # our method -> its row in the paper's table where the names differ (Ruiz: dreambooth -> dreambooth_sd)
    paper_rows: dict[str, str] = field(default_factory=dict)

    def paper_row(self, method: str) -> str:
        """The paper's row that `method` stands beside."""
        return self.paper_rows.get(method, method)

    def method_label(self, method: str) -> str:
        """How a method's row is named: "dreambooth (paper: finetune)" where the paper's row has another name."""
        row = self.paper_row(method)
        return method if row == method or not self.paper else f"{method} (paper: {row})"

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
        node: Any = (self.paper.get("rows") or {}).get(self.paper_row(method))
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
    methods = [str(m) for m in table.methods]
    paper_rows = {str(k): str(v) for k, v in (table.get("paper_rows") or {}).items()}
    strays = sorted(set(paper_rows) - set(methods))
    if strays:
        raise PersonalizeError(f"table.paper_rows names {strays}, which table.methods={methods} does not have: "
                               f"map methods of the table to the paper's rows, e.g. {{{methods[0]}: <row>}}")
    setup = table.get("setup")
    return TableSpec(
        name=str(table.name), methods=methods, subjects=[str(s) for s in table.subjects],
        columns=columns, steps=None if steps is None else [int(s) for s in steps],
        selection=selection, select_by=select_by, paper=paper,
        setup=None if setup in (None, "") else " ".join(str(setup).split()), paper_rows=paper_rows,
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

