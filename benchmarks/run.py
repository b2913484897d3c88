"""`python -m benchmarks`: run every measurement, print the table, write the JSON.

Each method is measured in a fresh worker process (so its peak memory is its own), then the generation
figures in one more; `--quick` (the smoke mode of the test) runs everything in this process on the tiny
model. See docs/benchmark.md for what each figure means.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import diffusers
import lightning
import torch
import transformers

from benchmarks.catalog import method_names, variants
from benchmarks.measure import Clock
from benchmarks.models import ensure_eval_models, ensure_model, parameter_counts, resolution_of
from benchmarks.report import all_rows, format_table
from benchmarks.sampling import bench_class_images, bench_evaluation
from benchmarks.training import Plan, bench_method, compose_method, instrumented_fit
from personalize.cli import quiet_libraries
from personalize.config import PROJECT_ROOT
from personalize.io import atomic_write_json
from personalize.backbones import load_pipeline
from personalize.train import prepare_run

REPO_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds `benchmarks/` and `personalize/`

# --backbone: the tiny model of that family (the test suite's), measured on the rows the issue asks for
BACKBONE_SHAPES = {"sdxl": "tiny_sdxl", "flux": "tiny_flux"}
BACKBONE_METHODS = ("lora", "dreambooth", "finetune")

DEFAULTS = {  # per mode: training plan and generation reps / short steps (None: the full step counts)
    "quick": dict(plan=Plan(warmup=1, steps=2, class_images=2, save_reps=1, progress_bar=False), gen_reps=1, gen_steps=2),
    "cpu": dict(plan=Plan(warmup=2, steps=10, naive_every=2), gen_reps=3, gen_steps=4),
    "cuda": dict(plan=Plan(warmup=5, steps=20, naive_every=2), gen_reps=3, gen_steps=None),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Training-step, generation, end-to-end and memory figures of every method, as ratios "
                    "measured in one run (see docs/benchmark.md).",
    )
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny model, 2 timed steps, one process (seconds)")
    p.add_argument("--sd21", action="store_true", help="full SD 2.1-base shapes (random weights; for a GPU)")
    p.add_argument("--backbone", choices=sorted(BACKBONE_SHAPES), default=None,
                   help="the tiny SDXL or FLUX.1 model instead of the SD bench model: training rows of the methods "
                        "that apply to it (default: lora, dreambooth, finetune; no variants, no generation)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when there is one)")
    p.add_argument("--hardware", default=None, help="conf/hardware option (default: cpu on CPU, auto on GPU)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to measure (default: every conf/method/*.yaml but _*)")
    p.add_argument("--variants", default=None,
                   help="comma-separated option variants of benchmarks/variants.yaml to measure, or none "
                        "(default: those of the methods measured)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per stage and path")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per stage and path")
    p.add_argument("--gen-reps", type=int, default=None, help="reps of each generation measurement")
    p.add_argument("--gen-steps", type=int, default=None,
                   help="denoising steps actually run per generation call (extrapolated to the configured counts)")
    p.add_argument("--full-gen", action="store_true", help="run generation at the full step counts (no extrapolation)")
    p.add_argument("--skip-generation", action="store_true", help="training figures only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default on CPU: 1, immune to a busy neighbour; see the docs)")
    p.add_argument("--out", default=None, help="folder for <timestamp>.json (default: outputs/bench)")
    p.add_argument("--in-process", action="store_true", help="no worker processes (peak memory is then cumulative)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override of the train config for every run, e.g. --set hardware.compile_unet=true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.backbone and args.sd21:
        p.error("--backbone and --sd21 choose different models: give one")
    if args.backbone and args.methods is None:
        args.methods = ",".join(BACKBONE_METHODS)
    if args.backbone and args.variants is None:  # the variants are SD LoRA options (text-encoder LoRA: SD only)
        args.variants = "none"
    known = method_names()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else known
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        p.error(f"--methods has {unknown[0]!r}, which is not a method of conf/method/: choose from {', '.join(known)}")
    by_name = {v.name: v for v in variants()}
    if args.variants is None:
        args.variants = [name for name, v in by_name.items() if v.method in args.methods]
    elif args.variants.strip() == "none":
        args.variants = []
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in args.variants if v not in by_name]
        if unknown:
            p.error(f"--variants has {unknown[0]!r}, which is not a variant of benchmarks/variants.yaml: "
                    f"choose from {', '.join(by_name)}, or none")
    return args


def training_jobs(args) -> list[tuple[str, str, list[str]]]:
    """(run name, method, its own overrides) of every training worker, each variant right after its plain
    method (so the two, whose steps the vs_plain rows compare, run as close in time as they can)."""
    chosen = [v for v in variants() if v.name in args.variants]
    jobs = []
    for method in args.methods:
        jobs.append((method, method, []))
        jobs += [(v.name, v.method, list(v.overrides)) for v in chosen if v.method == method]
    return jobs + [(v.name, v.method, list(v.overrides)) for v in chosen if v.method not in args.methods]


# ------------------------------------------------------------------ workers (in a child process or in this one)
def _setup_process(threads: int | None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    quiet_libraries()
    if threads:
        torch.set_num_threads(threads)


def train_worker(spec: dict) -> dict:
    _setup_process(spec.get("threads"))
    plain = (spec["plain"], spec.get("plain_overrides", [])) if spec.get("plain") else None
    return bench_method(spec["method"], Path(spec["model_dir"]), spec["resolution"], spec["hardware"],
                        Plan(**spec["plan"]), spec.get("overrides", []), plain=plain)


def generation_worker(spec: dict) -> dict:
    """Class images (item 3) and evaluation (item 5), on a real one-step textual-inversion run's checkpoint."""
    _setup_process(spec.get("threads"))
    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    try:
        clip, dino = spec["eval_models"]
        evaluation = [f"eval.clip_model={clip}", f"eval.dino_model={dino}", "eval.tiny_models=false",
                      "eval.fid_features=clip", f"eval.base_image_dir={work / 'base'}"]
        one_step = Plan(warmup=0, steps=1, class_images=1, progress_bar=False)
        cfg, _ = compose_method("textual_inversion", Path(spec["model_dir"]), spec["resolution"], spec["hardware"],
                                work, one_step, spec.get("overrides", []), evaluation=evaluation)
        run = prepare_run(cfg)
        instrumented_fit(run)
        clock = Clock(run.device)
        start = clock()
        pipe = load_pipeline(cfg.model, dtype=run.frozen_dtype).to(run.device)
        load_s = clock() - start
        reps, steps = spec["gen_reps"], spec["gen_steps"]
        result = {"class_pipeline_load_s": load_s,
                  "samples_images": len(cfg.samples.prompts) * int(cfg.samples.num_images)}
        result["class_images"] = bench_class_images(pipe, cfg, run.device, clock, reps, steps)
        del pipe
        gc.collect()
        result["evaluation"] = bench_evaluation(run, cfg.eval, clock, reps, steps)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


