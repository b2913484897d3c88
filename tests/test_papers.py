"""The papers' setups: Jindal's table as the authors' released code ran it (jindal2023_table1_code) and the
DreamBooth paper's own Table 1 (ruiz2023_table1) with its "real images" row.

- the composed configs hold the settings the authors' commands and the papers name, and each smoke twin
  differs from its full experiment only in sizes;
- the real-images record equals a brute-force computation (every pair of distinct photos, one cosine at a
  time) with the same tiny evaluation models on the shipped subject photos, and so does the report's row;
- both smoke twins run through a sweep and `personalize-report`, which names the setup and shows the row;
- an experiment scores the real images exactly where its paper's table has that row (Ruiz et al.'s does;
  Zeng et al.'s Table 1, two rows, and Jindal's do not: none is invented for them).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from personalize.config import CONF_DIR, PROJECT_ROOT, compose
from personalize.data import Subject
from personalize.errors import PersonalizeError
from personalize.eval import evaluate as E
from personalize.eval.evaluator import Evaluator
from personalize.eval.images import reference_images
from personalize.eval.metrics import ClipEncoder, DinoEncoder, build_metrics, compute_metrics, set_references, update_metrics
from personalize.eval.real_images import ENCODER_OF, evaluate_real_images, mean_pairwise_similarity, pending_spec
from personalize.eval.settings import EvalSettings, check_settings
from personalize.eval.standins import ensure_tiny_clip, ensure_tiny_dino
from personalize.methods.stages import parse_stages
from personalize.methods.optim import scaled_lr
from personalize.report.spec import REAL_IMAGES_ROW, load_paper_tables
from personalize.rundir import REAL_IMAGES_METRICS, REAL_IMAGES_PROTOCOL, REAL_IMAGES_STEP, read_records
from personalize.train import prompts_for
from tests import sweeps


def compose_job(experiment: str, method: str, *overrides: str):
    """One job of the experiment's sweep: its per-method file picks the method and its recipe."""
    return compose("train", [f"experiment={experiment}", f"+experiment/{experiment}@_global_={method}", *overrides],
                   output_dir="/unused")


def brute_force_real_images(photos, encoder) -> float:
    """Mean cosine over every ordered pair of distinct photos, each photo encoded on its own."""
    features = [encoder.encode_images([photo])[0].double() for photo in photos]
    pairs = [(i, j) for i, j in itertools.permutations(range(len(features)), 2)]
    return sum(float(F.cosine_similarity(features[i], features[j], dim=0)) for i, j in pairs) / len(pairs)


# ------------------------------------------------------------------------------------------ configs


