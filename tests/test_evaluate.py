"""Evaluation of a run dir: every checkpoint x protocol x metric in metrics.jsonl and in the offline W&B
run, resuming a killed evaluation, the eval CLI on an existing run, and the eval config group."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from personalize.config import PROJECT_ROOT, compose
from personalize.errors import PersonalizeError
from personalize.rundir import read_records
from personalize.eval import evaluate as E
from personalize.eval.evaluator import Evaluator
from personalize.eval.settings import EvalSettings
from personalize.eval.metrics import METRIC_NAMES
from personalize.eval.protocols import PROTOCOLS
from tests.wandb_offline import offline_runs, read_offline_history

# debug=default: every protocol and metric with 1-2 images per prompt and 2 sampler steps.
SHORT = ["debug=default", "method=two_stage", "subject=sample_dog", "logger=wandb_offline",
         "method.stages.token.steps=2", "method.stages.unet.steps=4", "method.stages.unet.checkpoint_every=2"]
STEPS = [4, 6]
IMAGES = {"dreambooth": 25, "simple": 2, "jindal": 20, "prior": 2}  # prompts x images per prompt (debug)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, isolated_cache):
    """A short two-stage run, trained and evaluated by `fit` (the post-training pass), W&B offline."""
    from personalize.train import fit, prepare_run

    cfg = compose("train", SHORT, output_dir=tmp_path_factory.mktemp("evaluated") / "run")
    run = fit(prepare_run(cfg))
    return cfg, run.run_dir


def _records(run_dir):
    return read_records(run_dir)


def test_full_evaluation_writes_every_protocol_metric_and_checkpoint(trained):
    cfg, run_dir = trained
    records = _records(run_dir)
    assert sorted((r["step"], r["protocol"]) for r in records) == sorted((s, p) for s in STEPS for p in PROTOCOLS)
    for r in records:
        for metric in METRIC_NAMES:
            assert isinstance(r[metric], float) and math.isfinite(r[metric]), (r["protocol"], metric)
        assert (r["method"], r["subject"], r["stage"]) == ("two_stage", "sample_dog", "unet")
        assert r["stage_step"] == r["step"] - 2 and r["num_images"] == IMAGES[r["protocol"]]
        assert r["references"] == ("base" if r["protocol"] == "prior" else "subject")
        folder = run_dir / "eval" / r["checkpoint"] / r["protocol"]
        assert len(list(folder.glob("p*_i*.png"))) == IMAGES[r["protocol"]]
        assert (folder / "grid.png").exists()
    # the base model's prior images sit in the shared class-image cache, generated once
    base = {r["base_images"] for r in records if r["protocol"] == "prior"}
    assert len(base) == 1 and len(list(os.scandir(base.pop()))) >= IMAGES["prior"]
    # prior drift: against the base model's own images the tiny run has barely moved
    prior = [r for r in records if r["protocol"] == "prior"]
    assert all(r["clip_i"] > 0.9 and r["dino"] > 0.9 for r in prior)


def test_wandb_offline_run_holds_the_same_numbers(trained):

    _, run_dir = trained
    (wandb_run,) = offline_runs(run_dir)
    logged = {}
    for row in read_offline_history(wandb_run):
        for key, value in row.items():
            if key.startswith("eval/") and key.count("/") == 2:
                logged[(row["trainer/global_step"], key)] = value
    for r in _records(run_dir):
        for metric in METRIC_NAMES:
            assert logged[(r["step"], f"eval/{r['protocol']}/{metric}")] == r[metric]
    assert any(k == "eval/summary/_type" for row in read_offline_history(wandb_run) for k in row)
    assert list((wandb_run / "files" / "media" / "images" / "eval" / "prior").glob("grid_*.png"))


def test_rerun_skips_what_is_recorded(trained, monkeypatch):
    cfg, run_dir = trained
    before = (run_dir / "metrics.jsonl").read_text()
    monkeypatch.setattr(Evaluator, "pipeline", lambda self: pytest.fail("nothing should be loaded"))
    records = E.evaluate_run(run_dir, cfg.eval, run_cfg=cfg)
    assert len(records) == len(STEPS) * len(PROTOCOLS)
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_killed_evaluation_resumes_where_it_stopped(trained, monkeypatch):
    """Kill mid-pair: the last record is missing and so are some of its images."""
    cfg, run_dir = trained
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    last = json.loads(lines[-1])
    path.write_text("\n".join(lines[:-1]) + "\n")
    folder = run_dir / "eval" / last["checkpoint"] / last["protocol"]
    removed = sorted(folder.glob("p*_i*.png"))[:1]
    removed_bytes = [image.read_bytes() for image in removed]
    for image in removed:
        image.unlink()

    generated, references, loads = [], [], []
    generate, set_refs, load_pipeline = Evaluator.generate, Evaluator.metric_set, Evaluator.pipeline
    monkeypatch.setattr(Evaluator, "generate", lambda self, s: generated.extend(s) or generate(self, s))
    monkeypatch.setattr(Evaluator, "metric_set", lambda self, k, f: references.append(k) or set_refs(self, k, f))
    monkeypatch.setattr(Evaluator, "pipeline", lambda self: loads.append(self.pipe is None) or load_pipeline(self))
    records = E.evaluate_run(run_dir, cfg.eval, run_cfg=cfg)

    # the whole batch that held the missing image (batches are aligned to the sample index), so the image
    # has the same neighbours as in the uninterrupted evaluation and comes back byte for byte
    assert len(generated) == min(IMAGES[last["protocol"]], int(cfg.eval.batch_size))
    assert [image.read_bytes() for image in removed] == removed_bytes
    assert references == ["base"]  # the only pending pair is `prior`: its references, once
    assert loads.count(True) == 1  # the base pipeline is loaded once
    new = _records(run_dir)[-1]
    assert (new["step"], new["protocol"]) == (last["step"], last["protocol"]) and records[-1] == new
    for metric in METRIC_NAMES:
        assert new[metric] == pytest.approx(last[metric], abs=1e-3)


def test_references_are_encoded_once_for_all_checkpoints(trained, monkeypatch):
    """Another protocol setting (more images) re-evaluates everything: one reference set each, not per checkpoint."""
    cfg, run_dir = trained
    encoded = []
    set_refs = Evaluator.metric_set
    monkeypatch.setattr(Evaluator, "metric_set", lambda self, k, f: encoded.append(k) or set_refs(self, k, f))
    eval_cfg = compose("train", [*SHORT, "eval.protocols=[simple,prior]", "eval.images_per_prompt.simple=3",
                                 "eval.images_per_prompt.prior=3", "eval.metrics=[clip_i,dino]"],
                       output_dir=run_dir).eval
    records = E.evaluate_run(run_dir, eval_cfg, run_cfg=cfg)
    assert sorted(encoded) == ["base", "subject"]
    assert [(r["step"], r["protocol"], r["num_images"]) for r in records] == \
        [(s, p, 3) for s in STEPS for p in ("simple", "prior")]
    assert set(records[0]) >= {"clip_i", "dino"} and "fid" not in records[0]


def test_eval_cli_re_evaluates_an_existing_run(trained):

    _, run_dir = trained
    runs_before = len(offline_runs(run_dir))
    script = "import sys; sys.argv[0] = 'personalize-eval'; from personalize.cli import eval_main; eval_main()"
    result = subprocess.run(
        [sys.executable, "-c", script, f"run_dir={run_dir}", "eval=jindal", "eval.metrics=[clip_score,clip_t]",
         "eval.steps=3", "eval.every_checkpoint=false", "hardware=cpu"],
        cwd=PROJECT_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    new = [r for r in _records(run_dir) if r["spec"]["steps"] == 3]
    assert [(r["step"], r["protocol"]) for r in new] == [(STEPS[-1], "jindal")]
    table = result.stdout[result.stdout.index("step"):]
    assert "jindal" in table and f"{new[0]['clip_t']:.4f}" in table
    # its own W&B run (job type eval) in the run dir, with the same numbers
    assert len(offline_runs(run_dir)) == runs_before + 1
    rows = read_offline_history(offline_runs(run_dir)[-1])
    assert any(row.get("eval/jindal/clip_t") == new[0]["clip_t"] for row in rows)


def test_eval_config_group(tmp_path, monkeypatch):
    tiny = compose("train", ["model=tiny"], output_dir=tmp_path).eval
    assert tiny.tiny_models and tiny.fid_features == "clip" and tiny.clip_model.endswith("tiny-clip")
    real = compose("train", ["model=sd21_base"], output_dir=tmp_path).eval
    assert (real.clip_model, real.dino_model, real.fid_features) == \
        ("openai/clip-vit-base-patch32", "facebook/dino-vits16", "inception")
    assert dict(real.images_per_prompt) == {"dreambooth": 4, "simple": 64, "jindal": 1, "prior": 64}
    assert compose("train", ["eval=jindal"], output_dir=tmp_path).eval.protocols == ["jindal"]
    assert not EvalSettings.from_cfg(compose("train", ["eval=none"], output_dir=tmp_path).eval).enabled

    from personalize.train import check_evaluation

    check_evaluation(compose("train", ["debug=default"], output_dir=tmp_path))
    for overrides, message in [
        (["eval.protocols=[dreambooth,nope]"], "unknown eval protocol"),
        (["eval.images_per_prompt.simple=1"], "FID needs at least 2"),
        (["eval.fid_features=dino"], "IS needs class logits"),
    ]:
        with pytest.raises(PersonalizeError, match=message):
            check_evaluation(compose("train", ["debug=default", *overrides], output_dir=tmp_path))
    monkeypatch.setattr("personalize.eval.metrics._has_torch_fidelity", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PersonalizeError, match="torch-fidelity"):
        check_evaluation(compose("train", ["model=sd21_base"], output_dir=tmp_path))