WORKERS = {"train": train_worker, "generation": generation_worker}


def _worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[spec["kind"]](spec)
    Path(spec["result"]).write_text(json.dumps(result, default=str))


def run_worker(spec: dict, in_process: bool, log_dir: Path) -> dict:
    """The worker's result, or {"error": ...} (the benchmark goes on and the row says so)."""
    name = spec.get("name", spec["kind"])
    if in_process:
        try:
            return WORKERS[spec["kind"]](spec)
        except Exception as error:  # noqa: BLE001 - one failing measurement must not lose the others
            traceback.print_exc()
            return {"error": f"{type(error).__name__}: {error}"}
    log_dir.mkdir(parents=True, exist_ok=True)
    result_path = log_dir / f"{name}.result.json"
    spec_path = log_dir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(dict(spec, result=str(result_path))))
    env = dict(os.environ)
    # `benchmarks` sits beside the package, not in it: the worker finds it from any working directory
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "--worker", str(spec_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text().strip().splitlines()[-1:] if log_path.exists() else []
        return {"error": f"worker exited with {proc.returncode}: {' '.join(tail)} (log: {log_path})"}
    return json.loads(result_path.read_text())


# ------------------------------------------------------------------ the run
def _meta(args, shape: str, device: str, hardware: str, threads, plan: Plan, gen_reps, gen_steps) -> dict:
    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:], "shape": shape, "device": device,
        "hardware": hardware, "threads_per_process": threads or torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "lightning": lightning.__version__},
        "plan": asdict(plan), "gen_reps": gen_reps, "gen_steps": gen_steps, "overrides": args.overrides,
        "variants": {v.name: list(v.overrides) for v in variants() if v.name in args.variants},
        "loadavg_start": os.getloadavg(),
    }
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    if shape in ("bench", "sd21"):
        meta["parameters_m"] = parameter_counts(shape)
    return meta


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return None
    threads_before = torch.get_num_threads()
    try:
        return _run(args)
    finally:  # an in-process run (the test) gives the caller its threads back
        torch.set_num_threads(threads_before)


