"""The benchmark (benchmarks/, beside the package) and its seam into production code (personalize.instrument).

The smoke mode runs end to end on the tiny model and writes every row (no timing assertions); the rows
come from conf/method/; the spans time what they wrap; production code never imports mock or the harness.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from omegaconf import OmegaConf

import lightning as L

from benchmarks.catalog import composed_method, method_names, method_stages, training_rows, variants
from benchmarks.report import row_ids, vs_plain_row
from benchmarks.run import main, parse_args, training_jobs
from benchmarks.training import Plan, compose_method, instrumented_fit, placeholder_class_images, side_paths
from personalize import instrument
from personalize.config import CONF_DIR, PROJECT_ROOT, compose
from personalize.data import Subject
from personalize.backbones import load_pipeline
from personalize.methods.stages import parse_stages
from personalize.tiny import TINY_RESOLUTION
from personalize.train import prepare_class_images, prepare_run

# The ids docs/benchmark.md cites: they must survive the move to rows built from conf/method/.
DOCUMENTED_TRAINING_ROWS = ["textual_inversion", "two_stage.token", "two_stage.unet", "dreambooth", "lora", "finetune"]


def test_quick_benchmark_writes_every_row(tmp_path, capsys):
    threads = torch.get_num_threads()
    result = main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads, "the benchmark must give the test session its threads back"

    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1
    data = json.loads(written[0].read_text())
    assert data == json.loads(json.dumps(result, default=str))
    rows = {row["id"]: row for row in data["rows"]}
    assert list(rows) == row_ids()
    for id_, row in rows.items():
        assert row["value"] is not None and row["status"] != "error", f"{id_}: {row['why']}"
        assert set(row) >= {"item", "figure", "target", "value", "spread", "unit", "status", "why"}
    assert data["e2e"]["ratio"] > 0 and data["meta"]["shape"] == "tiny"
    for variant in variants():  # a variant's steps each have the plain floor timed beside them
        stage = next(iter(method_stages(variant.method)))
        rec = data["training"][variant.name]["stages"][stage]
        assert len(rec["plain_floor"]) == len(rec["ours"]) == len(rec["floor"]) > 0
        assert "plain_floor" not in data["training"][variant.method]["stages"][stage]
    table = capsys.readouterr().out
    assert "step ÷ floor: dreambooth" in table and str(written[0]) in table

    # The evaluation's parts came through the spans: one pair (one checkpoint x `simple`, one batch of
    # eval.batch_size images), one pipeline load, and hooks on the published pipeline saw every UNet call.
    ev = data["generation"]["evaluation"]
    calls = ev["parts"][0]["span_calls"]
    assert calls["eval.pair"] == 1 and calls["eval.generate"] == 1 and calls["load_pipeline"] == 1
    assert calls["metrics.update"] == 1 and calls["metrics.compute"] == 1 and calls["eval.encoders"] >= 1
    assert ev["ours"]["calls_measured"] == ev["raw"]["calls_measured"] and ev["ours"]["calls_measured"][0] > 0
    part = ev["parts"][0]
    assert part["pair_metrics"] == pytest.approx(part["metrics.update"] + part["metrics.compute"] + part["metrics.reset"])
    assert 0 < part["eval.generate"] < part["eval.pair"] < part["evaluate_run"]


# ------------------------------------------------------------------ rows from conf/method/
def _stages_from_files(conf_dir: Path) -> dict[str, list[str]]:
    """Each method file's stage names, read from the YAML itself (not through Hydra)."""
    return {p.stem: list(OmegaConf.load(p).stages) for p in sorted((conf_dir / "method").glob("*.yaml"))
            if not p.stem.startswith("_")}


