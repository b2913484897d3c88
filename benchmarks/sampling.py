"""Generation figures: class images (ours ÷ the stock default sampler) and evaluation (ours ÷ a raw pipe call).

Both sides of each ratio run through the same pipeline object, interleaved rep by rep (ABBA order).

A pipeline call costs `fixed + calls x (UNet call + sampler step)`: one UNet call per denoising step
(classifier-free guidance doubles the batch of that call, not the number of calls), plus fixed work
(prompt encoding, VAE decode, PNG writes, the framework's own work). Forward hooks on the UNet timestamp
the start and end of every call, so each measured pipeline call splits into its fixed part (measured:
before the first UNet call and after the last), its UNet calls and the sampler's work between them.
On a CPU the full step counts would take minutes per image, so by default every call runs
`short_steps` steps and is extrapolated: `fixed + calls at full steps x (UNet call + sampler step)`.
The count of calls at full steps comes from the sampler itself (PNDM makes 51 calls for 50 steps). When
both sides call the UNet with the same batch, the UNet-call time is pooled over both sides (it is the
same computation), so its noise does not tilt the ratio. `--full-gen` runs the real counts.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.measure import Clock, ratios, summary
from personalize import instrument
from personalize.artifacts import apply_checkpoint
from personalize.class_images import ensure_class_images
from personalize.data import Subject
from personalize.eval.evaluate import evaluate_run
from personalize.eval.settings import EvalSettings
from personalize.eval.protocols import build_protocol
from personalize.backbones import load_pipeline
from personalize.models import make_sampler
from personalize.rundir import EVAL_DIR, metrics_path
from personalize.train import class_image_spec


class UNetCalls:
    """(start, end) of every UNet forward of a pipeline."""

    def __init__(self, pipe, clock: Clock):
        self.clock = clock
        self.calls: list[list[float]] = []
        self.handles = [pipe.unet.register_forward_pre_hook(self._pre), pipe.unet.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self.calls.append([self.clock()])

    def _post(self, module, args, output):
        self.calls[-1].append(self.clock())

    def take(self) -> list[tuple[float, float]]:
        calls, self.calls = [tuple(c) for c in self.calls if len(c) == 2], []
        return calls

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def calls_at(scheduler, steps: int) -> int:
    """UNet calls a pipeline makes with `scheduler` at `steps` inference steps."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(steps)
    return len(fresh.timesteps)


class Side:
    """One side of a ratio: its measured pipeline calls, extrapolated to the full step count."""

    def __init__(self, name: str, images_per_call: int, full_calls: int):
        self.name, self.images, self.full_calls = name, images_per_call, full_calls
        self.records: list[dict] = []
        self.unet_s: float | None = None  # pooled UNet-call time, when set by the caller

    def add(self, seconds: float, calls: list[tuple[float, float]], extra: dict | None = None) -> None:
        unet = [end - start for start, end in calls]
        gaps = [nxt[0] - cur[1] for cur, nxt in pairwise(calls)]  # the sampler's step + guidance between calls
        span = calls[-1][1] - calls[0][0] if calls else 0.0
        self.records.append(dict(seconds=seconds, calls=len(calls), unet=unet, gaps=gaps, span=span, **(extra or {})))

    def own_unet_s(self) -> float:
        return summary(d for r in self.records for d in r["unet"])["median"] or 0.0

    def gap_s(self) -> float:
        return summary(d for r in self.records for d in r["gaps"])["median"] or 0.0

    def fixed_s(self) -> list[float]:
        """Measured per call: everything but the UNet calls and the sampler steps between them."""
        return [r["seconds"] - r["span"] - (self.gap_s() if r["calls"] else 0.0) for r in self.records]

    def full_seconds(self) -> list[float]:
        """Each rep's time at the full step count (as measured when it ran them all)."""
        per_call = (self.unet_s if self.unet_s is not None else self.own_unet_s()) + self.gap_s()
        return [fixed + self.full_calls * per_call for fixed in self.fixed_s()]

    def images_per_s(self) -> list[float]:
        return [self.images / s for s in self.full_seconds()]

    def report(self) -> dict:
        return {
            "images_per_call": self.images, "calls_measured": [r["calls"] for r in self.records],
            "calls_full": self.full_calls, "unet_call_s": summary(d for r in self.records for d in r["unet"]),
            "unet_call_used_s": self.unet_s if self.unet_s is not None else self.own_unet_s(),
            "sampler_step_s": self.gap_s(), "measured_s": summary(r["seconds"] for r in self.records),
            "fixed_s": summary(self.fixed_s()), "full_s": summary(self.full_seconds()),
            "images_per_s": summary(self.images_per_s()),
            "extra": [{k: v for k, v in r.items() if k not in ("unet", "gaps")} for r in self.records],
        }


def pool_unet_time(a: Side, b: Side, same_batch: bool) -> None:
    """Both sides extrapolate with the median UNet-call time over both (only when the batches match)."""
    if same_batch:
        pooled = summary([d for side in (a, b) for r in side.records for d in r["unet"]])["median"]
        a.unet_s = b.unet_s = pooled


