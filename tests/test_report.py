"""personalize-report: checkpoint selection, stage-step alignment, missing cells, outputs, sources.

Most tests build run dirs by hand (config.yaml + metrics.jsonl as training and evaluation write them),
so every rule is checked on numbers chosen for it; one runs the CLI on the smoke sweep's real output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from personalize.config import PROJECT_ROOT, compose
from personalize.errors import PersonalizeError
from personalize.report.command import make_report
from personalize.report.render import write_report
from personalize.report.runs import find_local_runs, find_wandb_runs
from personalize.report.spec import load_paper_tables, spec_from_cfg
from personalize.rundir import RECORD_KEYS, current_records, read_records
from tests import sweeps

PAPER = {"two_stage": {"dreambooth": {"clip_i": 0.800, "dino": 0.629}, "simple": {"clip_i": 0.859, "dino": 0.718}},
         "dreambooth": {"dreambooth": {"clip_i": 0.753, "dino": 0.540}, "simple": {"clip_i": 0.841, "dino": 0.690}}}


def value(method: str, subject: str, protocol: str, metric: str, stage_step: int) -> float:
    """A made-up score: peaks at 400 for two_stage and at 600 for dreambooth, differs per subject."""
    peak = 400 if method == "two_stage" else 600
    base = {"clip_i": 0.8, "dino": 0.6, "clip_t": 0.3}[metric] + (0.01 if protocol == "simple" else 0)
    return round(base + 0.001 * len(subject) - abs(stage_step - peak) / 10000, 6)


def make_run(root: Path, method: str, subject: str, *, seed: int = 0, group: str = "zeng2023_table1",
             steps=(200, 400, 600, 800), protocols=("dreambooth", "simple"), metrics=("clip_i", "dino", "clip_t"),
             name: str | None = None, failed: str | None = None, evaluated: bool = True) -> Path:
    """A run dir as `personalize` leaves it: resolved config.yaml, checkpoints, metrics.jsonl (or FAILED)."""
    run = root / (name or f"0_{method}-{subject}-s{seed}")
    stages = ({"token": {"train": ["token"], "steps": 100}, "unet": {"train": ["unet"], "steps": 800}}
              if method == "two_stage" else {"unet": {"train": ["unet"], "steps": 800}})
    start = 100 if method == "two_stage" else 0
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "task_name": "train", "group": group, "seed": seed, "method": {"name": method, "stages": stages},
        "subject": {"name": subject}}))
    if failed:
        (run / "FAILED").write_text(failed)
        return run
    for step in steps:
        (run / "checkpoints" / f"step-{start + step:06d}").mkdir(parents=True)
    if evaluated:
        lines = []
        for step in steps:
            for protocol in protocols:
                record = {"step": start + step, "stage": "unet", "stage_step": step, "method": method,
                          "subject": subject, "checkpoint": f"step-{start + step:06d}", "protocol": protocol,
                          "num_images": 4, "key": "k1", "spec": {"steps": 25}, "seconds": 1.5, "time": "t"}
                record.update({m: value(method, subject, protocol, m, step) for m in metrics})
                lines.append(json.dumps(record))
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def report_cfg(tmp_path: Path, *overrides: str, experiment: str = "zeng2023_table1"):
    return compose("report", [f"experiment={experiment}", "logger=none", f"report.runs_dirs=[{tmp_path / 'train'}]",
                              f"report.out_dir={tmp_path / 'report'}", *overrides], output_dir=tmp_path / "report")


@pytest.fixture
def zeng_runs(tmp_path):
    """Both methods x three subjects, in one sweep dir."""
    sweep = tmp_path / "train" / "multiruns" / "zeng2023_table1" / "2026-01-01_00-00-00"
    for method in ("two_stage", "dreambooth"):
        for subject in ("dog", "dog2", "cat"):
            make_run(sweep, method, subject, name=f"0_{method}-{subject}-s0")
    return tmp_path


def three_subject_cfg(tmp_path, *overrides):
    return report_cfg(tmp_path, "table.subjects=[dog,dog2,cat]", *overrides)


def cell(report, method: str, column: str) -> pd.Series:
    return report.table[(report.table.method == method) & (report.table.column == column)].iloc[0]


def test_best_checkpoint_per_subject_aligned_by_stage_step(zeng_runs):
    report = make_report(three_subject_cfg(zeng_runs))
    assert report.complete and len(report.runs) == 6
    # two_stage's global steps 300..900 are stage steps 200..800: its best is at 400 (global 500)
    picked = report.subjects.groupby("method").stage_step.unique()
    assert list(picked["two_stage"]) == [400] and list(picked["dreambooth"]) == [600]
    ours = cell(report, "two_stage", "diverse CLIP-I")
    expected = sum(value("two_stage", s, "dreambooth", "clip_i", 400) for s in ("dog", "dog2", "cat")) / 3
    assert math.isclose(ours.ours, expected) and ours.paper == 0.800 and ours.n == ours.expected == 3
    assert math.isclose(cell(report, "dreambooth", "simple DINO").paper, 0.690)


def test_fixed_step_and_last_selection(zeng_runs):
    fixed = make_report(three_subject_cfg(zeng_runs, "report.selection=200"))
    assert set(fixed.subjects.stage_step) == {200}
    assert math.isclose(cell(fixed, "dreambooth", "diverse DINO").ours,
                        sum(value("dreambooth", s, "dreambooth", "dino", 200) for s in ("dog", "dog2", "cat")) / 3)
    last = make_report(three_subject_cfg(zeng_runs, "report.selection=last"))
    assert set(last.subjects.stage_step) == {800}
    missing_step = make_report(three_subject_cfg(zeng_runs, "report.selection=300"))
    assert len(missing_step.missing) == 2 * 3 * 4
    assert "no evaluated checkpoint at stage step(s) [300]; evaluated: [200, 400, 600, 800]" in set(missing_step.missing.reason)
    with pytest.raises(PersonalizeError, match="report.selection"):
        make_report(three_subject_cfg(zeng_runs, "report.selection=newest"))


def test_lower_is_better_metrics_and_each_metric_its_own_best(tmp_path):
    root = tmp_path / "train" / "runs"
    for method in ("textual_inversion", "finetune", "lora"):
        run = make_run(root, method, "dog", group="jindal2023_table1", steps=(200, 400), protocols=("jindal",),
                       metrics=())
        lines = [{"step": s, "stage_step": s, "protocol": "jindal", "key": "k", "clip_score": 20.0 + s / 100,
                  "fid": 1.0 - s / 1000, "is": 1.5} for s in (200, 400)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = report_cfg(tmp_path, experiment="jindal2023_table1")
    report = make_report(cfg)  # the paper's own choice: each method's last checkpoint
    assert report.complete and set(report.subjects.stage_step) == {400}
    assert cell(report, "lora", "Inception score").paper == 1.592 and cell(report, "lora", "FID").ours == 0.6
    best_fid = make_report(report_cfg(tmp_path, "report.selection=best", "report.select_by=fid",
                                      experiment="jindal2023_table1"))
    assert set(best_fid.subjects.stage_step) == {400}  # fid 0.6 < 0.8: lower is better
    each = make_report(report_cfg(tmp_path, "report.selection=best", "report.select_by=each",
                                  experiment="jindal2023_table1"))
    assert cell(each, "finetune", "CLIP score").ours == 24.0 and cell(each, "finetune", "FID").ours == 0.6
    assert "note" in report.spec.paper and "FID values are far below" in report.markdown


def test_missing_failed_and_unevaluated_runs_are_listed_not_averaged_away(zeng_runs):
    sweep = next((zeng_runs / "train" / "multiruns" / "zeng2023_table1").iterdir())
    make_run(sweep, "two_stage", "dog3", name="1_two_stage-dog3-s0", failed="Traceback (most recent call last):\n"
             "  File x\nRuntimeError: CUDA out of memory\n")
    make_run(sweep, "dreambooth", "dog3", name="1_dreambooth-dog3-s0", evaluated=False)
    report = make_report(report_cfg(zeng_runs, "table.subjects=[dog,dog2,cat,dog3,dog5]"))
    assert not report.complete
    row = cell(report, "two_stage", "diverse CLIP-I")
    assert (row.n, row.expected) == (3, 5)
    assert "(3/5)" in report.markdown
    reasons = report.missing.groupby(["method", "subject"]).reason.first().to_dict()
    assert reasons[("two_stage", "dog3")] == "run failed (RuntimeError: CUDA out of memory)"
    assert reasons[("dreambooth", "dog3")].startswith("run not evaluated")
    assert reasons[("two_stage", "dog5")] == reasons[("dreambooth", "dog5")] == "no run"
    assert len(report.missing) == 2 * 2 * 4  # 2 methods x 2 subjects x 4 columns, each listed
    assert "## Missing (16 cell(s))" in report.markdown and "- two_stage / dog5" in report.markdown


def test_reruns_supersede_and_other_groups_and_subjects_stay_out(zeng_runs):
    sweep2 = zeng_runs / "train" / "multiruns" / "zeng2023_table1" / "2026-01-02_00-00-00"
    make_run(sweep2, "two_stage", "dog", name="0_two_stage-dog-s0", failed="killed")  # newer, but failed
    make_run(zeng_runs / "train" / "runs", "dreambooth", "cat", name="late_dreambooth-cat-s0")  # newer, fine
    make_run(sweep2, "two_stage", "sample_dog", name="1_two_stage-sample_dog-s0")
    make_run(zeng_runs / "train" / "runs", "two_stage", "dog", name="other", group="adhoc")
    runs = find_local_runs([zeng_runs / "train"], "zeng2023_table1")
    assert len(runs) == 9  # adhoc excluded
    report = make_report(three_subject_cfg(zeng_runs))
    assert report.complete
    chosen = {(r.method, r.subject): r.run_dir for r in report.runs}
    assert chosen[("dreambooth", "cat")].endswith("late_dreambooth-cat-s0")
    assert "2026-01-01" in chosen[("two_stage", "dog")]  # the failed rerun does not replace a result
    assert {Path(r.run_dir).name for r in report.superseded} == {"0_dreambooth-cat-s0", "0_two_stage-dog-s0"}
    assert [r.subject for r in report.extra] == ["sample_dog"] and "Runs outside the table" in report.markdown


def test_metrics_file_rules(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 2, "protocol": "simple", "key": "a", "clip_i": 0.1},
            {"step": 2, "protocol": "simple", "key": "a", "dino": 0.2},  # a metric added later extends
            {"step": 2, "protocol": "dreambooth", "key": "a", "clip_i": 0.3, "fid": None},
            {"step": 2, "protocol": "dreambooth", "key": "b", "clip_i": 0.4}]  # re-evaluated with other settings
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "proto')  # torn last line
    records = {r["protocol"]: r for r in current_records(read_records(path.parent))}
    assert records["simple"]["clip_i"] == 0.1 and records["simple"]["dino"] == 0.2
    assert records["dreambooth"]["clip_i"] == 0.4 and len(records) == 2
    from personalize.rundir import RECORD_FIELDS

    assert set(RECORD_FIELDS) <= RECORD_KEYS, "a record field would be read as a metric"


def test_outputs_markdown_csv_and_plot(zeng_runs):
    report = make_report(three_subject_cfg(zeng_runs))
    paths = write_report(report, zeng_runs / "out")
    assert {p.name for p in paths.values()} == {"report.md", "table.csv", "subjects.csv", "steps.csv", "missing.csv",
                                                "runs.csv", "metrics_vs_step.png"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(paths["table"])
    assert list(table.columns[:6]) == ["method", "column", "protocol", "metric", "ours", "ours_std"]
    assert set(table.paper) == {0.8, 0.629, 0.859, 0.718, 0.753, 0.54, 0.841, 0.69}
    steps = pd.read_csv(paths["steps"])
    assert set(steps.stage_step) == {200, 400, 600, 800} and set(steps.metric) == {"clip_i", "dino", "clip_t"}
    md = paths["markdown"].read_text()
    assert "| method | diverse CLIP-I | diverse DINO | simple CLIP-I | simple DINO |" in md
    assert "| dog2 |" in md and "@400" in md and "## By checkpoint step" in md


def test_a_group_without_a_table_gets_one_from_its_runs(tmp_path):
    make_run(tmp_path / "train" / "runs", "lora", "dog", group="adhoc", steps=(3, 6), protocols=("simple",))
    cfg = compose("report", ["logger=none", f"report.runs_dirs=[{tmp_path / 'train'}]"], output_dir=tmp_path)
    assert spec_from_cfg(cfg) is None
    report = make_report(cfg)
    assert report.spec.methods == ["lora"] and {c.label for c in report.spec.columns} == {
        "simple clip_i", "simple dino", "simple clip_t"}
    with pytest.raises(PersonalizeError, match="no runs of group 'nothing'"):
        make_report(compose("report", ["logger=none", "group=nothing", f"report.runs_dirs=[{tmp_path}]"],
                            output_dir=tmp_path))


def test_wandb_source_reads_eval_history_as_stage_steps():
    class FakeRun:
        def __init__(self, id, method, history, job_type="train", state="finished"):
            self.id, self.job_type, self.state, self.updated_at = id, job_type, state, "2026-01-01T00:00:00"
            stages = {"token": {"steps": 100}, "unet": {"steps": 800}} if method == "two_stage" else {"unet": {"steps": 800}}
            self.config = {"method": {"name": method, "stages": stages}, "subject": {"name": "dog"}, "seed": 0}
            self._history = history

        def scan_history(self):
            return iter(self._history)

    class FakeApi:
        def runs(self, path, filters):
            assert path == "me/personalize" and filters == {"group": "zeng2023_table1"}
            return [
                FakeRun("a", "two_stage", [{"train/loss": 0.1, "trainer/global_step": 50},
                                           {"eval/simple/clip_i": 0.8, "eval/simple/dino": 0.6, "trainer/global_step": 300},
                                           {"eval/dreambooth/clip_i": 0.7, "trainer/global_step": 300, "_step": 9}]),
                FakeRun("b", "dreambooth", [], state="crashed"),
                FakeRun("c", "two_stage", [], job_type="report"),
            ]

    runs = find_wandb_runs("personalize", "zeng2023_table1", entity="me", api=FakeApi())
    assert [r.run_dir for r in runs] == ["wandb://me/personalize/a", "wandb://me/personalize/b"]
    first = {rec["protocol"]: rec for rec in runs[0].records}
    assert first["simple"] == {"step": 300, "stage_step": 200, "method": "two_stage", "subject": "dog",
                               "protocol": "simple", "clip_i": 0.8, "dino": 0.6}
    assert runs[1].status == "failed" and runs[1].records == []


def test_paper_values_are_the_shared_protocols_table():
    ours = load_paper_tables(PROJECT_ROOT / "experiments" / "paper_tables.yaml")
    assert ours["zeng2023_table1"]["rows"]["two_stage"]["diverse"] == PAPER["two_stage"]["dreambooth"]
    assert ours["jindal2023_table1"]["rows"]["finetune"] == {"clip_score": 30.1439, "fid": 0.030, "inception_score": 1.777}
    shared = PROJECT_ROOT.parent / "shared" / "protocols" / "paper_tables.yaml"
    if shared.exists():  # the numbers are copied verbatim (only the rows' lines matter)
        rows = [line for line in shared.read_text().splitlines() if line.strip().startswith(
            ("two_stage:", "dreambooth:", "textual_inversion:", "finetune:", "lora:"))]
        assert len(rows) == 5 and all(line in ours_text() for line in rows)


def ours_text() -> str:
    return (PROJECT_ROOT / "experiments" / "paper_tables.yaml").read_text()


def test_report_cli_on_the_smoke_sweep_has_every_cell_with_the_paper_beside(tmp_path_factory):
    sweep = sweeps.smoke_sweep(tmp_path_factory)
    result = sweeps.run("personalize-report", f"experiment={sweeps.SMOKE}", outputs=sweep.outputs)
    assert result.returncode == 0, result.log[-4000:]
    out = result.log
    assert "| method | diverse CLIP-I | diverse DINO | simple CLIP-I | simple DINO |" in out
    for method, paper in (("two_stage", ("0.800", "0.629", "0.859", "0.718")),
                          ("dreambooth", ("0.753", "0.540", "0.841", "0.690"))):
        row = next(line for line in out.splitlines() if line.startswith(f"| {method} |"))
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 4
        for text, expected in zip(cells, paper):
            ours, theirs = text.split(" / ")
            assert theirs == expected and 0 < float(ours) <= 1, row  # every cell has our number and the paper's
    assert "## Missing (0 cell(s))" in out
    folder = sweep.outputs / "report" / sweeps.SMOKE
    table = pd.read_csv(folder / "table.csv")
    assert table.ours.notna().all() and table.paper.notna().all() and (table.n == 2).all()
    assert (folder / "metrics_vs_step.png").stat().st_size > 10_000
    # the plot went to W&B too (offline here): a report run of the sweep's group, with the image
    assert list(folder.glob("wandb/offline-run-*/files/media/images/report/metrics_vs_step*.png"))


# --------------------------------------------------------------------- real images, setup, paper rows


def add_real_images(run: Path, **values: float) -> None:
    """The record eval.real_images appends (personalize/eval/real_images.py): step 0, protocol real_images."""
    record = {"step": 0, "stage": None, "stage_step": None, "protocol": "real_images", "references": "subject",
              "num_images": 5, "key": "r1", "spec": {"protocol": "real_images"}, **values}
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


@pytest.fixture
def ruiz_runs(tmp_path):
    """dreambooth and textual_inversion on three subjects; dog2's runs have no real-images record, and cat's
    two runs carry slightly different ones (the row averages a subject's runs before the subjects)."""
    sweep = tmp_path / "train" / "multiruns" / "ruiz2023_table1" / "2026-01-01_00-00-00"
    real = {("dreambooth", "dog"): (0.70, 0.86), ("textual_inversion", "dog"): (0.70, 0.86),
            ("dreambooth", "cat"): (0.80, 0.90), ("textual_inversion", "cat"): (0.82, 0.92)}
    for method in ("dreambooth", "textual_inversion"):
        for subject in ("dog", "cat", "dog2"):
            run = make_run(sweep, method, subject, group="ruiz2023_table1", protocols=("dreambooth",),
                           name=f"0_{method}-{subject}-s0")
            if (method, subject) in real:
                dino, clip_i = real[(method, subject)]
                add_real_images(run, dino=dino, clip_i=clip_i)
    return tmp_path


def ruiz_cfg(tmp_path, *overrides):
    return report_cfg(tmp_path, "table.subjects=[dog,cat,dog2]", *overrides, experiment="ruiz2023_table1")


def test_real_images_row_is_the_mean_per_subject_then_over_subjects_beside_the_paper(ruiz_runs):
    report = make_report(ruiz_cfg(ruiz_runs))
    # the record is no checkpoint's: no step is selected for it, and the methods' cells are unchanged
    assert all(run.real_images is None or run.real_images["step"] == 0 for run in report.runs)
    assert "real_images" not in set(report.by_step.protocol) and report.complete
    expected = {"dino": (0.70 + (0.80 + 0.82) / 2) / 2, "clip_i": (0.86 + (0.90 + 0.92) / 2) / 2}
    row = report.real_images.set_index("metric")
    assert list(row.column) == ["DINO", "CLIP-I"]  # the table's columns with a real-images value, in its order
    for metric, value in expected.items():
        assert math.isclose(row.ours[metric], value) and row.n[metric] == 2 and row.expected[metric] == 3
    assert (row.paper["dino"], row.paper["clip_i"]) == (0.774, 0.885)
    dino, clip_i, clip_t = [c.strip() for c in next(line for line in report.markdown.splitlines()
                                                    if line.startswith("| real images |")).strip("|").split("|")[1:]]
    assert (dino, clip_i, clip_t) == (f"{expected['dino']:.3f} (2/3) / 0.774", f"{expected['clip_i']:.3f} (2/3) / 0.885", "—")
    assert "| subject |" in report.markdown and "real images DINO | real images CLIP-I |" in report.markdown
    # the paper's rows by their own names, ours beside them; its Imagen row as reference
    assert report.markdown.count("| dreambooth (paper: dreambooth_sd) |") == 1
    assert cell(report, "textual_inversion", "CLIP-T").paper == 0.255
    assert "the paper's row dreambooth_imagen has no method here (reference only): DINO 0.696, CLIP-I 0.812, " \
           "CLIP-T 0.306" in report.markdown

    paths = write_report(report, ruiz_runs / "out")
    table = pd.read_csv(paths["table"])
    real = table[table.method == "real_images"].set_index("metric")
    assert math.isclose(real.ours["dino"], expected["dino"]) and real.paper["clip_i"] == 0.885
    subjects = pd.read_csv(paths["subjects"])
    cat = subjects[(subjects.method == "real_images") & (subjects.subject == "cat")].set_index("metric")
    assert math.isclose(cat.value["dino"], 0.81) and cat.seeds["dino"] == 2  # the subject's two runs, averaged
    assert set(subjects[subjects.method == "real_images"].subject) == {"dog", "cat"}


def test_real_images_row_without_records(zeng_runs, ruiz_runs):
    # a table with CLIP-I/DINO columns whose runs have no record and whose paper has no such row: a note says how
    zeng = make_report(three_subject_cfg(zeng_runs))
    assert zeng.real_images.empty and "| real images |" not in zeng.markdown
    assert "not evaluated in these runs: set eval.real_images=true" in zeng.markdown
    assert "real_images" not in set(zeng.table.method)
    # the paper has the row: it shows, ours missing
    for run in (ruiz_runs / "train").rglob("metrics.jsonl"):
        run.write_text("".join(line + "\n" for line in run.read_text().splitlines() if '"real_images"' not in line))
    ruiz = make_report(ruiz_cfg(ruiz_runs))
    row = next(line for line in ruiz.markdown.splitlines() if line.startswith("| real images |"))
    assert row == "| real images | — / 0.774 | — / 0.885 | — |"
    # a table without CLIP-I or DINO (Jindal's): neither row nor note
    jindal = tmp_jindal(zeng_runs)
    assert jindal.real_images.empty and "real images" not in jindal.markdown


def tmp_jindal(root: Path):
    for method in ("textual_inversion", "finetune", "lora"):
        run = make_run(root / "train" / "runs", method, "dog", group="jindal2023_table1", steps=(800,),
                       protocols=("jindal",), metrics=())
        (run / "metrics.jsonl").write_text(json.dumps({"step": 800, "stage_step": 800, "protocol": "jindal",
                                                       "key": "k", "clip_score": 30.0, "fid": 100.0, "is": 1.6}) + "\n")
    return make_report(report_cfg(root, experiment="jindal2023_table1"))


def test_the_report_says_which_setup_its_table_comes_from(tmp_path):
    text = tmp_jindal(tmp_path)
    assert "Setup: the paper's text: batch 2, regular fine-tuning without prior loss" in text.markdown
    for method in ("textual_inversion", "dreambooth", "lora"):  # the authors' code: their finetune was DreamBooth
        run = make_run(tmp_path / "train" / "code", method, "dog", group="jindal2023_table1_code", steps=(801,),
                       protocols=("jindal",), metrics=())
        (run / "metrics.jsonl").write_text(json.dumps({"step": 801, "stage_step": 801, "protocol": "jindal",
                                                       "key": "k", "clip_score": 29.0, "fid": 90.0, "is": 1.7}) + "\n")
    code = make_report(report_cfg(tmp_path, experiment="jindal2023_table1_code"))
    setup = compose("train", ["experiment=jindal2023_table1_code"], output_dir="/unused").table.setup
    assert setup.startswith("the authors' released code") and f"Setup: {setup}" in code.markdown
    assert "| dreambooth (paper: finetune) | 29.000 / 30.144 | 90.000 / 0.030 | 1.700 / 1.777 |" in code.markdown
    assert cell(code, "dreambooth", "CLIP score").paper == 30.1439 and code.complete
    assert set(code.table.setup) == {setup}  # table.csv and the W&B table carry it in every row
    assert "has no method here" not in code.markdown  # every paper row has ours beside it
    with pytest.raises(PersonalizeError, match=r"table.paper_rows names \['finetune'\], which table.methods="):
        make_report(report_cfg(tmp_path, "+table.paper_rows.finetune=x", experiment="jindal2023_table1_code"))


def test_the_page_shows_the_setup_and_the_real_images_row(ruiz_runs):
    from personalize.report.page import PageSettings, render_page

    report = make_report(ruiz_cfg(ruiz_runs))
    page = render_page(report, None, PageSettings(path=None, protocol="dreambooth"))
    setup = report.spec.setup.replace("'", "&#x27;")
    assert f'<p class="meta" id="setup">Setup: {setup}</p>' in page
    row = page[page.index('<tr data-method="real_images">'):]
    row = row[:row.index("</tr>")]
    value = report.real_images.set_index("metric").ours["dino"]
    assert f'>{value:.3f} <span class="n">(2/3)</span></td><td class="paper">0.774</td>' in row
    assert row.endswith('<td class="ours">&#8212;</td><td class="paper">&#8212;</td>')  # CLIP-T has none
    assert '<th class="row">dreambooth (paper: dreambooth_sd)</th>' in page
    assert "<th>real images<br>DINO</th>" in page


def test_wandb_source_keeps_the_real_images_record_apart():
    class FakeRun:
        id, job_type, state, updated_at = "a", "train", "finished", "2026-01-01T00:00:00"
        config = {"method": {"name": "dreambooth", "stages": {"unet": {"steps": 800}}}, "subject": {"name": "dog"}}

        def scan_history(self):
            return iter([{"eval/real_images/dino": 0.7, "eval/real_images/clip_i": 0.85, "trainer/global_step": 0},
                         {"eval/dreambooth/dino": 0.6, "trainer/global_step": 800}])

    class FakeApi:
        def runs(self, path, filters):
            return [FakeRun()]

    (run,) = find_wandb_runs("personalize", "ruiz2023_table1", api=FakeApi())
    assert [(r["step"], r["protocol"]) for r in run.records] == [(800, "dreambooth")]
    assert (run.real_images["dino"], run.real_images["clip_i"]) == (0.7, 0.85)


def test_paper_tables_copy_equals_the_shared_file():
    shared = PROJECT_ROOT.parent / "shared" / "protocols" / "paper_tables.yaml"
    if not shared.exists():
        pytest.skip(f"{shared} is not on this machine: only the shipped copy is")
    ours = load_paper_tables(PROJECT_ROOT / "experiments" / "paper_tables.yaml")
    assert ours == yaml.safe_load(shared.read_text())
    assert ours["ruiz2023_table1"]["rows"]["real_images"] == {"diverse": {"dino": 0.774, "clip_i": 0.885}}
    assert "Subject2Subject" in ours["jindal2023_table1"]["authors_code"]