def test_training_rows_are_every_stage_of_every_method_file_then_every_variant():
    expected = []
    for method, stages in _stages_from_files(CONF_DIR).items():
        expected += [(method if len(stages) == 1 else f"{method}.{stage}", method, stage) for stage in stages]
    variant_specs = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "benchmarks" / "variants.yaml"))
    for name, spec in variant_specs.items():  # the variants here all have one stage, their method's
        (stage,) = _stages_from_files(CONF_DIR)[spec["method"]]
        expected.append((name, spec["method"], stage))
    assert [(r.name, r.method, r.stage) for r in training_rows()] == expected
    assert [r.run for r in training_rows()] == [r.method for r in training_rows()[:-len(variant_specs)]] + list(variant_specs)
    assert set(DOCUMENTED_TRAINING_ROWS) <= {r.name for r in training_rows()}
    assert method_stages("two_stage")["unet"]["steps"] == OmegaConf.load(CONF_DIR / "method/two_stage.yaml").stages.unet.steps


def test_a_new_method_file_gets_rows_without_a_benchmark_edit(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR / "method", conf / "method")
    (conf / "method" / "token_then_lora.yaml").write_text(
        "defaults: [_common, _self_]\nname: token_then_lora\nidentifier: '<t>'\nnew_token: {initializer: rare}\n"
        "stages:\n  token: {train: [token], steps: 30, lr: 5.0e-4}\n  lora: {train: [lora], steps: 60, lr: 1.0e-4}\n")
    (conf / "method" / "_shared_part.yaml").write_text("batch_size: 4\n")  # a shared part, not a method

    assert "token_then_lora" in method_names(conf) and "_shared_part" not in method_names(conf)
    assert list(method_stages("token_then_lora", conf)) == ["token", "lora"]
    assert method_stages("token_then_lora", conf)["lora"]["steps"] == 60
    ids = row_ids(conf)
    for id_ in ("step_vs_floor/token_then_lora.token", "step_vs_floor/token_then_lora.lora",
                "naive_vs_ours/token_then_lora.lora", "peak_memory/token_then_lora"):
        assert id_ in ids
    assert set(row_ids()) < set(ids)  # the others stay as they were


def test_every_variant_changes_its_method_and_is_compared_with_its_plain_row():
    """A variant must be what its name says: its overrides compose (Hydra refuses an unknown key) and change
    the method's config (a value equal to the default would measure the plain method twice)."""
    asked = {"lora+dora": "DoRA", "lora+text_encoder": "text-encoder LoRA", "lora+random_crop": "random crop",
             "lora+adamw8bit": "8-bit AdamW", "lora+prodigy": "Prodigy"}  # what issue 12 asks to see the cost of
    found = {v.name: v for v in variants()}
    assert set(asked) <= set(found)
    for variant in found.values():
        assert composed_method(variant.method, overrides=variant.overrides) != composed_method(variant.method), variant.name
    changed = {name: composed_method(v.method, overrides=v.overrides) for name, v in found.items()}
    assert changed["lora+dora"]["lora"]["use_dora"] is True
    assert changed["lora+text_encoder"]["stages"]["lora"]["train"] == ["lora", "text_encoder_lora"]
    assert changed["lora+random_crop"]["data"]["crop"] == "random"
    assert changed["lora+adamw8bit"]["stages"]["lora"]["optimizer"] == "adamw8bit"
    assert changed["lora+prodigy"]["stages"]["lora"]["optimizer"] == "prodigy"
    rows = {r.name: r for r in training_rows()}
    for name in found:
        assert rows[name].plain == "lora" and rows["lora"].plain is None
        assert {f"step_vs_floor/{name}", f"vs_plain/{name}", f"naive_vs_ours/{name}", f"peak_memory/{name}"} <= set(row_ids())


