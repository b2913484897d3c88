"""A preempted or interrupted job loses nothing and does not look successful.

Real signals sent to real `personalize` processes: the test waits until the process is inside the step
(or class-image batch, or evaluation batch) it means, sends SIGTERM/SIGUSR1/SIGINT/SIGUSR2 from outside,
and checks the exit code (128 + the signal), the resume state, the INTERRUPTED note, W&B's record of the
run, and that continuing gives what an uninterrupted run gives, bit for bit (same machine, same settings,
same shapes: the determinism rule of shared/DESIGN.md).

To be at a known point when the signal arrives, the process is started with a `sitecustomize` (on
PYTHONPATH, so it also reaches a submitit job's own process) that pauses once at that point until a
signal has been recorded; it changes nothing else. Without our handlers the signal would kill the
process (exit -15 etc.), so the pause cannot hide a missing handler.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from personalize import signals
from personalize.config import PROJECT_ROOT
from personalize.resume import list_resume_states
from personalize.train import fit, prepare_run
from tests import sweeps
from tests.test_resume import TWO_STAGE, assert_same_outputs, records, run_dirs
from tests.wandb_offline import offline_runs, read_offline_exit

QUICK = ["eval=none", "subject=sample_dog", "samples.num_images=1"]

PAUSE_HOOK = '''
import os

_spec = os.environ.get("PERSONALIZE_TEST_PAUSE")
if _spec:
    import time
    from pathlib import Path

    _point, _at, _marker = _spec.split(":", 2)
    _at, _marker = int(_at), Path(_marker)

    def _pause():
        """Once, in one process (a resumed or requeued process, another DDP rank run through): publish our
        pid (written whole, then renamed: the test must never read half a pid), wait for a recorded signal."""
        try:
            os.close(os.open(_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        from personalize import signals

        tmp = _marker.with_name(_marker.name + ".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, _marker.with_name(_marker.name + ".pid"))
        deadline = time.monotonic() + 300
        while not signals.pending() and time.monotonic() < deadline:
            time.sleep(0.02)

    if _point == "step":  # inside optimizer step number _at (1-based), before its forward pass
        from personalize.methods.module import Personalizer

        _step = Personalizer.training_step

        def _training_step(self, batch, batch_idx):
            if self.global_step == _at - 1:
                _pause()
            return _step(self, batch, batch_idx)

        Personalizer.training_step = _training_step
    elif _point == "class-image":  # while writing class image number _at of this process
        import personalize.class_images as _ci

        _save, _saved = _ci.atomic_save_image, []

        def _save_image(image, path):
            if len(_saved) == _at:
                _pause()
            _save(image, path)
            _saved.append(path)

        _ci.atomic_save_image = _save_image
    elif _point == "eval-batch":  # while generating evaluation batch number _at of this process
        from personalize.eval.evaluator import Evaluator

        _generate, _calls = Evaluator.generate, []

        def _generate_batch(self, samples):
            if len(_calls) == _at:
                _pause()
            _calls.append(len(samples))
            return _generate(self, samples)

        Evaluator.generate = _generate_batch
'''


def environment(tmp_path: Path, pause: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    env.pop("PERSONALIZE_TEST_PAUSE", None)
    if pause:
        hook = tmp_path / "pause_hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
        env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [env.get("PYTHONPATH")])])
        env["PERSONALIZE_TEST_PAUSE"] = pause
    return env


def start(command: list[str], tmp_path: Path, pause: str | None = None) -> subprocess.Popen:
    log = open(tmp_path / f"log-{time.monotonic_ns()}.txt", "w+")
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment(tmp_path, pause), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()  # type: ignore[attr-defined]


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    """The pid the pause hook publishes once a process is at its point."""
    pid_file = marker.with_name(marker.name + ".pid")
    deadline = time.monotonic() + timeout
    while not pid_file.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before the pause point:\n{output(proc)[-3000:]}"
        assert time.monotonic() < deadline, f"never reached the pause point:\n{output(proc)[-3000:]}"
        time.sleep(0.05)
    return int(pid_file.read_text())


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output(proc)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "personalize.cli", "debug=default", *args]


def interrupt_at(pause: str, sig: int, command: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run `command`, send `sig` once it is at `pause`, return its exit code and output."""
    marker = tmp_path / f"at-{pause.replace(':', '-')}"
    proc = start(command, tmp_path, f"{pause}:{marker}")
    pid = wait_for(marker, proc)
    # only ever a process of this test: it carries our marker in its environment
    assert str(marker).encode() in Path(f"/proc/{pid}/environ").read_bytes(), pid
    os.kill(pid, sig)
    return finish(proc)