def abba(reps: int):
    """Order of the two sides over `reps` rounds: AB BA AB ... (a linear drift cancels)."""
    for rep in range(reps):
        yield (rep, ("a", "b") if rep % 2 == 0 else ("b", "a"))


# ------------------------------------------------------------------ 3. class images
def bench_class_images(pipe, cfg, device, clock: Clock, reps: int, short_steps: int | None,
                       stock_steps: int = 50, stock_batch: int = 4) -> dict:
    """images/s of `ensure_class_images` (the configured sampler, steps, batch) ÷ the stock pipeline's
    default sampler at `stock_steps` and batch `stock_batch`, images written to disk on both sides."""
    ci = cfg.class_images
    prompt = str(ci.prompt).format(class_noun=cfg.subject.class_noun)
    resolution = int(cfg.model.resolution)
    ours_steps, batch = int(ci.steps), int(ci.batch_size)
    default_scheduler = pipe.scheduler  # the model's own (PNDM for SD 1.x / 2.x-base)
    ours_sampler = make_sampler(pipe, str(ci.sampler)).scheduler
    pipe.scheduler = default_scheduler
    ours = Side("ours", batch, calls_at(ours_sampler, ours_steps))
    stock = Side("stock", stock_batch, calls_at(default_scheduler, stock_steps))
    calls = UNetCalls(pipe, clock)
    work = Path(tempfile.mkdtemp(prefix="bench-class-images-"))
    try:
        def run_ours(rep: int) -> None:
            # the run's own spec; each rep at other seeds, so that it generates instead of reading the cache
            spec = replace(class_image_spec(cfg, Subject.from_cfg(cfg.subject)), steps=short_steps or ours_steps,
                           seed=int(ci.seed) + 1000 * rep)
            calls.take()
            start = clock()
            ensure_class_images(spec, batch, work / f"ours-{rep}", lambda: pipe, batch_size=batch, device=device)
            ours.add(clock() - start, calls.take())

        def run_stock(rep: int) -> None:
            # what the diffusers DreamBooth example does: the pipeline's default sampler and steps, batch 4
            pipe.scheduler = default_scheduler
            calls.take()
            start = clock()
            images = pipe([prompt] * stock_batch, num_inference_steps=short_steps or stock_steps,
                          guidance_scale=float(ci.guidance_scale), height=resolution, width=resolution).images
            for i, image in enumerate(images):
                image.save(work / f"stock-{rep}-{i}.png")
            stock.add(clock() - start, calls.take())

        sides = {"a": run_ours, "b": run_stock}
        for rep, order in abba(reps):
            for side in order:
                sides[side](rep)
    finally:
        calls.remove()
        pipe.scheduler = default_scheduler
        shutil.rmtree(work, ignore_errors=True)
    pool_unet_time(ours, stock, same_batch=batch == stock_batch)
    return {
        "ours": dict(ours.report(), sampler=str(ci.sampler), steps=ours_steps, batch=batch),
        "stock": dict(stock.report(), sampler=type(default_scheduler).__name__, steps=stock_steps, batch=stock_batch),
        "short_steps": short_steps, "ratio": summary(ratios(ours.images_per_s(), stock.images_per_s())),
    }