def test_a_variant_runs_right_after_its_plain_method_and_follows_the_methods_chosen():
    jobs = training_jobs(parse_args(["--methods", "dreambooth,lora"]))
    lora_variants = [v.name for v in variants() if v.method == "lora"]
    assert [name for name, _, _ in jobs] == ["dreambooth", "lora", *lora_variants]
    assert all(method == "lora" and overrides for name, method, overrides in jobs[2:])
    assert [name for name, _, _ in training_jobs(parse_args(["--methods", "dreambooth"]))] == ["dreambooth"]
    assert [name for name, _, _ in training_jobs(parse_args(["--methods", "lora", "--variants", "none"]))] == ["lora"]
    only = training_jobs(parse_args(["--methods", "dreambooth", "--variants", "lora+dora"]))
    assert only == [("dreambooth", "dreambooth", []), ("lora+dora", "lora", ["method.lora.use_dora=true"])]


def _stage_record(ours, floor, plain_floor=None) -> dict:
    rec = {"ours": ours, "floor": floor, "naive": [], "ours_loop": ours, "ours_in_step": ours}
    return rec if plain_floor is None else dict(rec, plain_floor=plain_floor)


def test_vs_plain_reads_each_step_against_the_plain_floor_beside_it_so_a_load_change_cancels():
    row = next(r for r in training_rows() if r.name == "lora+dora")
    plain = {"stages": {"lora": _stage_record([2.0, 2.2, 2.1], [2.0, 2.0, 2.0])}}
    # the variant's worker ran on a machine twice as fast: its plain floor (the same work) says so
    variant = {"stages": {"lora": _stage_record([1.5, 1.6, 1.4], [1.3, 1.3, 1.3], plain_floor=[1.0, 1.0, 1.0])}}
    out = vs_plain_row(row, {"lora": plain, "lora+dora": variant})
    # by hand: median(1.5, 1.6, 1.4) / 1.0 over median(2.0, 2.2, 2.1) / 2.0
    assert out["value"] == pytest.approx(1.5 / 1.05) and out["status"] == "info"
    assert "the floors: lora+dora ÷ lora 1.300" in out["why"]
    assert out["spread"][0] <= out["value"] <= out["spread"][1]
    # the raw seconds would have said 1.5 / 2.1: the load, not the option
    slower = {"stages": {"lora": _stage_record([3.0, 3.2, 2.8], [2.6] * 3, plain_floor=[2.0] * 3)}}
    assert vs_plain_row(row, {"lora": plain, "lora+dora": slower})["value"] == pytest.approx(out["value"])

    missing = vs_plain_row(row, {"lora+dora": variant})
    assert missing["value"] is None and missing["status"] == "not measured" and "--methods lora" in missing["why"]


def test_unknown_variant_is_one_error_line_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--variants", "lora+dorra"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --variants has 'lora+dorra'" in err and "lora+dora" in err and "none" in err