def note(run_dir: Path) -> dict:
    return json.loads((run_dir / signals.INTERRUPTED_FILE).read_text())


# ---------------------------------------------------------------- training
def test_sigterm_in_training_saves_that_step_exits_143_and_resumes_bit_identical(tmp_path, make_cfg):

    args = [*QUICK, *TWO_STAGE, "logger=wandb_offline", f"paths.log_dir={tmp_path / 'out'}"]
    code, log = interrupt_at("step:3", signal.SIGTERM, cli(*args), tmp_path)
    assert code == 128 + signal.SIGTERM == 143, log[-3000:]
    [run_dir] = run_dirs(tmp_path / "out")
    # step 3 finished and its resume state is there (the checkpoint-every-2 one of step 2 pruned); no
    # stock checkpoint for the odd step, no samples: training stopped right after the step
    assert [s.name for s in list_resume_states(run_dir)] == ["step-000003"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]
    assert not (run_dir / "samples").exists()
    assert json.loads((run_dir / "resume" / "step-000003" / "state.json").read_text())["global_step"] == 3
    marked = note(run_dir)
    assert (marked["signal"], marked["step"], marked["phase"], marked["exit_code"]) == ("SIGTERM", 3, "training", 143)
    assert marked["resume"] == f"resume={run_dir}"
    assert "interrupted: interrupted by SIGTERM during training at step 3" in log
    # W&B: closed with the exit code, marked preempting, the summary says why
    [first] = offline_runs(run_dir)
    ended = read_offline_exit(first)
    assert ended["exit_code"] == 143 and ended["preempting"], ended
    assert (ended["summary"]["interrupted/signal"], ended["summary"]["interrupted/step"]) == ("SIGTERM", 3)

    time.sleep(1.1)  # wandb names offline run folders to the second
    code, log = finish(start(cli(*args, "resume=true"), tmp_path))
    assert code == 0, log[-3000:]
    assert f"resuming {run_dir} from step-000003" in log
    assert not (run_dir / signals.INTERRUPTED_FILE).exists()
    second = [r for r in offline_runs(run_dir) if r != first]
    assert len(second) == 1
    ended = read_offline_exit(second[0])
    assert ended["exit_code"] == 0 and not ended["preempting"], ended
    assert sorted(ended["removed"]) == ["interrupted/phase", "interrupted/signal", "interrupted/step"]
    assert {r.name.rsplit("-", 1)[-1] for r in offline_runs(run_dir)} == {first.name.rsplit("-", 1)[-1]}  # one W&B run

    reference = fit(prepare_run(make_cfg(*QUICK, *TWO_STAGE, name="uninterrupted")))
    assert_same_outputs(run_dir, reference.run_dir)


# ---------------------------------------------------------------- class images
DREAMBOOTH = ["method=dreambooth", "method.stages.unet.steps=2", "method.stages.unet.checkpoint_every=1",
              "method.stages.unet.lr=1e-3", "class_images.seed=4242", "class_images.batch_size=2"]


@pytest.mark.slow  # a subprocess per attempt (~15 s); test_resume covers a killed class-image generation
def test_sigusr1_in_class_image_generation_stops_between_batches_exits_138(tmp_path, isolated_cache):
    from personalize.class_images import ClassImageSpec, ensure_class_images
    from personalize.config import compose
    from personalize.backbones import load_pipeline

    args = [*QUICK, *DREAMBOOTH, f"paths.log_dir={tmp_path / 'out'}"]
    code, log = interrupt_at("class-image:0", signal.SIGUSR1, cli(*args), tmp_path)
    assert code == 128 + signal.SIGUSR1 == 138, log[-3000:]
    [folder] = [p.parent for p in (isolated_cache / "class_images").glob("*/spec.json")
                if json.loads(p.read_text())["seed"] == 4242]
    # the batch the signal came in (images 0 and 1) was finished and written; the next was not begun
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png"]
    [run_dir] = run_dirs(tmp_path / "out")
    marked = note(run_dir)
    assert (marked["signal"], marked["step"], marked["phase"]) == ("SIGUSR1", None, "class-image generation")
    assert not (run_dir / "resume").exists() and not (run_dir / "checkpoints").exists()

    code, log = finish(start(cli(*args, "resume=true"), tmp_path))
    assert code == 0, log[-3000:]
    assert "generating 2 of 4 class images" in log
    assert not (run_dir / signals.INTERRUPTED_FILE).exists() and (run_dir / "checkpoints" / "step-000002").is_dir()
    # equal to a generation that was never interrupted, at the same batch size
    spec = ClassImageSpec(**json.loads((folder / "spec.json").read_text()))
    model = compose("train", ["debug=default"], output_dir=tmp_path / "unused").model
    fresh = ensure_class_images(spec, 4, tmp_path / "fresh", lambda: load_pipeline(model), batch_size=2)
    assert [p.read_bytes() for p in fresh] == [folder.joinpath(p.name).read_bytes() for p in fresh]


