"""Crash, resume and determinism.

Runs killed with SIGKILL (real subprocesses, killed mid-write by tests/crash.py) continue where they
stopped and, on CPU, end bit-identical to runs that were never interrupted; the same config and seed
give the same bits.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from personalize.config import PROJECT_ROOT
from personalize.errors import PersonalizeError
from personalize.io import atomic_write_text, remove_stale_temps
from personalize.resume import SafetensorsCheckpointIO, find_run, list_resume_states
from personalize.tracking import resolved_config
from personalize.train import fit, prepare_run
from tests.wandb_offline import offline_runs

COMMON = ["eval=none", "subject=sample_dog"]  # make_cfg adds debug=default; the CLI gets it below
# two stages with checkpoints in both, so a resume from stage 1 has to cross into stage 2
TWO_STAGE = ["method=two_stage", "method.stages.token.steps=4", "method.stages.token.checkpoint_every=2",
             "method.stages.token.lr=5e-2", "method.stages.unet.steps=4", "method.stages.unet.checkpoint_every=2",
             "method.stages.unet.lr=1e-3"]
COMMON_EVAL = ["subject=sample_dog", "eval.protocols=[simple,jindal]"]
# class_images.seed: a cache folder of its own; batch_size=3 with the debug count of 4: the kill (in image
# #2) lands inside batch [0,3), and the last batch [3,6) is padded beyond the count
DREAMBOOTH = ["method=dreambooth", "method.stages.unet.steps=2", "method.stages.unet.checkpoint_every=1",
              "method.stages.unet.lr=1e-3", "class_images.seed=777", "class_images.batch_size=3"]


def personalize(*args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (`kill`: where tests/crash.py SIGKILLs it). It inherits this process's
    environment (the test cache, thread count), so its numbers can be compared bit for bit with ours."""
    command = ["-m", "tests.crash", kill] if kill else ["-m", "personalize.cli"]
    return subprocess.run([sys.executable, *command, "debug=default", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=600)


def run_dirs(log_dir: Path) -> list[Path]:
    return sorted(p.parent for p in log_dir.glob("train/runs/*/config.yaml"))


OUTPUTS = ("checkpoints", "samples", "resume", "eval")


def assert_same_outputs(a: Path, b: Path) -> None:
    """Every weight (tensor for tensor) and image (byte for byte) of two run dirs is identical."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".safetensors", ".png")
                   and p.relative_to(a).parts[0] in OUTPUTS)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.suffix in (".safetensors", ".png")
                           and p.relative_to(b).parts[0] in OUTPUTS)
    assert any(f.suffix == ".png" for f in files) and any(f.suffix == ".safetensors" for f in files)
    for f in files:
        if f.suffix == ".png":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
        else:
            x, y = load_file(a / f), load_file(b / f)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


# Not compared: wall-clock fields. (The Inception Score is: its split shuffle is seeded in eval/metrics.py.)
UNCOMPARED = {"seconds", "time"}


def records(run_dir: Path, ignore=UNCOMPARED) -> dict:
    """The metrics of a run by (step, protocol)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({(r["step"], r["protocol"]) for r in lines}) == len(lines)
    return {(r["step"], r["protocol"]): {k: v for k, v in r.items() if k not in ignore} for r in lines}


# ---------------------------------------------------------------- killed runs
def test_run_killed_in_training_and_in_evaluation_resumes_bit_identical(tmp_path, make_cfg):
    args = [*COMMON_EVAL, *TWO_STAGE, f"paths.log_dir={tmp_path / 'out'}"]
    killed = personalize(*args, kill="resume-save:4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    [run_dir] = run_dirs(tmp_path / "out")
    # the kill hit the resume state of step 4: its half-written staging folder is there, and is not trusted
    assert [s.name for s in list_resume_states(run_dir)] == ["step-000002"]
    assert any(p.name.startswith(".step-000004.") for p in (run_dir / "resume").iterdir())

    # resumed from step 2 (across the stage boundary) to the end, then killed writing the 4th eval record
    killed = personalize(*args, f"resume={run_dir}", kill="eval-record:3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert f"resuming {run_dir} from step-000002" in killed.stdout + killed.stderr
    assert [p.name for p in (run_dir / "resume").iterdir()] == ["step-000008"]  # leftovers gone, one state kept
    done = (run_dir / "metrics.jsonl").read_text()
    assert len(done.splitlines()) == 3

    resumed = personalize(*args, "resume=true")  # finds the run by its settings; training is complete
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} from step-000008" in resumed.stdout + resumed.stderr
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert metrics.startswith(done) and len(metrics.splitlines()) == 8  # 4 checkpoints x 2 protocols, none twice
    assert run_dirs(tmp_path / "out") == [run_dir]  # every call wrote into the original run dir
    assert not list(run_dir.rglob("*.tmp"))  # the half-written metrics.jsonl of the kill was cleared

    reference = fit(prepare_run(make_cfg(*COMMON_EVAL, *TWO_STAGE, name="uninterrupted")))
    assert_same_outputs(run_dir, reference.run_dir)
    assert records(run_dir) == records(reference.run_dir)


def test_class_image_generation_killed_fills_only_what_is_missing(tmp_path, make_cfg, isolated_cache):
    args = [*COMMON, *DREAMBOOTH, f"paths.log_dir={tmp_path / 'out'}"]
    killed = personalize(*args, kill="class-image:2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    [folder] = [p.parent for p in (isolated_cache / "class_images").glob("*/spec.json")
                if json.loads(p.read_text())["seed"] == 777]
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png"]
    assert any(p.name.endswith(".tmp") for p in folder.iterdir())  # the half-written image #2
    first = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    [run_dir] = run_dirs(tmp_path / "out")

    resumed = personalize(*args, "resume=true")  # finds the killed run by its settings
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"resuming {run_dir} from the start" in log and "generating 2 of 4 class images" in log
    assert "(2 batch(es) of 3, aligned to the image index)" in log  # [0,3) again, whole, for #2; then [3,6)
    left = sorted(p.name for p in folder.iterdir() if p.name != ".lock")  # the lock file is not data
    assert left == ["00000.png", "00001.png", "00002.png", "00003.png", "spec.json"]
    assert all(folder.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in first.items())  # not redone
    assert run_dirs(tmp_path / "out") == [run_dir] and (run_dir / "checkpoints" / "step-000002").is_dir()

    # the images equal a generation that was never interrupted (same batch size, same machine: the resume
    # remade batch [0,3) whole, so #2 had the same neighbours), and so does the training on them
    from personalize.class_images import ClassImageSpec, ensure_class_images
    from personalize.backbones import load_pipeline

    cfg = make_cfg(*COMMON, *DREAMBOOTH, name="uninterrupted")
    spec = ClassImageSpec(**json.loads((folder / "spec.json").read_text()))
    fresh = ensure_class_images(spec, 4, tmp_path / "fresh", lambda: load_pipeline(cfg.model),
                                batch_size=int(cfg.class_images.batch_size))
    assert [p.read_bytes() for p in fresh] == [folder.joinpath(p.name).read_bytes() for p in fresh]
    assert_same_outputs(run_dir, fit(prepare_run(cfg)).run_dir)


# ---------------------------------------------------------------- which run, which state
def saved_run(root: Path, name: str, cfg) -> Path:
    run_dir = root / "train" / "runs" / name
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg))))
    return run_dir