# ------------------------------------------------------------------ the floor does what one step of ours does
class RowCounter(L.Callback):
    """During the first step of ours, then one floor step and one naive step built on it: the rows the UNet
    and the VAE encoder see, the UNet calls and the optimizer steps, counted by hooks on the modules."""

    def __init__(self, make_floor, make_naive):
        self.make_floor, self.make_naive = make_floor, make_naive
        self.counts: dict[str, dict[str, int]] = {}
        self._path = None
        self._handles = []

    def _count(self, key: str, rows: int) -> None:
        if self._path is not None:
            counts = self.counts.setdefault(self._path, {"unet_rows": 0, "unet_calls": 0, "vae_rows": 0, "optimizer_steps": 0})
            counts[key] += rows

    def on_train_start(self, trainer, module) -> None:
        def unet(_, args):
            self._count("unet_rows", len(args[0]))
            self._count("unet_calls", 1)

        self._handles = [module.unet.register_forward_pre_hook(unet),
                         module.vae.encoder.register_forward_pre_hook(lambda _, args: self._count("vae_rows", len(args[0]))),
                         register_optimizer_step_post_hook(
                             lambda *_: self._count("optimizer_steps", 1))]

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._path = "ours" if batch_idx == 0 else None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._path = None
        if batch_idx != 0:
            return
        stage = module.stages[0]
        floor, naive = self.make_floor(module, stage, trainer), self.make_naive(module, stage, trainer)
        for name, step in (("floor", floor), ("naive", naive)):
            self._path = name
            step()
            self._path = None

    def on_train_end(self, trainer, module) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.mark.parametrize("method,overrides", [
    ("lora", ["method.gradient_accumulation_steps=3"]),
    ("dreambooth", ["method.gradient_accumulation_steps=2"]),  # class rows in every micro-batch
    ("textual_inversion", ["method.gradient_accumulation_steps=2"]),  # the text side trains: one graph, k backwards
    ("lora", ["method.gradient_accumulation_steps=2", "method.data.crop=random"]),  # the VAE encode is in the floor
])
def test_floor_and_naive_process_the_rows_of_one_optimizer_step_of_ours(method, overrides, tmp_path, tiny_model_dir):
    """With gradient_accumulation_steps k, one step of ours is k micro-batches of batch_size rows (and as many
    class rows) and one optimizer step; a floor of one micro-batch would make step ÷ floor read ~k."""
    plan = Plan(warmup=0, steps=1, class_images=2, save_reps=0, progress_bar=False)
    cfg, _ = compose_method(method, tiny_model_dir, TINY_RESOLUTION, "cpu", tmp_path, plan, overrides)
    placeholder_class_images(cfg)
    run = prepare_run(cfg)
    make_floor, make_naive, _ = side_paths(cfg, TINY_RESOLUTION, plan.class_images)
    counter = RowCounter(make_floor, make_naive)
    instrumented_fit(run, counter)

    k, batch = int(cfg.method.gradient_accumulation_steps), int(cfg.method.batch_size)
    prior = float(OmegaConf.select(cfg, f"method.stages.{next(iter(cfg.method.stages))}.prior_loss_weight") or 0) > 0
    expected = {"unet_rows": k * batch * (2 if prior else 1), "unet_calls": k, "optimizer_steps": 1}
    for path in ("ours", "floor", "naive"):
        assert {key: counter.counts[path][key] for key in expected} == expected, path
    # random crops are VAE-encoded in the step (ours and floor: the step's photos); centre crops are cached.
    # The naive path encodes every row (class rows too) of every micro-batch.
    crops = k * batch if cfg.method.data.crop == "random" else 0
    assert counter.counts["ours"]["vae_rows"] == counter.counts["floor"]["vae_rows"] == crops
    assert counter.counts["naive"]["vae_rows"] == expected["unet_rows"]


def test_unknown_method_is_one_error_line_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--methods", "dreambooth,dreamboth"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --methods has 'dreamboth'" in err and "dreambooth" in err