# ------------------------------------------------------------------ 5. evaluation
class SpanTotals:
    """Listens to `personalize.instrument`: seconds and calls per span name, summed; and forward hooks
    on the UNet of every pipeline the evaluation publishes, so its generation splits like a raw call.

    The spans are the evaluation's own (personalize/eval): `eval.pair` (one checkpoint x protocol),
    `eval.generate`, `eval.encoders` (loading CLIP/DINO), `metrics.build`, `metrics.references`,
    `metrics.update`, `metrics.compute`, `metrics.reset`, `metrics.encode.<clip|dino>` (inside update
    and references) and `load_pipeline`.
    """

    def __init__(self, clock: Clock):
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.unets: list[UNetCalls] = []

    def on_span(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def on_object(self, name: str, obj) -> None:
        if name == "eval.pipeline":
            self.unets.append(UNetCalls(obj, self.clock))

    def listening(self):
        return instrument.listen(self.on_span, on_object=self.on_object, clock=self.clock)

    def take(self) -> tuple[dict[str, float], dict[str, int], list[tuple[float, float]]]:
        """(seconds per span, calls per span, UNet calls of the last published pipeline) since the last
        take; unhooks the pipelines."""
        seconds, counts, self.seconds, self.counts = self.seconds, self.counts, {}, {}
        calls = self.unets[-1].take() if self.unets else []
        for hook in self.unets:
            hook.remove()
        self.unets.clear()
        return seconds, counts, calls


# What the metric share counts per pair, and what happens once per evaluation (reported apart).
PAIR_METRIC_SPANS = ("metrics.update", "metrics.compute", "metrics.reset")
ONCE_METRIC_SPANS = ("eval.encoders", "metrics.references")


def bench_evaluation(run, eval_cfg, clock: Clock, reps: int, short_steps: int | None) -> dict:
    """Our evaluation (`evaluate_run`, one checkpoint x one batch of the `simple` protocol) ÷ a raw pipe call.

    Ours: the generation part of an evaluated pair (the pair's time minus its metric time: generation,
    PNG writes, grid, record). Raw: one `pipe(prompts, generator=...)` call on the same personalized
    pipeline, same sampler, steps, batch and resolution. Metric share: the metric time of the pair
    (update + compute) over the pair's time; loading CLIP/DINO and encoding the references happen once
    per evaluation and are reported apart. The parts of ours are the evaluation's own spans
    (`SpanTotals`), its UNet calls timestamped by hooks on the pipeline it publishes.
    """
    settings = EvalSettings.from_cfg(eval_cfg)
    batch, full_steps = settings.batch_size, settings.steps
    short = short_steps or full_steps
    eval_cfg = OmegaConf.merge(eval_cfg, {"protocols": ["simple"], "images_per_prompt": {"simple": batch},
                                          "steps": short, "progress_bar": False, "every_checkpoint": False})
    checkpoint = run.checkpoints()[-1]
    resolution = int(run.cfg.model.resolution)
    device, dtype = run.device, run.frozen_dtype

    raw_pipe = make_sampler(load_pipeline(run.cfg.model, dtype=dtype), settings.sampler).to(device)
    apply_checkpoint(raw_pipe, checkpoint)
    raw_calls = UNetCalls(raw_pipe, clock)
    full_calls = calls_at(raw_pipe.scheduler, full_steps)
    info = run.module.checkpoint_info
    protocol = build_protocol("simple", run.module.identifier, info["class_noun"], info.get("kind", "object"),
                              batch, settings.seed, info.get("phrase"))
    samples = list(protocol.samples())

    ours, raw = Side("ours", batch, full_calls), Side("raw", batch, full_calls)
    spans = SpanTotals(clock)
    parts = []

    def run_ours(rep: int) -> None:
        for stale in (metrics_path(run.run_dir), run.run_dir / EVAL_DIR):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        with spans.listening():
            start = clock()
            evaluate_run(run.run_dir, eval_cfg, run_cfg=run.cfg, device=device, dtype=dtype)
            total = clock() - start
        took, counts, stamps = spans.take()
        if "eval.pair" not in took or not stamps:
            raise RuntimeError(f"the evaluation reported spans {sorted(took)} and {len(stamps)} UNet calls: "
                               "personalize/eval no longer marks what this benchmark times (personalize.instrument)")
        pair_metrics = sum(took.get(name, 0.0) for name in PAIR_METRIC_SPANS)
        once_metrics = sum(took.get(name, 0.0) for name in ONCE_METRIC_SPANS)
        pair = took["eval.pair"]
        parts.append(dict(took, evaluate_run=total, pair_metrics=pair_metrics, once_metrics=once_metrics,
                          span_calls=counts))
        ours.add(pair - pair_metrics, stamps, {"pair_s": pair, "pair_metrics_s": pair_metrics})

    def run_raw(rep: int) -> None:
        raw_calls.take()
        start = clock()
        generators = [torch.Generator("cpu").manual_seed(int(s.seed)) for s in samples]
        with torch.no_grad():
            raw_pipe([s.prompt for s in samples], num_inference_steps=short, guidance_scale=settings.guidance_scale,
                     generator=generators, height=resolution, width=resolution)
        raw.add(clock() - start, raw_calls.take())

    sides = {"a": run_ours, "b": run_raw}
    try:
        for rep, order in abba(reps):
            for side in order:
                sides[side](rep)
    finally:
        raw_calls.remove()
    pool_unet_time(ours, raw, same_batch=True)
    metric_s = [p["pair_metrics"] for p in parts]
    ours_full = ours.full_seconds()  # generation part of each pair, at full steps
    share = [m / (g + m) for m, g in zip(metric_s, ours_full)]
    return {
        "ours": ours.report(), "raw": raw.report(), "batch": batch, "steps": full_steps, "short_steps": short_steps,
        "sampler": settings.sampler, "metrics": list(settings.metrics), "fid_features": settings.fid_features,
        "ratio": summary(ratios(ours.images_per_s(), raw.images_per_s())),
        "metric_share": summary(share), "metric_pair_s": summary(metric_s),
        "metric_once_s": summary(p["once_metrics"] for p in parts), "parts": parts,
        # image features per encoder, over the whole evaluation (the references' and the pair's)
        "metric_encode_s": {name.rsplit(".", 1)[1]: summary(p.get(name, 0.0) for p in parts)
                            for name in sorted({n for p in parts for n in p if n.startswith("metrics.encode.")})},
        "evaluate_run_s": summary(p["evaluate_run"] for p in parts),
    }