def test_resume_finds_the_run_with_the_same_settings(make_cfg, tmp_path):
    log_dir = f"paths.log_dir={tmp_path}"
    wanted = saved_run(tmp_path, "a_two_stage", make_cfg("method=two_stage", log_dir))
    time.sleep(0.01)
    saved_run(tmp_path, "b_two_stage_other_lr", make_cfg("method=two_stage", "method.stages.unet.lr=1e-5", log_dir))
    saved_run(tmp_path, "c_finetune", make_cfg("method=finetune", log_dir))
    cfg = make_cfg("method=two_stage", "resume=true", log_dir)
    assert find_run(cfg, resolved_config(cfg)) == wanted
    cfg = make_cfg("method=two_stage", "resume=true", "seed=3", log_dir)
    assert find_run(cfg, resolved_config(cfg)) is None  # nothing like it yet: a new run
    cfg = make_cfg("method=two_stage", log_dir)
    assert find_run(cfg, resolved_config(cfg)) is None  # resume=false (the default)

    # an explicit run dir: the same structure may change its lr or length (logged); another method may not
    cfg = make_cfg("method=two_stage", "method.stages.unet.lr=1e-4", "method.stages.unet.steps=900", f"resume={wanted}")
    assert find_run(cfg, resolved_config(cfg)) == wanted
    cfg = make_cfg("method=finetune", f"resume={wanted}")
    with pytest.raises(PersonalizeError, match="cannot resume .* method: 'two_stage' -> 'finetune'"):
        find_run(cfg, resolved_config(cfg))
    cfg = make_cfg("method=two_stage", f"resume={tmp_path}")
    with pytest.raises(PersonalizeError, match="not a run dir of `personalize`"):
        find_run(cfg, resolved_config(cfg))