# ------------------------------------------------------------------ personalize.instrument
class StepClock:
    """A clock that advances by 1.0 each time it is read: span lengths are exact reads-between counts."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_spans_report_their_time_with_the_listeners_clock_and_nest():
    got = []
    clock = StepClock()
    with instrument.listen(lambda name, s: got.append((name, s)), clock=clock):
        with instrument.span("outer"):  # enter reads 1
            with instrument.span("inner"):  # reads 2
                pass  # inner exit reads 3: 1 s
            clock()  # 4
        # outer exit reads 5: 4 s
    assert got == [("inner", 1.0), ("outer", 4.0)]


def test_timed_reports_each_call_also_when_it_raises_and_returns_what_the_function_returns():
    @instrument.timed("work")
    def work(x, fail=False):
        if fail:
            raise ValueError("boom")
        return x * 2

    assert work.__name__ == "work"
    got = []
    with instrument.listen(lambda name, s: got.append((name, s)), clock=StepClock()):
        assert work(21) == 42
        with pytest.raises(ValueError, match="boom"):
            work(1, fail=True)
    assert got == [("work", 1.0), ("work", 1.0)]
    assert work(2) == 4 and len(got) == 2  # the listener is gone: nothing more reported


def test_nobody_listening_costs_no_clock_read_and_listeners_leave_on_errors():
    reads = []

    def clock():
        reads.append(1)
        return 0.0

    assert instrument.span("a") is instrument.span("b")  # one shared no-op while nobody listens
    with pytest.raises(RuntimeError):
        with instrument.listen(lambda *a: None, clock=clock):
            raise RuntimeError("a failing benchmark")
    with instrument.span("after"):
        pass
    instrument.timed("after")(lambda: None)()
    assert reads == []  # the failed listener was removed: nothing read its clock after it left


def test_listeners_stack_and_only_object_listeners_get_published_objects():
    outer, inner, objects = [], [], []
    with instrument.listen(lambda n, s: outer.append(n)):
        with instrument.listen(lambda n, s: inner.append(n), on_object=lambda n, o: objects.append((n, o))):
            with instrument.span("both"):
                pass
            instrument.publish("thing", 7)
        with instrument.span("outer only"):
            pass
    assert outer == ["both", "outer only"] and inner == ["both"] and objects == [("thing", 7)]


def test_a_real_pipeline_load_is_timed_by_its_span(tiny_model_dir):
    """load_pipeline is a span of production code: one real load, reported once, within its wall time."""
    model_cfg = compose("train", ["model=tiny"], output_dir="/unused").model
    got = []
    with instrument.listen(lambda name, s: got.append((name, s))):
        start = time.perf_counter()
        pipe = load_pipeline(model_cfg)
        total = time.perf_counter() - start
    assert pipe.unet is not None
    assert [name for name, _ in got] == ["load_pipeline"] and 0 < got[0][1] <= total


# ------------------------------------------------------------------ class images without patching
def test_placeholder_class_images_are_what_the_run_reads_and_no_pipeline_loads(tmp_path, tiny_model_dir):
    plan = Plan(warmup=0, steps=1, class_images=3)
    cfg, configured = compose_method("dreambooth", tiny_model_dir, TINY_RESOLUTION, "cpu", tmp_path, plan)
    assert configured["class_images"] == 200 and int(cfg.class_images.count) == 3
    paths = placeholder_class_images(cfg)
    assert len(paths) == 3 and all(p.parent.parent == tmp_path / "class_images" for p in paths)

    loads = []
    with instrument.listen(lambda name, s: loads.append(name) if name == "load_pipeline" else None):
        images = prepare_class_images(cfg, Subject.from_cfg(cfg.subject), parse_stages(cfg.method.stages),
                                      "cpu", torch.float32)
    assert loads == [], "a pre-filled cache must not load the class-image pipeline"
    seed = int(cfg.class_images.seed)
    for i in range(3):  # the placeholders' own pixels, in the VAE's [-1, 1] range
        pixels = np.random.default_rng(seed + i).integers(0, 256, (TINY_RESOLUTION, TINY_RESOLUTION, 3), dtype=np.uint8)
        expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
        assert torch.equal(images[i], expected)

    textual_inversion, _ = compose_method("textual_inversion", tiny_model_dir, TINY_RESOLUTION, "cpu",
                                          tmp_path / "ti", plan)
    assert placeholder_class_images(textual_inversion) == []  # no prior loss: nothing written
    assert not (tmp_path / "ti" / "class_images").exists()


# ------------------------------------------------------------------ production code stays production code
FORBIDDEN_MODULES = ("unittest.mock", "mock", "benchmarks")


def forbidden_imports(source: str) -> list[str]:
    """Imports of unittest.mock (in any spelling), the `mock` package or the benchmark harness."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [name for name in names
                  if any(name == m or name.startswith(m + ".") for m in FORBIDDEN_MODULES)]
    return found


def test_the_import_checker_catches_every_spelling():
    for source in ("from unittest import mock", "import unittest.mock as m", "from unittest.mock import patch",
                   "import mock", "from benchmarks.report import row_ids", "import benchmarks.run",
                   "def f():\n    from unittest import mock\n"):
        assert forbidden_imports(source), source
    assert forbidden_imports("import unittest\nfrom personalize import instrument\nimport benchmarking") == []