def _run(args) -> dict:
    started = time.perf_counter()
    _setup_process(None)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA GPU is visible (a CPU-only torch?); use --device cpu")
    if args.sd21 and device == "cpu":
        print("bench: warning: SD 2.1-base shapes on a CPU take minutes per step and ~15 GB for fine-tuning",
              flush=True)
    mode = "quick" if args.quick else device
    defaults = DEFAULTS["cuda" if mode == "cuda" else mode]
    shape = ("tiny" if args.quick else "sd21" if args.sd21 else "bench") if not args.backbone else BACKBONE_SHAPES[args.backbone]
    if args.backbone:  # the generation figures (class images, evaluation) are measured on the SD model
        args.skip_generation = True
    hardware = args.hardware or ("cpu" if device == "cpu" else "auto")
    threads = args.threads or (1 if device == "cpu" else None)
    plan = Plan(**dict(asdict(defaults["plan"]), **{k: v for k, v in (("steps", args.steps), ("warmup", args.warmup))
                                                    if v is not None}))
    if plan.steps < 1 or plan.warmup < 0:
        raise SystemExit("bench: --steps must be at least 1 and --warmup at least 0")
    gen_reps = args.gen_reps or defaults["gen_reps"]
    gen_steps = None if args.full_gen else (args.gen_steps or defaults["gen_steps"])
    in_process = args.quick or args.in_process
    if in_process and threads:
        torch.set_num_threads(threads)

    cache = Path(os.environ.get("PERSONALIZE_CACHE", PROJECT_ROOT / ".cache"))
    out_dir = Path(args.out or Path(os.environ.get("PERSONALIZE_OUTPUTS", PROJECT_ROOT / "outputs")) / "bench")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    log_dir = out_dir / f"{stamp}-logs"
    print(f"bench: {shape} model on {device} (hardware={hardware}, {threads or torch.get_num_threads()} thread(s) per "
          f"process), {plan.warmup}+{plan.steps} steps per stage and path", flush=True)
    start = time.perf_counter()
    model_dir = ensure_model(shape, cache)
    eval_models = [str(p) for p in ensure_eval_models(cache, tiny=shape == "tiny" or bool(args.backbone))]
    print(f"  models ready in {time.perf_counter() - start:.0f} s: {model_dir}", flush=True)
    meta = _meta(args, shape, device, hardware, threads, plan, gen_reps, gen_steps)
    common = dict(model_dir=str(model_dir), resolution=resolution_of(shape), hardware=hardware, threads=threads,
                  overrides=args.overrides, plan=asdict(plan))

    training: dict = {}
    jobs = training_jobs(args)
    for i, (name, method, overrides) in enumerate(jobs, 1):
        start = time.perf_counter()
        spec = dict(common, kind="train", name=name, method=method, overrides=[*args.overrides, *overrides])
        if overrides:  # a variant: its plain method's floor is timed beside its steps (the vs_plain yardstick)
            spec.update(plain=method, plain_overrides=list(args.overrides))
        training[name] = run_worker(spec, in_process, log_dir)
        note = training[name].get("error", "")
        print(f"  [{i}/{len(jobs)}] {name}: {time.perf_counter() - start:.0f} s {note}", flush=True)
    gen: dict = {"skipped": "skipped (--skip-generation)"}
    if not args.skip_generation:
        start = time.perf_counter()
        gen = run_worker(dict(common, kind="generation", eval_models=eval_models, gen_reps=gen_reps,
                              gen_steps=gen_steps), in_process, log_dir)
        print(f"  generation: {time.perf_counter() - start:.0f} s {gen.get('error', '')}", flush=True)

    rows, e2e = all_rows(training, gen)
    meta.update(loadavg_end=os.getloadavg(), elapsed_s=time.perf_counter() - started)
    result = {"meta": meta, "rows": rows, "e2e": e2e, "training": training, "generation": gen}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stamp}.json"
    atomic_write_json(path, result)
    print()
    print(format_table(rows))
    if args.quick:
        print("\n--quick: a smoke run on the tiny model; its ratios are not performance figures.")
    print(f"\n{shape} model, {device}, {meta['threads_per_process']} thread(s); load average "
          f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}; {meta['elapsed_s']:.0f} s. JSON: {path}")
    return result