def test_resume_state_format_round_trips_without_pickle(tmp_path):
    checkpoint = {
        "global_step": 7, "state_dict": {"unet.w": torch.randn(3, 2), "token.rows": torch.ones(1, 4, dtype=torch.bfloat16)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 5e-6, "betas": (0.9, 0.999), "params": [0], "foreach": None}]}],
        "loops": {"x": {"is_last_batch": True, "ratio": math.inf}}, "rng": {"python": (3, (1, 2, 3), None)},
    }
    io = SafetensorsCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state.json", "tensors.safetensors"]
    loaded = io.load_checkpoint(tmp_path / "state")
    assert loaded["optimizer_states"][0]["state"][0]["step"] == torch.tensor(7.0)  # int keys stay ints
    assert loaded["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert loaded["rng"]["python"] == (3, (1, 2, 3), None) and loaded["loops"]["x"]["ratio"] == math.inf
    assert torch.equal(loaded["state_dict"]["token.rows"], checkpoint["state_dict"]["token.rows"])
    with pytest.raises(TypeError, match="cannot store a object at '/bad'"):
        io.save_checkpoint({"bad": object()}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))  # nothing half-written


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".00003.png.{dead_pid}.tmp").write_bytes(b"half")
    (tmp_path / f".step-000004.{dead_pid}.abc_123").mkdir()
    (tmp_path / f".00004.png.{os.getpid()}.tmp").write_bytes(b"mine, still being written")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "eval" / "step-000002").mkdir(parents=True)
    (tmp_path / "eval" / "step-000002" / f".p00_i00.png.{dead_pid}.tmp").write_bytes(b"half")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".00003.png.{dead_pid}.tmp", f".step-000004.{dead_pid}.abc_123"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".hydra", "eval", f".00004.png.{os.getpid()}.tmp"])
    assert [p.name for p in remove_stale_temps(tmp_path, recursive=True)] == [f".p00_i00.png.{dead_pid}.tmp"]
    assert not list((tmp_path / "eval" / "step-000002").iterdir())


# ---------------------------------------------------------------- determinism
def test_same_config_and_seed_give_bit_identical_weights_images_and_metrics(make_cfg):
    first = fit(prepare_run(make_cfg(*COMMON_EVAL, *TWO_STAGE, name="first")))
    second = fit(prepare_run(make_cfg(*COMMON_EVAL, *TWO_STAGE, name="second")))
    assert_same_outputs(first.run_dir, second.run_dir)
    metrics = records(first.run_dir, ignore={"seconds", "time"})
    assert len(metrics) == 8 and all("is" in r and "clip_i" in r for r in metrics.values())
    assert metrics == records(second.run_dir, ignore={"seconds", "time"})  # every metric, Inception Score included

    other = fit(prepare_run(make_cfg(*COMMON, *TWO_STAGE, "seed=1", name="other-seed")))
    last = "checkpoints/step-000008/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(first.run_dir / last), load_file(other.run_dir / last)
    assert not all(torch.equal(a[k], b[k]) for k in a), "the seed must matter"

    # resuming a finished run trains nothing: its checkpoints stay as they were
    mtimes = {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*.safetensors")}
    again = prepare_run(make_cfg(*COMMON, *TWO_STAGE, f"resume={first.run_dir}", name="again"))
    assert again.run_dir == first.run_dir and again.resume_from.name == "step-000008"
    fit(again)
    assert {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*.safetensors")} == mtimes


def test_a_resumed_run_continues_the_same_wandb_run(make_cfg):
    from personalize.train import train

    quick = ("method=finetune", "subject=sample_dog", "method.stages.unet.steps=4", "method.stages.unet.checkpoint_every=2",
             "logger=wandb_offline", "eval=none")
    first = train(make_cfg(*quick))
    # wandb names offline run folders to the second; a real resume comes long after the crash
    time.sleep(1.1)
    train(make_cfg(*quick, f"resume={first.run_dir}", name="again"))
    ids = {p.name.rsplit("-", 1)[-1] for p in offline_runs(first.run_dir)}
    assert len(offline_runs(first.run_dir)) == 2 and len(ids) == 1, offline_runs(first.run_dir)