def test_production_code_imports_no_mock_and_nothing_from_the_benchmarks():
    files = sorted((PROJECT_ROOT / "personalize").rglob("*.py"))
    assert len(files) > 20
    offenders = {str(f.relative_to(PROJECT_ROOT)): found for f in files if (found := forbidden_imports(f.read_text()))}
    assert offenders == {}
    assert not (PROJECT_ROOT / "personalize" / "bench").exists(), "the harness lives in benchmarks/, beside the package"


def test_the_harness_is_found_from_the_repo_root_and_is_not_installed(tmp_path):
    """`python -m benchmarks` works from the root (as the Makefile and docs run it); elsewhere the package
    is not importable: it is beside `personalize`, not part of what pip installs."""
    probe = ["-c", "import importlib.util; s = importlib.util.find_spec('benchmarks'); print(s and s.origin)"]
    at_root = subprocess.run([sys.executable, *probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    elsewhere = subprocess.run([sys.executable, *probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert at_root.stdout.strip() == str(PROJECT_ROOT / "benchmarks" / "__init__.py"), at_root.stderr
    assert elsewhere.stdout.strip() == "None", elsewhere.stderr


# ------------------------------------------------------------------ SDXL and FLUX.1 at their real shapes
from benchmarks import big_shapes  # noqa: E402
from benchmarks import gpu_backbones  # noqa: E402


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_the_real_shapes_have_the_published_parameter_counts(family):
    """Built on the meta device from the configs written in big_shapes, each component has exactly the
    parameters of the published checkpoint (SDXL UNet 2,567,463,684; FLUX.1-dev transformer 11,901,408,320;
    T5-XXL encoder 4,762,310,656)."""
    assert big_shapes.parameter_counts(family) == big_shapes.PUBLISHED[family]
    assert big_shapes.PUBLISHED["sdxl"]["unet"] == 2_567_463_684
    assert big_shapes.PUBLISHED["flux"]["unet"] == 11_901_408_320


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_lora_shapes_are_rank_times_in_plus_out_of_every_targeted_linear(family):
    """Counted independently of PEFT: every Linear whose name is a default target or ends with '.target'."""
    rank = 4
    targets = big_shapes.default_lora_targets(family)
    with torch.device("meta"):
        model = big_shapes.build(family, "unet")
    expected = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))
    shapes = big_shapes.lora_shapes(family, rank)
    assert sum(np.prod(s) for s in shapes) == expected > 0
    assert all(rank in s for s in shapes)


def test_adam_state_bytes_are_what_bitsandbytes_allocates():
    bnb = pytest.importorskip("bitsandbytes")  # the optional dependency of hardware=low_memory
    for shape in [(4, 320), (4, 1280), (3072, 4), (1000, 7), (5000,)]:
        param = torch.nn.Parameter(torch.randn(*shape))
        param.grad = torch.randn(*shape)
        optimizer = bnb.optim.AdamW8bit([param])
        optimizer.step()
        allocated = sum(v.untyped_storage().nbytes() for v in optimizer.state[param].values() if torch.is_tensor(v))
        assert big_shapes.adam_state_bytes(param.numel(), "adamw8bit") == allocated, shape
    optimizer = torch.optim.AdamW([param := torch.nn.Parameter(torch.randn(300, 7))])
    param.grad = torch.randn(300, 7)
    optimizer.step()
    allocated = sum(v.untyped_storage().nbytes() for v in optimizer.state[param].values() if torch.is_tensor(v))
    assert big_shapes.adam_state_bytes(param.numel(), "adamw") == allocated


def test_live_bytes_counts_storages_from_allocation_to_release():
    with big_shapes.LiveBytes() as live:
        a = torch.ones(1000, 1000)  # 4,000,000 bytes
        b = a * 2  # + 4,000,000
        view = b[:10]  # a view: nothing new
        del a  # released
        c = b + 1  # 8,000,000 alive again, never 12,000,000
    assert live.peak == 8_000_000 and live.now == 8_000_000
    del b, c, view
    assert live.now == 0


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_fake_traced_step_allocates_what_the_real_step_does(family):
    """The estimate traces the full shapes on fake tensors; the same LoRA step (bf16 autocast, checkpointing)
    on real tensors, computed here on a small model of the same class, peaks at the same bytes."""
    config = gpu_backbones.tiny_configs(family)["unet"]
    fake = big_shapes.trace_lora_step(family, 64, 2, fake=True, unet_config=config)
    real = big_shapes.trace_lora_step(family, 64, 2, fake=False, unet_config=config)
    assert fake.parameter_bytes == real.parameter_bytes and fake.gradient_bytes == real.gradient_bytes
    # within a few small tensors' bytes (kernel scratch such as attention's log-sum-exp rows, which a real
    # CPU kernel allocates and a fake one may size differently): 16 KB of 1.5 GB at the reduced real shapes
    assert abs(fake.peak_bytes - real.peak_bytes) <= 64 * 1024
    assert real.gradient_bytes == 4 * real.lora_parameters  # the adapters' fp32 gradients, nothing else's


def test_the_estimate_is_the_sum_of_its_parts():
    trace = big_shapes.StepTrace(family="flux", resolution=1024, batch=2, depth=None, fake=True, peak_bytes=0,
                                 parameter_bytes=23_000_000_000, gradient_bytes=40_000_000,
                                 activation_bytes=5_000_000_000, lora_parameters=10)
    est = big_shapes.estimate_lora("flux", trace, rank=4)
    counts = big_shapes.PUBLISHED["flux"]
    state = sum(big_shapes.adam_state_bytes(int(np.prod(s)), "adamw8bit") for s in big_shapes.lora_shapes("flux", 4))
    without = 23_000_000_000 + 40_000_000 + 5_000_000_000 + state + 2 * counts["vae"]
    assert est["total_without_text_encoders_bytes"] == without
    assert est["text_encoders"] == {"text_encoder": 2 * 123_060_480, "text_encoder_2": 2 * 4_762_310_656}
    assert est["total_bytes"] == without + 2 * (123_060_480 + 4_762_310_656)
    assert est["text_encoders"]["text_encoder_2"] / 1e9 == pytest.approx(9.52, abs=0.01)  # "T5-XXL: ~9 GB in bf16"
    assert est["target_gb"] == 40.0


def test_the_benchmark_measures_the_tiny_flux_rows(tmp_path):
    result = main(["--quick", "--backbone", "flux", "--methods", "lora", "--out", str(tmp_path)])
    rows = {row["id"]: row for row in result["rows"]}
    assert result["meta"]["shape"] == "tiny_flux" and result["training"]["lora"]["stages"]["lora"]["floor"]
    for id_ in ("step_vs_floor/lora", "naive_vs_ours/lora", "peak_memory/lora"):
        assert rows[id_]["value"] is not None and rows[id_]["status"] != "error", rows[id_]["why"]
    assert parse_args(["--backbone", "sdxl"]).methods == ["lora", "dreambooth", "finetune"]


def test_the_gpu_script_runs_its_cpu_path(tmp_path):
    """The prepared GPU script (benchmarks/gpu_backbones.py) on small models of the same classes: the real
    module trains LoRA with the low-memory switches, and the text encoders leave after the first step."""
    out = tmp_path / "gpu.json"
    results = gpu_backbones.main(["--tiny", "--families", "flux", "--warmup", "0", "--steps", "2", "--out", str(out)])
    r = results["flux"]
    assert json.loads(out.read_text())["flux"]["lora_parameters"] == r["lora_parameters"] > 0
    assert r["gradient_checkpointing"] is True and r["optimizer"] in ("AdamW8bit", "AdamW") and r["loss_finite"]
    assert r["precision"] == "bf16-mixed" and len(r["step_s"]) == 1