def test_jindal_code_has_the_authors_settings():
    jobs = {m: compose_job("jindal2023_table1_code", m) for m in ("textual_inversion", "dreambooth", "lora")}
    for cfg in jobs.values():  # what all three of their commands share, and what jindal2023_table1 measures
        assert cfg.model.pretrained == "CompVis/stable-diffusion-v1-4" and cfg.subject.name == "dog"
        assert cfg.method.batch_size == 1 and cfg.method.identifier == "<sks-dog>"
        prompts = prompts_for(cfg.method, Subject.from_cfg(cfg.subject))
        assert (prompts["instance"], prompts["class"]) == ("a photo of <sks-dog>", "a photo of dog")
        assert list(cfg.eval.protocols) == ["jindal"] and list(cfg.eval.metrics) == ["clip_score", "fid", "is"]
        assert cfg.table.name == "jindal2023_table1" and cfg.table.selection == "last"
        assert list(cfg.table.methods) == ["textual_inversion", "dreambooth", "lora"]
        assert dict(cfg.table.paper_rows) == {"dreambooth": "finetune"} and "authors' released code" in cfg.table.setup
        assert cfg.group == "jindal2023_table1_code"

    ti = jobs["textual_inversion"]
    (token,) = parse_stages(ti.method.stages)
    assert (token.train, token.steps, token.lr) == (("token",), 2000, 5e-4)
    assert ti.method.gradient_accumulation_steps == 4 and ti.method.scale_lr
    assert scaled_lr(token.lr, ti.method, world_size=1) == pytest.approx(2e-3, rel=1e-12)  # 5e-4 x 4 x 1
    assert ti.method.prompt_templates == "object" and ti.method.flip and ti.method.optimizer.max_grad_norm is None
    assert ti.method.new_token.initializer == "dog"

    db = jobs["dreambooth"]
    (unet,) = parse_stages(db.method.stages)
    assert (unet.train, unet.steps, unet.lr, unet.prior_loss_weight) == (("unet",), 801, 5e-6, 1.0)
    assert db.class_images.count == 200
    assert unet.checkpoint_steps() == [200, 400, 600, 800, 801]
    assert (db.method.data.crop, db.method.data.interpolation) == ("random", "bilinear")
    assert db.method.gradient_accumulation_steps == 1 and not db.method.scale_lr and db.method.optimizer.max_grad_norm == 1.0

    lora = jobs["lora"]
    (adapter,) = parse_stages(lora.method.stages)
    assert (adapter.train, adapter.steps, adapter.lr, adapter.prior_loss_weight) == (("lora",), 601, 1e-4, 0.0)
    assert adapter.checkpoint_steps() == [200, 400, 600, 601]
    assert (lora.method.lora.rank, lora.method.lora.alpha) == (4, 4)
    assert lora.method.data.crop == "random" and lora.method.gradient_accumulation_steps == 1


def test_ruiz_has_the_papers_protocol_and_the_references_recipes():
    jobs = {m: compose_job("ruiz2023_table1", m) for m in ("dreambooth", "textual_inversion")}
    defaults = {m: compose("train", [f"method={m}"], output_dir="/unused").method for m in jobs}
    for method, cfg in jobs.items():
        assert cfg.model.name == "sd14" and cfg.model.pretrained == "CompVis/stable-diffusion-v1-4"
        assert list(cfg.eval.protocols) == ["dreambooth"] and cfg.eval.images_per_prompt.dreambooth == 4
        assert set(cfg.eval.metrics) == {"dino", "clip_i", "clip_t"} and cfg.eval.real_images
        assert len(cfg.table.subjects) == 30 and cfg.table.selection == "last"
        assert [c.paper for c in cfg.table.columns] == ["diverse.dino", "diverse.clip_i", "diverse.clip_t"]
        assert all(c.protocol == "dreambooth" for c in cfg.table.columns)
        assert dict(cfg.table.paper_rows) == {"dreambooth": "dreambooth_sd", "textual_inversion": "textual_inversion_sd"}
        # the recipe is the method's own defaults; textual inversion adds the references' object templates
        mine = OmegaConf.to_container(cfg.method, resolve=True)
        stock = OmegaConf.to_container(defaults[method], resolve=True)
        if method == "textual_inversion":
            assert mine.pop("prompt_templates") == "object" and stock.pop("prompt_templates") is None
        assert mine == stock
    assert jobs["dreambooth"].class_images.count == 200


