"""The run dir as one contract (personalize.rundir): its layout, checkpoint.json as a typed record that
reads every file written so far, the one reader of config.yaml, and the one merge rule of metrics.jsonl
that the evaluation's "is this done" and the report share."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from personalize import rundir
from personalize.config import PROJECT_ROOT
from personalize.errors import PersonalizeError
from personalize.io import atomic_write_json

# checkpoint.json as train.py + Personalizer.save_artifacts wrote it before the typed record (commit 172c270).
WRITTEN_BEFORE = {
    "method": "two_stage", "subject": "dog", "class_noun": "dog", "kind": "live", "phrase": "<rare> dog", "seed": 0,
    "model": {"name": "tiny", "pretrained": "/cache/tiny-sd", "resolution": 32},
    "step": 300, "stage": "unet", "stage_step": 200, "identifier": "<rare>", "prompt": "a photo of <rare> dog",
    "contents": ["learned_embeds.safetensors", "unet"],
}


# ---------------------------------------------------------------------------------------------- layout
def test_layout_names_every_path_of_a_run(tmp_path):
    run = tmp_path / "run"
    assert rundir.checkpoint_dir(run, 300) == run / "checkpoints" / "step-000300"
    assert rundir.resume_state_dir(run, 7) == run / "resume" / "step-000007"
    assert rundir.eval_dir(run, run / "checkpoints" / "step-000300", "simple") == run / "eval" / "step-000300" / "simple"
    assert rundir.base_images_dir(run) == run / "eval" / "base"
    assert rundir.metrics_path(run) == run / "metrics.jsonl" and rundir.samples_dir(run) == run / "samples"
    assert rundir.config_path(run) == run / "config.yaml"
    assert (rundir.INTERRUPTED_FILE, rundir.FAILED_FILE, rundir.INFO_FILE) == ("INTERRUPTED", "FAILED", "checkpoint.json")
    assert rundir.step_of("step-000300") == 300 and rundir.step_of("step-3x") is None and rundir.step_of("base") is None
    name = rundir.image_name(3, 12)
    assert name == "p03_i12.png" and rundir.parse_image_name(name) == (3, 12) and rundir.parse_image_name("grid.png") is None


def test_checkpoints_are_complete_folders_by_step(tmp_path):
    run = tmp_path / "run"
    for step in (1000, 20, 300):
        rundir.write_info(rundir.checkpoint_dir(run, step), rundir.CheckpointInfo.from_json({**WRITTEN_BEFORE, "step": step}))
    rundir.checkpoint_dir(run, 400).mkdir()  # being written: no checkpoint.json yet
    (run / "checkpoints" / ".step-000500.123.tmp").mkdir()
    assert [rundir.step_of(c) for c in rundir.list_checkpoints(run)] == [20, 300, 1000]
    assert rundir.resolve_checkpoint(run) == rundir.checkpoint_dir(run, 1000)
    assert rundir.resolve_checkpoint(run, "300") == rundir.checkpoint_dir(run, 300)
    assert rundir.resolve_checkpoint(rundir.checkpoint_dir(run, 20)) == rundir.checkpoint_dir(run, 20)
    with pytest.raises(PersonalizeError, match="no checkpoint at step 400: available steps are 20, 300, 1000"):
        rundir.resolve_checkpoint(run, 400)
    with pytest.raises(PersonalizeError, match="no checkpoints under"):
        rundir.resolve_checkpoint(tmp_path / "empty")


# ------------------------------------------------------------------------------------- checkpoint.json
def test_checkpoint_info_reads_and_writes_the_keys_of_today(tmp_path):
    info = rundir.CheckpointInfo.from_json(WRITTEN_BEFORE)
    assert (info.step, info.stage, info.stage_step, info.identifier, info.phrase) == (300, "unet", 200, "<rare>", "<rare> dog")
    assert info.model["pretrained"] == "/cache/tiny-sd" and info.contents == ["learned_embeds.safetensors", "unet"] and info.name == "step-000300"
    assert info.to_json() == WRITTEN_BEFORE  # the same keys and values: stock readers see no change
    folder = tmp_path / "step-000300"
    rundir.write_info(folder, info)
    assert json.loads((folder / "checkpoint.json").read_text()) == WRITTEN_BEFORE
    assert rundir.read_info(folder) == info


def test_checkpoint_info_of_an_older_writer_gets_defaults_and_keeps_unknown_keys():
    old = {k: v for k, v in WRITTEN_BEFORE.items() if k not in ("kind", "phrase", "contents", "stage_step", "seed")}
    old["optimizer"] = {"name": "adamw"}  # a key a later version writes: kept, not dropped
    info = rundir.CheckpointInfo.from_json(old)
    assert (info.kind, info.contents, info.stage_step, info.seed, info.overrides) == ("object", [], None, 0, {})
    assert info.phrase == "<rare> dog"  # the default subject phrase: identifier + class noun
    assert info.extra == {"optimizer": {"name": "adamw"}}
    written = info.to_json()
    assert written["optimizer"] == {"name": "adamw"}
    assert {k: written[k] for k in old} == old  # nothing it had changes on the way through


def test_a_field_added_later_is_written_only_where_set():
    assert "overrides" not in rundir.CheckpointInfo.from_json(WRITTEN_BEFORE).to_json()
    changed = {**WRITTEN_BEFORE, "overrides": {"method.loss.snr_gamma": 5.0}}
    info = rundir.CheckpointInfo.from_json(changed)
    assert info.overrides == {"method.loss.snr_gamma": 5.0} and info.to_json() == changed


def test_checkpoint_info_coerces_types():
    info = rundir.CheckpointInfo.from_json({**WRITTEN_BEFORE, "step": "300", "stage_step": 200.0, "seed": "3"})
    assert (info.step, info.stage_step, info.seed) == (300, 200, 3)
    assert all(isinstance(v, int) for v in (info.step, info.stage_step, info.seed))


@pytest.mark.parametrize("change, message", [
    ({"identifier": None}, "has no identifier"),
    ({"model": None, "step": None}, "has no step, model"),
    ({"step": "three hundred"}, "a value of the wrong type"),
])
def test_checkpoint_info_that_is_not_one_is_one_line(tmp_path, change, message):
    folder = tmp_path / "step-000300"
    atomic_write_json(folder / "checkpoint.json", {k: v for k, v in {**WRITTEN_BEFORE, **change}.items() if v is not None})
    with pytest.raises(PersonalizeError, match=message) as error:
        rundir.read_info(folder)
    assert str(folder / "checkpoint.json") in str(error.value) and "\n" not in str(error.value)


def test_checkpoint_info_unreadable_or_absent(tmp_path):
    (tmp_path / "checkpoint.json").write_text('{"step": 3, ')
    with pytest.raises(PersonalizeError, match="is not valid JSON"):
        rundir.read_info(tmp_path)
    with pytest.raises(PersonalizeError, match="is not a checkpoint folder"):
        rundir.read_info(tmp_path / "nothing")


def test_saved_checkpoint_is_the_record(make_cfg):
    """A real (one-step, tiny) run's checkpoint.json: every key the writer puts there is a field of the
    record, and reading and writing it again gives back the same file."""
    from personalize.train import fit, prepare_run

    cfg = make_cfg("method=textual_inversion", "subject=sample_dog", "method.stages.token.steps=1",
                   "method.stages.token.checkpoint_every=1", "eval=none")
    run = fit(prepare_run(cfg), sample=False, evaluate=False)
    [ckpt] = rundir.list_checkpoints(run.run_dir)
    on_disk = json.loads((ckpt / rundir.INFO_FILE).read_text())
    info = rundir.read_info(ckpt)
    assert info.extra == {}, "the writer puts a key there that the record does not know"
    assert info.to_json() == on_disk
    assert (info.step, info.stage, info.stage_step, info.method, info.subject) == (1, "token", 1, "textual_inversion", "sample_dog")
    assert info.identifier == run.module.identifier and info.contents == [rundir.EMBEDS_FILE]


# ----------------------------------------------------------------------------------------- config.yaml
def test_one_reader_of_config_yaml(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task_name": "train", "seed": "${oc.env:NOPE}"}))
    with pytest.raises(PersonalizeError, match="has no config.yaml: pass a run dir"):
        rundir.load_run_config(run)
    early = rundir.load_run_config(run, early=True)  # a run that failed a check has Hydra's copy only
    assert early.task_name == "train" and OmegaConf.to_container(early)["seed"] == "${oc.env:NOPE}"  # unresolved
    (run / "config.yaml").write_text(yaml.safe_dump({"task_name": "train", "method": {"lr": 1e-4}}))
    assert rundir.load_run_config(run, early=True).method.lr == 1e-4  # its own config wins
    (run / "config.yaml").write_text("method: [unclosed\n")
    with pytest.raises(PersonalizeError, match="is not a readable config"):
        rundir.load_run_config(run)
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(PersonalizeError, match="not a config mapping"):
        rundir.load_run_config(run)


# --------------------------------------------------------------------------------------- metrics.jsonl
def _write(run, rows, torn=False):
    run.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 9, "proto' if torn else "")
    rundir.metrics_path(run).write_text(text)


def test_the_old_readers_disagreed_and_the_store_answers_both(tmp_path):
    """Before the store, evaluate.latest_records kept the last record per (step, protocol, key), and
    report.read_metrics merged them: on this file they disagreed about (300, simple, a). The store merges,
    so the evaluation sees the pair done with both metrics, and the report shows the same record."""
    first = {"step": 300, "protocol": "simple", "key": "a", "checkpoint": "step-000300", "clip_i": 0.5, "fid": 80.0}
    added = {"step": 300, "protocol": "simple", "key": "a", "checkpoint": "step-000300", "dino": 0.4, "fid": None}
    other = {"step": 300, "protocol": "dreambooth", "key": "a", "clip_i": 0.6}
    rows = [first, other, added]
    run = tmp_path / "run"
    _write(run, rows, torn=True)
    records = rundir.read_records(run)
    assert records == rows  # the torn last line is skipped

    # the old evaluation rule: the last record alone, which lacks clip_i, so the pair would be redone
    last_only = {(r["step"], r["protocol"], r["key"]): r for r in records}[(300, "simple", "a")]
    assert "clip_i" not in last_only
    # the rule both now share: later records extend earlier ones; a None does not erase fid
    merged = {**first, "dino": 0.4}
    done = rundir.is_done(records, 300, "simple", "a", ["clip_i", "dino", "fid"])
    assert done == merged
    assert rundir.is_done(records, 300, "simple", "a", ["clip_i", "is"]) is None  # IS never computed
    assert rundir.is_done(records, 300, "simple", "b", ["clip_i"]) is None  # other settings: not done
    assert rundir.current_records(records) == [other, merged]  # the report's view: by step, then protocol


def test_the_settings_key_written_last_is_current(tmp_path):
    rows = [{"step": 2, "protocol": "simple", "key": "a", "clip_i": 0.1},
            {"step": 2, "protocol": "simple", "key": "b", "clip_i": 0.2},  # re-evaluated with other settings
            {"step": 2, "protocol": "simple", "key": "a", "dino": 0.3},  # then the first settings again
            {"step": 1, "protocol": "simple", "key": "b", "clip_i": 0.4}]
    [one, two] = rundir.current_records(rows)
    assert one == rows[3]
    assert two == {**rows[0], "dino": 0.3}  # key a: written last, its two records merged
    # the evaluation still finds what each key holds
    assert rundir.is_done(rows, 2, "simple", "b", ["clip_i"]) == rows[1]
    assert rundir.is_done(rows, 2, "simple", "a", ["clip_i", "dino"]) == {**rows[0], "dino": 0.3}


def test_append_keeps_every_record_and_a_single_record_is_itself(tmp_path):
    run = tmp_path / "run"
    _write(run, [{"step": 1, "protocol": "simple", "key": "a", "clip_i": 0.1}], torn=True)
    rundir.append_record(run, {"step": 2, "protocol": "simple", "key": "a", "clip_i": 0.2})
    records = rundir.read_records(run)
    assert [r["step"] for r in records] == [1, 2]  # the torn line stays skipped, the new one is whole
    assert rundir.metrics_path(run).read_text().count("\n") == 3
    assert rundir.is_done(records, 2, "simple", "a", ["clip_i"]) is records[1]
    with pytest.raises(ValueError):  # NaN is not JSON: the evaluation writes None for a non-finite value
        rundir.append_record(run, {"step": 3, "protocol": "simple", "key": "a", "clip_i": float("nan")})


def test_metric_names_are_the_numbers_beside_the_fields():
    record = {"step": 300, "stage_step": 200, "num_images": 4, "seconds": 1.5, "seed": 0, "clip_i": 0.8, "fid": 12,
              "is_std": 0.1, "dino": None, "key": "k", "spec": {"steps": 25}, "flag": True}
    assert sorted(rundir.metric_names(record)) == ["clip_i", "fid", "is_std"]


# ----------------------------------------------------------------------------------------------- torch
# `import torch` fails where this is on PYTHONPATH: whatever still runs there needs no torch.
NO_TORCH = """import sys
sys.modules["torch"] = None
"""


def _without_torch(tmp_path):
    shim = tmp_path / "no_torch"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(NO_TORCH)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(PROJECT_ROOT)]))


def test_the_report_and_the_run_dir_import_no_torch():
    import personalize.report

    modules = ["personalize.rundir"] + [f"personalize.report.{m.name}" for m in pkgutil.iter_modules(personalize.report.__path__)]
    assert {"personalize.report.command", "personalize.report.page", "personalize.report.runs"} <= set(modules)
    code = f"import sys; import {', '.join(modules)}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr


# The `personalize-report` console script itself, Hydra app and schema preflight included, runs torch-free.
REPORT_TASK = """import sys
from personalize.cli import report_main
sys.argv = ["personalize-report", *sys.argv[1:]]
report_main()
"""


def test_the_report_runs_where_torch_cannot_be_imported(tmp_path):
    """The `personalize-report` task end to end (compose, collect the runs from disk, tables, markdown, CSV,
    plot, HTML page) on run dirs as training and evaluation leave them (a sweep of two methods x three
    subjects, with evaluation images for one), in a process where `import torch` fails."""
    from tests.test_report import make_run

    env = _without_torch(tmp_path)
    control = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert control.returncode != 0 and "import of torch halted" in control.stderr  # the shim works

    sweep = tmp_path / "train" / "multiruns" / "zeng2023_table1" / "2026-01-01_00-00-00"
    for method in ("two_stage", "dreambooth"):
        for subject in ("dog", "dog2", "cat"):
            run = make_run(sweep, method, subject, name=f"0_{method}-{subject}-s0")
    for checkpoint in sorted((run / rundir.CHECKPOINTS_DIR).iterdir()):  # the last run: dreambooth / cat
        folder = rundir.eval_dir(run, checkpoint, "dreambooth")
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / rundir.image_name(0, 0))
        atomic_write_json(folder / rundir.SPEC_FILE, {"prompts": ["a sks dog in the snow"]})
    out, page = tmp_path / "report", tmp_path / "report.html"
    overrides = ["experiment=zeng2023_table1", "logger=none", "table.subjects=[dog,dog2,cat]",
                 f"report.runs_dirs=[{tmp_path / 'train'}]", f"report.html.path={page}", f"report.out_dir={out}"]
    result = subprocess.run([sys.executable, "-c", REPORT_TASK, *overrides], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    markdown = (out / "report.md").read_text()
    assert markdown in result.stdout and "None: every method x subject x column has a value." in markdown
    table = (out / "table.csv").read_text().splitlines()
    assert len(table) == 1 + 2 * 4  # methods x the table's columns
    assert (out / "metrics_vs_step.png").read_bytes()[:4] == b"\x89PNG"
    html_page = page.read_text()
    assert "data:image/jpeg;base64," in html_page and "a sks dog in the snow" in html_page