# ---------------------------------------------------------------- evaluation
def test_sigint_in_evaluation_stops_between_batches_exits_130_and_resume_completes_it(tmp_path, make_cfg):
    evaluation = ["subject=sample_dog", "eval.protocols=[simple]", "eval.batch_size=1"]
    args = [*evaluation, *TWO_STAGE, f"paths.log_dir={tmp_path / 'out'}"]
    # 4 checkpoints x 2 images, one per batch: the signal comes while batch 2 (the first of step 4) is made
    code, log = interrupt_at("eval-batch:2", signal.SIGINT, cli(*args), tmp_path)
    assert code == 128 + signal.SIGINT == 130, log[-3000:]
    [run_dir] = run_dirs(tmp_path / "out")
    done = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["protocol"]) for r in done] == [(2, "simple")]
    assert len(list((run_dir / "eval" / "step-000004" / "simple").glob("p*_i*.png"))) == 1  # its batch was kept
    marked = note(run_dir)
    assert (marked["signal"], marked["phase"], marked["step"]) == ("SIGINT", "evaluation", None)
    assert [s.name for s in list_resume_states(run_dir)] == ["step-000008"]  # training had finished

    code, log = finish(start(cli(*args, "resume=true"), tmp_path))
    assert code == 0, log[-3000:]
    assert "1 already in metrics.jsonl" in log
    assert not (run_dir / signals.INTERRUPTED_FILE).exists()
    reference = fit(prepare_run(make_cfg(*evaluation, *TWO_STAGE, name="uninterrupted")))
    assert_same_outputs(run_dir, reference.run_dir)
    assert records(run_dir) == records(reference.run_dir)


# ---------------------------------------------------------------- multirun, basic launcher
@pytest.mark.slow  # a two-job sweep run twice (~15 s); the single-run signal tests above stay in the default run
def test_a_sweep_signalled_in_a_job_stops_there_marks_it_interrupted_and_resume_true_continues(tmp_path):
    sweep = [sys.executable, "-m", "personalize.cli", "-m", "debug=default", *QUICK, *TWO_STAGE, "seed=0,1",
             f"paths.log_dir={tmp_path / 'out'}"]
    code, log = interrupt_at("step:3", signal.SIGTERM, sweep, tmp_path)
    assert code == 143, log[-3000:]
    [job] = sorted(p.parent for p in (tmp_path / "out").glob("train/multiruns/*/*/*/config.yaml"))
    assert job.name == "0_two_stage-sample_dog-s0"  # the second job never started: the sweep stopped
    assert note(job)["step"] == 3 and not (job / "FAILED").exists()
    assert "interrupted by SIGTERM during training at step 3" in log and "the sweep stops here" in log

    code, log = finish(start([*sweep, "resume=true"], tmp_path))
    assert code == 0, log[-3000:]
    assert f"resuming {job} from step-000003" in log
    assert not (job / signals.INTERRUPTED_FILE).exists() and (job / "checkpoints" / "step-000008").is_dir()
    jobs = sorted(p.parent.name for p in (tmp_path / "out").glob("train/multiruns/*/*/*/config.yaml"))
    assert jobs == ["0_two_stage-sample_dog-s0", "1_two_stage-sample_dog-s1"]  # seed 1 ran in the new sweep


# ---------------------------------------------------------------- SLURM's code path: submitit, requeue
@pytest.mark.slow  # three processes per attempt, two attempts (about 80 s of CPU)
def test_submitit_job_signalled_usr2_is_requeued_and_resumes_by_itself(tmp_path, make_cfg):
    """SIGUSR2 is what submitit's SLURM jobs get before their time limit (and on preemption, after
    SIGTERM); the local executor runs the same job code and requeues the same way (exit 144, restart)."""
    sweep = [str(sweeps.BIN / "personalize"), "-m", "debug=default", *QUICK, *TWO_STAGE, "hydra/launcher=slurm_local",
             f"paths.log_dir={tmp_path / 'out'}"]
    code, log = interrupt_at("step:3", signal.SIGUSR2, sweep, tmp_path)
    assert code == 0, log[-3000:]  # the requeued job finished: the sweep succeeded, with no user action
    [job] = sorted(p.parent for p in (tmp_path / "out").glob("train/multiruns/*/*/*/config.yaml"))
    job_logs = "\n".join(p.read_text() for p in job.parent.glob(".submitit/*/*_log.*"))
    assert "interrupted by SIGUSR2 during training at step 3" in job_logs
    assert "Requeued job" in job_logs and f"requeued job: continuing its own run {job}" in job_logs
    assert f"resuming {job} from step-000003" in job_logs
    assert not (job / signals.INTERRUPTED_FILE).exists()
    reference = fit(prepare_run(make_cfg(*QUICK, *TWO_STAGE, name="uninterrupted")))
    assert_same_outputs(job, reference.run_dir)