def _shape(cfg) -> dict:
    """Everything of a job but its sizes (steps, checkpoints, image counts), model, hardware and logging."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    for stage in method["stages"].values():
        stage.pop("steps"), stage.pop("checkpoint_every", None)
    if method.get("new_token"):
        method["new_token"].pop("initializer")  # the subject's class noun
    evaluation = {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if k in (
        "protocols", "metrics", "real_images", "sampler", "guidance_scale", "seed", "every_checkpoint")}
    table = OmegaConf.to_container(cfg.table)
    table.pop("subjects")
    return dict(method=method, eval=evaluation, table=table, class_prompt=cfg.class_images.prompt, seed=cfg.seed,
                experiment=cfg.group.removesuffix("_smoke"))


@pytest.mark.parametrize("experiment,methods", [("jindal2023_table1_code", ("textual_inversion", "dreambooth", "lora")),
                                                ("ruiz2023_table1", ("dreambooth", "textual_inversion"))])
def test_smoke_twin_changes_only_sizes(experiment, methods):
    for method in methods:
        full, small = compose_job(experiment, method), compose_job(f"{experiment}_smoke", method)
        assert _shape(small) == _shape(full), method
        assert small.model.name == "tiny" and small.hardware.name == "cpu"
        assert [s.steps for s in parse_stages(small.method.stages)] == [
            max(1, round(s.steps / 100)) for s in parse_stages(full.method.stages)]


def test_an_experiment_scores_the_real_images_exactly_where_its_papers_table_has_that_row():
    """eval.real_images gives the report's "real images" row, which stands beside the paper's own. Ruiz et al.'s
    Table 1 has one; Zeng et al.'s Table 1 has two rows (theirs and DreamBooth on SD) and Jindal's three
    methods: their experiments score no real images, and their tables get no row the paper does not print.
    Read from the paper tables the report reads (report.paper_tables, a copy of shared/'s)."""
    checked = {}
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        cfg = compose("train", [f"experiment={path.stem}"], output_dir="/unused")
        if cfg.get("table") is None:
            continue
        paper = load_paper_tables(compose("report", [f"experiment={path.stem}"], output_dir="/unused").report.paper_tables)
        # a table no paper prints (dreambench_sdxl / _flux) has no real-images row either
        checked[path.stem] = REAL_IMAGES_ROW in (paper.get(str(cfg.table.name)) or {}).get("rows", {})
        assert bool(cfg.eval.get("real_images", False)) == checked[path.stem], path.stem
    assert checked["ruiz2023_table1"] and checked["ruiz2023_table1_smoke"]
    assert not checked["zeng2023_table1"] and not checked["zeng2023_table1_smoke"] and not checked["jindal2023_table1_code"]
    assert set(checked) >= {"zeng2023_table1", "zeng2023_table1_smoke", "ruiz2023_table1", "ruiz2023_table1_smoke",
                            "jindal2023_table1", "jindal2023_table1_code"}


# --------------------------------------------------------------------------------- the real-images row


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    return {"clip": ClipEncoder(ensure_tiny_clip(root / "clip")), "dino": DinoEncoder(ensure_tiny_dino(root / "dino"))}


def test_mean_over_pairs_of_distinct_rows():
    features = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.arange(1, 6)[:, None]
    pairs = list(itertools.permutations(range(5), 2))
    expected = sum(float(F.cosine_similarity(features[i], features[j], dim=0)) for i, j in pairs) / len(pairs)
    assert mean_pairwise_similarity(features) == pytest.approx(expected, abs=1e-12)
    assert mean_pairwise_similarity(features[:2]) == pytest.approx(float(F.cosine_similarity(features[0], features[1], dim=0)))
    with pytest.raises(ValueError, match="at least 2 photos"):
        mean_pairwise_similarity(features[:1])
    assert set(ENCODER_OF) == set(REAL_IMAGES_METRICS)


def test_real_images_agree_with_the_generated_vs_real_metric(encoders, make_cfg):
    """The generated-vs-real metric fed the photos as its generated images averages all n x n pairs, the n
    pairs of a photo with itself (cosine 1) included: real images = (n x that - 1) / (n - 1)."""
    photos = reference_images(make_cfg("subject=sample_dog2"))
    metrics = build_metrics(["clip_i", "dino"], encoders["clip"], encoders["dino"], "clip")
    set_references(metrics, photos)
    update_metrics(metrics, photos)
    every_pair = compute_metrics(metrics)
    n = len(photos)
    for metric, kind in ENCODER_OF.items():
        features = encoders[kind].encode_images(photos)
        assert mean_pairwise_similarity(features) == pytest.approx((n * every_pair[metric] - 1) / (n - 1), abs=1e-5)


class Logged:
    """A logger that keeps what evaluate_run logs (metrics only)."""

    def __init__(self):
        self.metrics: list[tuple[dict, int]] = []

    def log_metrics(self, values, step):
        self.metrics.append((dict(values), step))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step textual-inversion run on the tiny model, not evaluated yet."""
    from personalize.train import fit, prepare_run

    cfg = compose("train", ["debug=default", "method=textual_inversion", "subject=sample_dog", "eval=none",
                            "method.stages.token.steps=2", "method.stages.token.checkpoint_every=2"],
                  output_dir=tmp_path_factory.mktemp("trained") / "run")
    run = fit(prepare_run(cfg), sample=False)
    return cfg, run.run_dir


def eval_cfg(run_dir, *overrides):
    return compose("train", ["debug=default", "eval.protocols=[simple]", "eval.images_per_prompt.simple=2",
                             "eval.metrics=[clip_i,dino,clip_t]", "eval.real_images=true", *overrides],
                   output_dir=run_dir).eval


def test_the_record_equals_a_brute_force_computation_and_is_written_once(trained, encoders, monkeypatch):
    cfg, run_dir = trained
    logged = Logged()
    results = E.evaluate_run(run_dir, eval_cfg(run_dir), run_cfg=cfg, logger=logged)
    assert [(r["step"], r["protocol"]) for r in results] == [(2, "simple")]  # the pairs; the row is not a pair's
    records = read_records(run_dir)
    (real,) = [r for r in records if r["protocol"] == REAL_IMAGES_PROTOCOL]
    assert records.index(real) == 0, "written before any generation"
    photos = reference_images(cfg)
    assert real["step"] == REAL_IMAGES_STEP and real["num_images"] == len(photos) == 5
    assert (real["method"], real["subject"], real["references"]) == ("textual_inversion", "sample_dog", "subject")
    for metric, kind in ENCODER_OF.items():
        assert real[metric] == pytest.approx(brute_force_real_images(photos, encoders[kind]), abs=1e-6)
        assert real["metric_settings"][metric]["features"].startswith(f"{kind}:")
    assert "clip_t" not in real  # prompt fidelity has no real-images value
    assert ({f"eval/real_images/{m}": real[m] for m in ("clip_i", "dino")}, 0) in logged.metrics

    # done: another evaluation (even with more pairs to do) neither scores the photos again nor rewrites it
    monkeypatch.setattr("personalize.eval.real_images.score_photos", lambda *a: pytest.fail("scored twice"))
    E.evaluate_run(run_dir, eval_cfg(run_dir, "eval.metrics=[clip_i,dino]"), run_cfg=cfg)
    assert [r for r in read_records(run_dir) if r["protocol"] == REAL_IMAGES_PROTOCOL] == [real]

    # other evaluation models are another key: scored again, and the newest record is the current one
    settings = EvalSettings.from_cfg(eval_cfg(run_dir))
    assert pending_spec(read_records(run_dir), settings, int(cfg.model.resolution)) is None
    other = EvalSettings.from_cfg(eval_cfg(run_dir, f"eval.dino_model={run_dir / 'other-dino'}"))
    assert pending_spec(read_records(run_dir), other, int(cfg.model.resolution))["dino_model"].endswith("other-dino")


def test_off_by_default_and_refused_without_clip_i_or_dino(trained, make_cfg):
    cfg, run_dir = trained
    assert not compose("train", [], output_dir="/unused").eval.real_images
    settings = EvalSettings.from_cfg(eval_cfg(run_dir, "eval.real_images=false"))
    assert pending_spec([], settings, 32) is None
    with pytest.raises(PersonalizeError, match=r"eval.real_images=true .* eval.metrics=\['clip_t', 'fid'\] has "
                                               r"neither: add clip_i or dino"):
        check_settings(EvalSettings.from_cfg(eval_cfg(run_dir, "eval.metrics=[clip_t,fid]")))


def test_a_subject_with_one_photo_gets_no_row(tmp_path, make_cfg, caplog):
    folder = tmp_path / "rex"
    folder.mkdir()
    shutil.copy(PROJECT_ROOT / "data" / "samples" / "dog" / "00.jpg", folder / "00.jpg")
    cfg = make_cfg("subject=folder", f"subject.data_dir={folder}", "subject.class_noun=dog", "eval.real_images=true",
                   "eval.metrics=[clip_i,dino]")
    evaluator = Evaluator(tmp_path, cfg, EvalSettings.from_cfg(cfg.eval), cfg.model)
    evaluator.encoders = lambda: pytest.fail("nothing to encode")
    with caplog.at_level(logging.WARNING, logger="personalize.eval.real_images"):
        assert evaluate_real_images(evaluator, {"protocol": REAL_IMAGES_PROTOCOL}) is None
    assert "subject 'rex' has 1 photo" in caplog.text and not read_records(tmp_path)


# ------------------------------------------------------------------------------ smoke sweeps + reports


_SWEEPS: dict[str, sweeps.Sweep] = {}


def smoke(experiment: str, tmp_path_factory, *overrides: str) -> sweeps.Sweep:
    """`personalize -m experiment=<experiment>` once per session (its own outputs and class-image cache)."""
    if experiment not in _SWEEPS:
        outputs = tmp_path_factory.mktemp(experiment)
        sweep = sweeps.run("personalize", "-m", f"experiment={experiment}", "logger=none",
                           f"paths.class_image_dir={outputs / 'class_images'}", *overrides, outputs=outputs)
        assert sweep.returncode == 0, sweep.log[-4000:]
        _SWEEPS[experiment] = sweep
    return _SWEEPS[experiment]




@pytest.mark.slow  # a 3-job sweep (~35 s on 2 cores); its settings: test_jindal_code_has_the_authors_settings, and the
# sweep + report path runs in the default suite through the Ruiz smoke below
def test_jindal_code_smoke_runs_through_the_sweep_and_the_report_names_its_setup(tmp_path_factory):
    # one of the two sample dogs keeps it fast; the report's table is cut to it
    sweep = smoke("jindal2023_table1_code_smoke", tmp_path_factory, "subject=sample_dog")
    runs = {r.name.split("_", 1)[1]: r for r in sweep.runs}
    assert set(runs) == {f"{m}-sample_dog-s0" for m in ("textual_inversion", "dreambooth", "lora")}
    steps = {name: sorted({rec["step"] for rec in read_records(run)}) for name, run in runs.items()}
    assert steps == {"textual_inversion-sample_dog-s0": [5, 10, 15, 20], "dreambooth-sample_dog-s0": [2, 4, 6, 8],
                     "lora-sample_dog-s0": [2, 4, 6]}
    for run in runs.values():  # what each job trained on, as checkpoint.json names it
        info = json.loads((run / "checkpoints" / sorted(p.name for p in (run / "checkpoints").iterdir())[-1]
                           / "checkpoint.json").read_text())
        assert info["identifier"] == "<sks-dog>" and info["phrase"] == "<sks-dog>"
    ti = json.loads((runs["textual_inversion-sample_dog-s0"] / "checkpoints" / "step-000020" / "checkpoint.json").read_text())
    assert ti["overrides"]["method.gradient_accumulation_steps"] == 4 and ti["overrides"]["method.scale_lr"] is True

    out, folder = sweeps.report(sweep, "jindal2023_table1_code_smoke", "table.subjects=[sample_dog]")
    assert "Setup: the authors' released code (github.com/sakshamjindal/Subject2Subject" in out
    cells = sweeps.markdown_row(out, "dreambooth (paper: finetune)")
    assert [c.split(" / ")[1] for c in cells] == ["30.144", "0.030", "1.777"]  # the paper's finetune row
    assert all(float(c.split(" / ")[0]) >= 0 for c in cells) and "## Missing (0 cell(s))" in out
    assert sweeps.markdown_row(out, "textual_inversion")[0].endswith(" / 24.123")
    table = pd.read_csv(folder / "table.csv")
    assert set(table.setup) == {compose("train", ["experiment=jindal2023_table1_code_smoke"], output_dir="/unused").table.setup}
    page = (sweep.outputs / "report" / "jindal2023_table1_code_smoke.html").read_text()
    assert '<p class="meta" id="setup">Setup: the authors&#x27; released code' in page
    assert "real images" not in out  # no CLIP-I or DINO column: no row, no note


def test_ruiz_smoke_runs_with_the_real_images_row_computed_from_the_photos(tmp_path_factory, encoders):
    sweep = smoke("ruiz2023_table1_smoke", tmp_path_factory)
    runs = sweep.runs
    assert [r.name.split("_", 1)[1] for r in runs] == [f"{m}-{s}-s0" for m in ("dreambooth", "textual_inversion")
                                                       for s in ("sample_dog", "sample_dog2")]
    per_subject: dict[str, dict[str, float]] = {}
    for run in runs:
        records = read_records(run)
        real = [r for r in records if r["protocol"] == REAL_IMAGES_PROTOCOL]
        assert len(real) == 1, run.name
        pairs = sorted({(r["stage_step"], r["protocol"]) for r in records if r["protocol"] != REAL_IMAGES_PROTOCOL})
        assert pairs == [(s, "dreambooth") for s in ((2, 4, 6, 8) if "dreambooth-" in run.name else (5, 10, 15, 20))]
        photos = reference_images(OmegaConf.load(run / "config.yaml"))
        for metric, kind in ENCODER_OF.items():  # the run's own tiny evaluation models (same seeds as ours)
            assert real[0][metric] == pytest.approx(brute_force_real_images(photos, encoders[kind]), abs=1e-6)
        per_subject.setdefault(real[0]["subject"], {}).update({m: real[0][m] for m in ENCODER_OF})

    out, folder = sweeps.report(sweep, "ruiz2023_table1_smoke")
    assert "Setup: the DreamBooth paper's protocol" in out
    expected = {m: sum(v[m] for v in per_subject.values()) / 2 for m in ENCODER_OF}  # mean per subject, then over
    dino, clip_i, clip_t = sweeps.markdown_row(out, "real images")
    assert dino == f"{expected['dino']:.3f} / 0.774" and clip_i == f"{expected['clip_i']:.3f} / 0.885" and clip_t == "—"
    assert sweeps.markdown_row(out, "dreambooth (paper: dreambooth_sd)")[0].endswith(" / 0.668")
    assert sweeps.markdown_row(out, "textual_inversion (paper: textual_inversion_sd)")[2].endswith(" / 0.255")
    assert "the paper's row dreambooth_imagen has no method here (reference only): DINO 0.696, CLIP-I 0.812, " \
           "CLIP-T 0.306" in out
    assert "## Missing (0 cell(s))" in out
    table = pd.read_csv(folder / "table.csv")
    real = table[table.method == "real_images"].set_index("metric")
    assert set(real.index) == {"dino", "clip_i"} and (real.n == 2).all()
    for metric in ("dino", "clip_i"):
        assert math.isclose(real.ours[metric], expected[metric], abs_tol=1e-9)
    subjects = pd.read_csv(folder / "subjects.csv")
    by_subject = subjects[subjects.method == "real_images"].groupby(["subject", "metric"]).value.first()
    for subject, values in per_subject.items():
        for metric in ("dino", "clip_i"):
            assert math.isclose(by_subject[(subject, metric)], values[metric], abs_tol=1e-9)
    page = (sweep.outputs / "report" / "ruiz2023_table1_smoke.html").read_text()
    assert '<tr data-method="real_images"><th class="row">real images</th>' in page