# ---------------------------------------------------------------- the handlers themselves
def test_handlers_record_signals_and_are_restored_and_a_second_ctrl_c_stops_at_once():
    before = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    heard = []

    def earlier(signum, frame):  # e.g. submitit's handler, installed before ours
        heard.append(signum)

    previous_usr2 = signal.signal(signal.SIGUSR2, earlier)
    try:
        with signals.deferred():
            with signals.deferred():  # nested (the CLI, then fit): one install
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(0.05)
            assert signals.pending() == [signal.SIGTERM, signal.SIGUSR2] and heard == []
            with pytest.raises(signals.Interrupted) as stopped:
                signals.raise_if_interrupted("training", step=7, run_dir=Path("/tmp/run"))
            assert stopped.value.exit_code == 143 and str(stopped.value) == "interrupted by SIGTERM during training at step 7"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the first Ctrl-C is recorded like the others
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
        assert signal.getsignal(signal.SIGUSR2) is earlier and signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
        assert signals.pending() == [] and signals.raise_if_interrupted("evaluation") is None  # nothing stale
        signals.pass_on([signal.SIGTERM, signal.SIGUSR2, signal.SIGINT])
        assert heard == [signal.SIGUSR2]  # only a handler someone installed; SIG_DFL and Python's SIGINT are not called
    finally:
        signal.signal(signal.SIGUSR2, previous_usr2)
    assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == before


def test_interrupted_note_is_written_atomically_and_cleared_only_by_the_work_it_names(tmp_path):
    stop = signals.Interrupted([signal.SIGUSR1, signal.SIGTERM], "training", 794, tmp_path)
    signals.mark_interrupted(tmp_path, stop)
    assert [p.name for p in tmp_path.iterdir()] == [signals.INTERRUPTED_FILE]  # no temporary left
    marked = note(tmp_path)
    assert (marked["signal"], marked["signals"], marked["step"], marked["exit_code"]) == ("SIGUSR1", ["SIGUSR1", "SIGTERM"], 794, 138)
    assert not signals.clear_interrupted(tmp_path, phases=("evaluation",))  # an evaluation does not finish training
    assert signals.clear_interrupted(tmp_path) and not (tmp_path / signals.INTERRUPTED_FILE).exists()


# ---------------------------------------------------------------- several processes
@pytest.mark.slow  # two DDP runs of two processes each, and a reference run (about 70 s of CPU)
def test_ddp_ranks_agree_to_stop_at_the_step_one_of_them_was_signalled(tmp_path, make_cfg):
    """Two CPU processes (gloo): only one gets SIGTERM (whichever paused first), both stop after the same
    step (1, not a checkpoint step), one resume state is written, nobody hangs in a collective; resuming
    finishes the run."""
    import torch
    from safetensors.torch import load_file

    from tests.test_ddp import RUN

    args = [*RUN, "hardware=ddp_cpu", "method.batch_size=1", "logger=none", f"paths.log_dir={tmp_path / 'out'}"]
    code, log = interrupt_at("step:1", signal.SIGTERM, cli(*args), tmp_path)
    assert code == 143, log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # really two processes
    assert log.count("interrupted: interrupted by SIGTERM during training at step 1") == 2, log[-4000:]  # each rank
    [run_dir] = run_dirs(tmp_path / "out")
    assert [s.name for s in list_resume_states(run_dir)] == ["step-000001"] and note(run_dir)["step"] == 1
    assert not (run_dir / "checkpoints").exists()

    code, log = finish(start(cli(*args, "resume=true"), tmp_path))
    assert code == 0, log[-4000:]
    assert f"resuming {run_dir} from step-000001" in log and not (run_dir / signals.INTERRUPTED_FILE).exists()
    single = fit(prepare_run(make_cfg(*RUN, "method.batch_size=2", name="single")))
    for file in ("learned_embeds.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        ddp, one = (load_file(d / "checkpoints" / "step-000004" / file) for d in (run_dir, single.run_dir))
        # the tolerance of tests/test_ddp.py: two processes equal one with the same global batch to float reordering
        assert all(torch.allclose(ddp[k], one[k], rtol=0, atol=2e-4) for k in one), file
