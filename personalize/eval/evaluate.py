"""Evaluate every checkpoint of a run dir on the prompt protocols: images on disk, metrics in
`metrics.jsonl`, and W&B.

What a run dir holds after an evaluation:

    metrics.jsonl                              one JSON record per checkpoint step x protocol (x settings)
    eval/step-000300/<protocol>/pXX_iXX.png    the generated images (prompt XX, image XX)
    eval/step-000300/<protocol>/spec.json      what decides those images; they are reused only if it matches
    eval/step-000300/<protocol>/grid.png       the grid that went to W&B

The expensive things happen once per evaluation:
- the base pipeline is loaded once and each checkpoint is applied to it in turn (`apply_checkpoint`);
- the `prior` protocol's base-model images are generated before any checkpoint is applied, into the
  shared class-image cache (keyed by model, prompt, sampler, steps, guidance, resolution, seed), so every
  run on the same base model and class reuses them;
- CLIP/DINO are loaded once, and the reference features (the subject's photos; the base images for
  `prior`) are encoded once, not per checkpoint;
- generation is batched across prompts (image j of every prompt always uses seed + j), in batches aligned
  to the sample index: a resumed evaluation remakes a batch with holes whole, so it repeats the
  uninterrupted evaluation's batch shapes and bits.

Resuming. A (checkpoint, protocol) pair is done when metrics.jsonl has a record for its step and protocol
with the same settings (`key`: generation settings + evaluation models) and every requested metric
(`done_records`, `is_done`). Done pairs are skipped; images already on disk (each written atomically) are
reused, so a killed evaluation restarts where it stopped, and asking for one more metric later re-scores
the images on disk without generating them again. metrics.jsonl is rewritten atomically per record, so
it never holds a half line. Readers take the last record per (step, protocol, key) (`latest_records`).
Records of other settings stay in the file; the images on disk are those of the latest settings.
A checkpoint folder rewritten in place (a training resumed over it) is not detected: delete its records.
One evaluation per run dir at a time (two concurrent ones could each drop the other's appended record).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from personalize import instrument
from personalize.rundir import CheckpointInfo, load_run_config
from personalize.errors import PersonalizeError
from personalize.io import read_jsonl
from personalize.signals import raise_if_interrupted

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"
SPEC_FILE = "spec.json"
GRID_FILE = "grid.png"
# Columns of a record that say what was evaluated; the metric values sit beside them under their names.
RECORD_FIELDS = ("step", "stage", "stage_step", "method", "subject", "checkpoint", "protocol", "references",
                 "num_images", "metric_settings", "key", "spec", "seconds", "time", "base_images")


# ----------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class EvalSettings:
    """`conf/eval` as plain values."""

    protocols: tuple[str, ...]
    metrics: tuple[str, ...]
    images_per_prompt: Mapping[str, int]
    clip_model: str | None
    dino_model: str | None
    tiny_models: bool
    fid_features: str
    sampler: str = "dpm_multistep"
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 8
    every_checkpoint: bool = True
    base_image_dir: Path | None = None
    grid_size: int = 16
    progress_bar: bool = True
    enabled: bool = True

    @classmethod
    def from_cfg(cls, eval_cfg: DictConfig | Mapping) -> "EvalSettings":
        c = OmegaConf.to_container(eval_cfg, resolve=True) if isinstance(eval_cfg, DictConfig) else dict(eval_cfg)
        if not c.get("enabled", True):
            return cls(protocols=(), metrics=(), images_per_prompt={}, clip_model=None, dino_model=None,
                       tiny_models=False, fid_features="clip", enabled=False)
        ipp = c.get("images_per_prompt") or {}
        if not isinstance(ipp, Mapping):
            raise PersonalizeError(
                f"eval.images_per_prompt must map protocol -> count (e.g. eval.images_per_prompt.simple=8), got {ipp!r}")
        return cls(
            protocols=tuple(str(p) for p in c["protocols"]), metrics=tuple(str(m) for m in c["metrics"]),
            images_per_prompt={str(k): int(v) for k, v in ipp.items() if v is not None},
            clip_model=_opt_str(c.get("clip_model")), dino_model=_opt_str(c.get("dino_model")),
            tiny_models=bool(c.get("tiny_models", False)), fid_features=str(c.get("fid_features", "inception")),
            sampler=str(c.get("sampler", "dpm_multistep")), steps=int(c.get("steps", 25)),
            guidance_scale=float(c.get("guidance_scale", 7.5)), seed=int(c.get("seed", 0)),
            batch_size=int(c.get("batch_size", 8)), every_checkpoint=bool(c.get("every_checkpoint", True)),
            base_image_dir=Path(c["base_image_dir"]) if c.get("base_image_dir") else None,
            grid_size=int(c.get("grid_size", 16)), progress_bar=bool(c.get("progress_bar", True)),
        )

    def per_prompt(self, protocol: str) -> int | None:
        """Images per prompt of `protocol`: the configured count, else the protocol's own default."""
        return self.images_per_prompt.get(protocol)

    def spec(self, protocol: str, images_per_prompt: int) -> dict[str, Any]:
        """Everything that decides a pair's numbers besides the checkpoint: generation + evaluation models."""
        spec = {
            "protocol": protocol, "images_per_prompt": images_per_prompt, "sampler": self.sampler,
            "steps": self.steps, "guidance_scale": self.guidance_scale, "seed": self.seed,
            "clip_model": self.clip_model, "dino_model": self.dino_model, "fid_features": self.fid_features,
        }
        if self.fid_features == "inception":
            # Inception FID/IS used to go through torchmetrics' version-dependent resize: records from
            # before the explicit resize have another key, so their pairs are scored again (from disk).
            from personalize.eval.metrics import INCEPTION_RESIZE

            spec["inception_resize"] = INCEPTION_RESIZE
        return spec


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


GENERATION_KEYS = ("protocol", "images_per_prompt", "sampler", "steps", "guidance_scale", "seed")


def spec_key(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(spec), sort_keys=True).encode()).hexdigest()[:12]


def _protocol_size(name: str, images_per_prompt: int | None) -> int:
    from personalize.eval.protocols import build_protocol

    return len(build_protocol(name, "x", "thing", "object", images_per_prompt))


def check_settings(settings: EvalSettings) -> None:
    """Fail before any training step (or any generation) on settings the evaluation would reject later.

    Checks names, counts (FID needs two images on each side), the optional Inception extra, and that
    hub models are in the cache when the hub is off (HF_HUB_OFFLINE). Loads nothing.
    """
    from personalize.eval.metrics import FID_FEATURES, FIDELITY_HINT, METRIC_NAMES, _has_torch_fidelity
    from personalize.eval.protocols import PROTOCOLS

    if not settings.enabled:
        return
    if not settings.protocols:
        raise PersonalizeError(f"eval.protocols is empty: choose from {list(PROTOCOLS)} (or eval=none to skip evaluation)")
    for kind, names, known in (("protocol", settings.protocols, PROTOCOLS), ("metric", settings.metrics, METRIC_NAMES)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PersonalizeError(f"unknown eval {kind}(s) {unknown}: choose from {list(known)}")
        if len(set(names)) != len(names):
            raise PersonalizeError(f"eval {kind}s are listed twice: {list(names)}")
    if not settings.metrics:
        raise PersonalizeError(f"eval.metrics is empty: choose from {list(METRIC_NAMES)}")
    if settings.fid_features not in FID_FEATURES:
        raise PersonalizeError(f"unknown eval.fid_features '{settings.fid_features}': choose from {list(FID_FEATURES)}")
    uses_features = {"fid", "is"} & set(settings.metrics)
    if uses_features and settings.fid_features == "inception" and not _has_torch_fidelity():
        raise PersonalizeError(f"eval metrics {sorted(uses_features)} with Inception features need torch-fidelity: {FIDELITY_HINT}")
    if "is" in settings.metrics and settings.fid_features == "dino":
        raise PersonalizeError("IS needs class logits, which DINO has not: set eval.fid_features=clip or inception")
    for name in settings.protocols:
        n = settings.per_prompt(name)
        if n is not None and n < 1:
            raise PersonalizeError(f"eval.images_per_prompt.{name} must be >= 1, got {n}")
        if "fid" in settings.metrics and _protocol_size(name, n) < 2:
            raise PersonalizeError(
                f"FID needs at least 2 generated images, but protocol '{name}' makes {_protocol_size(name, n)}: "
                f"raise eval.images_per_prompt.{name} or drop fid from eval.metrics")
    if settings.batch_size < 1:
        raise PersonalizeError(f"eval.batch_size must be >= 1, got {settings.batch_size}")
    needed = _needed_encoders(settings.metrics, settings.fid_features)
    for kind in sorted(needed):
        name = settings.clip_model if kind == "clip" else settings.dino_model
        if not name:
            raise PersonalizeError(f"eval metrics {list(settings.metrics)} need a {kind.upper()} model: set eval.{kind}_model")
        if not settings.tiny_models:
            _check_available(name)


def _needed_encoders(metrics: Iterable[str], fid_features: str) -> set[str]:
    """Which of "clip" / "dino" the metrics need (FID and IS on CLIP/DINO features need them too)."""
    metrics = set(metrics)
    needed = set()
    if metrics & {"clip_i", "clip_t", "clip_score"} or (metrics & {"fid", "is"} and fid_features == "clip"):
        needed.add("clip")
    if "dino" in metrics or ("fid" in metrics and fid_features == "dino"):
        needed.add("dino")
    return needed


def _check_available(name: str) -> None:
    """A local folder must exist; a hub id must be cached when the hub is switched off."""
    import os

    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")):
        raise PersonalizeError(f"evaluation model folder '{name}' does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise PersonalizeError(
                f"evaluation model '{name}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: run "
                f"`hf download {name}` first, use model=tiny, or skip evaluation with eval=none")


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def done_records(run_dir: Path) -> list[dict]:
    """Every record in `<run>/metrics.jsonl`, in file order (a line that does not parse is skipped, with a warning)."""
    return [r for r in read_jsonl(metrics_path(run_dir), log) if {"step", "protocol", "key"} <= r.keys()]


def latest_records(records: Iterable[dict]) -> dict[tuple[int, str, str], dict]:
    """(step, protocol, key) -> the last record written for it (later records extend earlier ones)."""
    latest: dict[tuple[int, str, str], dict] = {}
    for record in records:
        latest[(int(record["step"]), str(record["protocol"]), str(record["key"]))] = record
    return latest


def is_done(records: Iterable[dict], step: int, protocol: str, key: str, metrics: Sequence[str]) -> dict | None:
    """The record that already holds every metric of (step, protocol, key), or None."""
    record = latest_records(records).get((int(step), protocol, key))
    if record is not None and all(m in record for m in metrics):
        return record
    return None


def append_record(run_dir: Path, record: dict) -> None:
    """Add one record to metrics.jsonl, atomically (the whole file is rewritten under a temp name)."""
    from personalize.io import atomic_write_text

    path = metrics_path(run_dir)
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    atomic_write_text(path, text + json.dumps(record, allow_nan=False) + "\n")


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------
# the evaluation


def image_name(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:02d}_i{image_index:02d}.png"


def protocol_dir(run_dir: Path, checkpoint: Path, protocol: str) -> Path:
    return Path(run_dir) / EVAL_DIR / Path(checkpoint).name / protocol


def reference_images(run_cfg: DictConfig) -> list:
    """The subject's photos as the training saw them (upright RGB, center square at the model's resolution)."""
    from personalize.data import Subject, center_crop_resize, list_images, open_rgb

    subject = Subject.from_cfg(run_cfg.subject)
    resolution = int(run_cfg.model.resolution)
    return [center_crop_resize(open_rgb(p), resolution) for p in list_images(subject.data_dir)]


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def make_grid(images: Sequence, max_tile: int = 256):
    """A near-square grid of PIL images (tiles downscaled to at most `max_tile` px)."""
    from PIL import Image

    tile = min(max_tile, max(max(im.size) for im in images))
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * tile, rows * tile), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((tile, tile)) if image.size != (tile, tile) else image, ((i % cols) * tile, (i // cols) * tile))
    return grid


def _grid_samples(samples: Sequence, size: int) -> list:
    """The first image of each prompt (several-prompt protocols), else the first images of the prompt."""
    firsts = [s for s in samples if s.image_index == 0]
    return (firsts if len(firsts) > 1 else list(samples))[:size]


@dataclass
class Pair:
    """One checkpoint x protocol to evaluate."""

    checkpoint: Path
    info: CheckpointInfo
    protocol: Any  # personalize.eval.protocols.Protocol
    spec: dict
    key: str

    @property
    def step(self) -> int:
        return self.info.step


@dataclass
class Evaluator:
    """Holds what is loaded once per evaluation: the base pipeline, the encoders, the reference features."""

    run_dir: Path
    run_cfg: DictConfig
    settings: EvalSettings
    model_cfg: DictConfig
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    pipe: Any = None
    applied: Path | None = None
    base_dir: Path | None = None  # where the prior protocol's base images are
    _metric_sets: dict[str, dict] = field(default_factory=dict)
    _encoders: dict[str, Any] = field(default_factory=dict)

    # -- models, loaded on first use ----------------------------------------------------------------

    def pipeline(self):
        if self.pipe is None:
            from personalize.backbones import load_pipeline
            from personalize.models import make_sampler

            log.info("eval: loading the base model %s", self.model_cfg.pretrained)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what training left in the caching allocator
            self.pipe = make_sampler(load_pipeline(self.model_cfg, dtype=self.dtype), self.settings.sampler).to(self.device)
            instrument.publish("eval.pipeline", self.pipe)  # the benchmark times its UNet calls
        return self.pipe

    def use_checkpoint(self, checkpoint: Path) -> None:
        from personalize.artifacts import apply_checkpoint

        if self.applied != checkpoint:
            apply_checkpoint(self.pipeline(), checkpoint)
            self.applied = checkpoint

    @instrument.timed("eval.encoders")
    def encoders(self) -> tuple[Any, Any]:
        """(clip, dino) encoders as needed by the metrics (None where not needed); loaded once."""
        from personalize.eval.metrics import ClipEncoder, DinoEncoder

        s = self.settings
        needed = _needed_encoders(s.metrics, s.fid_features)
        if "clip" in needed and "clip" not in self._encoders:
            path = s.clip_model
            if s.tiny_models:
                from personalize.eval.standins import ensure_tiny_clip

                path = str(ensure_tiny_clip(path))
            self._encoders["clip"] = ClipEncoder(path, device=self.device)
        if "dino" in needed and "dino" not in self._encoders:
            path = s.dino_model
            if s.tiny_models:
                from personalize.eval.standins import ensure_tiny_dino

                path = str(ensure_tiny_dino(path))
            self._encoders["dino"] = DinoEncoder(path, device=self.device)
        return self._encoders.get("clip"), self._encoders.get("dino")

    def metric_set(self, references: str, images_fn) -> dict:
        """The metrics scored against one reference set ("subject" or "base"), references encoded once."""
        if references not in self._metric_sets:
            from personalize.eval.metrics import build_metrics, set_references

            clip, dino = self.encoders()
            with warnings.catch_warnings():  # IS keeps its features: a few hundred images here, not a dataset
                warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                metrics = build_metrics(list(self.settings.metrics), clip, dino, self.settings.fid_features, self.device)
            set_references(metrics, images_fn())
            self._metric_sets[references] = metrics
        return self._metric_sets[references]

    # -- generation ---------------------------------------------------------------------------------

    @instrument.timed("eval.generate")
    @torch.no_grad()
    def generate(self, samples: Sequence) -> list:
        """PIL images for protocol samples, one CPU generator per image seeded with the sample's seed."""
        from personalize.sample import seeded_images

        return seeded_images(self.pipeline(), [s.prompt for s in samples], [s.seed for s in samples],
                             self.settings.steps, self.settings.guidance_scale, int(self.model_cfg.resolution))

    def base_images(self, protocol) -> list:
        """The prior protocol's images from the base model, from (or into) the shared class-image cache.

        Must run before any checkpoint is applied to the pipeline (the caller orders it so).
        """
        from personalize.class_images import ClassImageSpec, ensure_class_images
        from personalize.models import resolve_pretrained

        if self.applied is not None:
            raise RuntimeError("base images must be generated before a checkpoint is applied")
        s = self.settings
        spec = ClassImageSpec(
            model=resolve_pretrained(self.model_cfg), revision=self.model_cfg.get("revision"),
            prompt=protocol.prompts[0], negative_prompt="", sampler=s.sampler, steps=s.steps,
            guidance_scale=s.guidance_scale, resolution=int(self.model_cfg.resolution), seed=s.seed,
        )
        root = s.base_image_dir or Path(self.run_dir) / EVAL_DIR / "base"
        paths = ensure_class_images(spec, protocol.images_per_prompt, root, self.pipeline,
                                    batch_size=s.batch_size, device=self.device)
        self.base_dir = paths[0].parent
        return [_open_image(p) for p in paths]

    # -- one pair -----------------------------------------------------------------------------------

    @instrument.timed("eval.pair")  # one checkpoint x protocol: generation, metrics, grid, record
    def evaluate_pair(self, pair: Pair) -> dict:
        from tqdm.auto import tqdm

        from personalize.eval.metrics import compute_metrics, metric_settings, reset_metrics, update_metrics
        from personalize.io import atomic_save_image, atomic_write_json

        start = time.time()
        protocol = pair.protocol
        out = protocol_dir(self.run_dir, pair.checkpoint, protocol.name)
        _prepare_image_dir(out, pair, atomic_write_json)
        references = "base" if protocol.name == "prior" else "subject"
        metrics = self._metric_sets[references]
        reset_metrics(metrics)
        self.use_checkpoint(pair.checkpoint)

        samples = list(protocol.samples())
        bar = tqdm(total=len(samples), desc=f"eval {pair.checkpoint.name} {protocol.name}", unit="img",
                   disable=not self.settings.progress_bar, leave=False)
        for begin in range(0, len(samples), self.settings.batch_size):
            raise_if_interrupted("evaluation", run_dir=self.run_dir)  # a signal: stop before the next batch
            chunk = samples[begin:begin + self.settings.batch_size]
            paths = [out / image_name(s.prompt_index, s.image_index) for s in chunk]
            missing = [i for i, p in enumerate(paths) if not p.exists()]
            images = [None if i in missing else _open_image(p) for i, p in enumerate(paths)]
            if missing:
                # the whole batch, even if only some of it is missing: another batch shape would change the
                # missing images' low bits, and a resumed evaluation must equal an uninterrupted one
                generated = self.generate(chunk)
                for i in missing:
                    atomic_save_image(generated[i], paths[i])
                    images[i] = generated[i]
            update_metrics(metrics, images, [s.clean_prompt for s in chunk])
            bar.update(len(chunk))
        bar.close()
        scores = compute_metrics(metrics)

        grid = make_grid([_open_image(out / image_name(s.prompt_index, s.image_index))
                          for s in _grid_samples(samples, self.settings.grid_size)])
        atomic_save_image(grid, out / GRID_FILE)
        info = pair.info
        record = {
            "step": pair.step, "stage": info.stage, "stage_step": info.stage_step,
            "method": info.method, "subject": info.subject, "checkpoint": pair.checkpoint.name,
            "protocol": protocol.name, "references": references, "num_images": len(samples),
            **{name: _finite_or_none(value) for name, value in scores.items()},
            # how each number was computed (implementation, versions, features, resize): see metric_settings
            "metric_settings": metric_settings(metrics),
            "key": pair.key, "spec": pair.spec, "seconds": round(time.time() - start, 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if references == "base":
            record["base_images"] = str(self.base_dir)
        append_record(self.run_dir, record)
        log.info("eval %s %s: %s", pair.checkpoint.name, protocol.name,
                 ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if math.isfinite(v)))
        return record


def _prepare_image_dir(out: Path, pair: Pair, write_json) -> None:
    """Keep images on disk only if they came from the same generation settings and prompts."""
    wanted = {k: pair.spec[k] for k in GENERATION_KEYS}
    wanted["prompts"] = list(pair.protocol.prompts)
    spec_file = out / SPEC_FILE
    if spec_file.exists():
        try:
            same = json.loads(spec_file.read_text()) == wanted
        except json.JSONDecodeError:
            same = False
        if same:
            return
        for stale in out.glob("p*_i*.png"):
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(spec_file, wanted)


def _pairs(run_dir: Path, settings: EvalSettings) -> list[Pair]:
    from personalize.rundir import list_checkpoints, read_info
    from personalize.eval.protocols import build_protocol

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise PersonalizeError(f"no checkpoints under '{run_dir}/checkpoints': nothing to evaluate")
    if not settings.every_checkpoint:
        checkpoints = checkpoints[-1:]
    pairs = []
    for checkpoint in checkpoints:
        info = read_info(checkpoint)
        for name in settings.protocols:
            protocol = build_protocol(name, info.identifier, info.class_noun, info.kind,
                                      settings.per_prompt(name), settings.seed, info.phrase)
            spec = settings.spec(name, protocol.images_per_prompt)
            pairs.append(Pair(checkpoint, info, protocol, spec, spec_key(spec)))
    return pairs


def evaluate_run(run_dir: Path, eval_cfg: DictConfig | Mapping, run_cfg: DictConfig | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, logger: Any = None) -> list[dict]:
    """Evaluate the run's checkpoints x protocols; returns the records of this evaluation (done before or now).

    `run_cfg`: the run's config (default: its config.yaml) for the subject's photos and the base model.
    `logger`: a Lightning WandbLogger (or None) that gets eval/<protocol>/<metric> at each checkpoint's
    step, a grid per checkpoint x protocol and, at the end, the eval/summary table.
    """
    settings = EvalSettings.from_cfg(eval_cfg)
    if not settings.enabled:
        log.info("evaluation disabled (eval=none)")
        return []
    check_settings(settings)
    run_dir = Path(run_dir)
    run_cfg = run_cfg if run_cfg is not None else load_run_config(run_dir)
    pairs = _pairs(run_dir, settings)
    model_cfg = OmegaConf.create(pairs[0].info.model)

    records = done_records(run_dir)
    results = [is_done(records, p.step, p.protocol.name, p.key, settings.metrics) for p in pairs]
    todo = [pair for pair, done in zip(pairs, results) if done is None]
    for done in filter(None, results):  # the W&B run at hand gets the whole evaluation, earlier pairs included
        log_record(logger, done, run_dir, settings.metrics)
    log.info("eval: %d checkpoint(s) x %d protocol(s): %d pair(s) to evaluate, %d already in %s",
             len({p.checkpoint for p in pairs}), len(settings.protocols), len(todo), len(pairs) - len(todo), METRICS_FILE)
    if todo:
        evaluator = Evaluator(run_dir, run_cfg, settings, model_cfg, device, dtype)
        if any(p.protocol.name != "prior" for p in todo):  # the subject's photos, encoded once
            evaluator.metric_set("subject", lambda: reference_images(run_cfg))
        prior = next((p for p in todo if p.protocol.name == "prior"), None)
        if prior is not None:  # base images first, while the pipeline is still the base model
            evaluator.metric_set("base", lambda: evaluator.base_images(prior.protocol))
        for index, pair in enumerate(pairs):  # checkpoint-major: each checkpoint is applied once
            if results[index] is None:
                results[index] = evaluator.evaluate_pair(pair)
                log_record(logger, results[index], run_dir, settings.metrics)
    log_summary(logger, results, settings.metrics)
    return list(results)


# ----------------------------------------------------------------------------------------------------
# reporting


def metric_columns(records: Sequence[dict], metrics: Sequence[str] | None = None) -> list[str]:
    from personalize.eval.metrics import METRIC_NAMES

    names = list(metrics) if metrics else [m for m in METRIC_NAMES if any(m in r for r in records)]
    return [m for m in names if any(m in r for r in records)]


def log_record(logger, record: dict, run_dir: Path, metrics: Sequence[str] | None = None) -> None:
    """eval/<protocol>/<metric> at the checkpoint's step (Lightning's WandbLogger puts it on the
    trainer/global_step axis), and the pair's grid as eval/<protocol>/grid. No-op without a logger."""
    if not logger:
        return
    step = int(record["step"])
    values = {f"eval/{record['protocol']}/{m}": record[m] for m in metric_columns([record], metrics)
              if record.get(m) is not None}
    if values:
        logger.log_metrics(values, step=step)
    grid = Path(run_dir) / EVAL_DIR / record["checkpoint"] / record["protocol"] / GRID_FILE
    if grid.exists() and hasattr(logger, "log_image"):
        logger.log_image(key=f"eval/{record['protocol']}/grid", images=[str(grid)], step=step,
                         caption=[f"{record['checkpoint']} {record['protocol']}"])


def log_summary(logger, records: Sequence[dict], metrics: Sequence[str] | None = None) -> None:
    """The eval/summary table: one row per checkpoint x protocol, one column per metric."""
    if not logger or not records or not hasattr(logger, "log_table"):
        return
    columns = metric_columns(records, metrics)
    header = ["step", "stage", "stage_step", "protocol", *columns]
    rows = [[r["step"], r.get("stage"), r.get("stage_step"), r["protocol"], *(r.get(m) for m in columns)] for r in records]
    logger.log_table(key="eval/summary", columns=header, data=rows)


def format_table(records: Sequence[dict], metrics: Sequence[str] | None = None) -> str:
    """A fixed-width table: one row per checkpoint step x protocol, one column per metric."""
    columns = metric_columns(records, metrics)
    header = ["step", "stage", "protocol", *columns]
    rows = [[str(r["step"]), str(r.get("stage", "")), r["protocol"],
             *("-" if r.get(m) is None else f"{r[m]:.4f}" for m in columns)] for r in records]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    align = ["<" if i in (1, 2) else ">" for i in range(len(header))]
    lines = ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)) for row in [header, *rows]]
    return "\n".join(lines)


def print_table(records: Sequence[dict], run_dir: Path) -> None:
    if not records:
        return
    print(f"\nmetrics per checkpoint x protocol ({Path(run_dir) / METRICS_FILE}):")
    print(format_table(records))


# ----------------------------------------------------------------------------------------------------
# `personalize-eval run_dir=<run>`


def _with_eval_models(container: dict) -> dict:
    """Runs written before evaluation existed have no model.eval_models: take them from conf/model/<name>."""
    model = container.get("model") or {}
    if "eval_models" not in model:
        from personalize.config import CONF_DIR

        source = CONF_DIR / "model" / f"{model.get('name')}.yaml"
        if not source.exists():
            raise PersonalizeError(
                f"the run's model '{model.get('name')}' has no eval_models: set eval.clip_model, eval.dino_model, "
                "eval.tiny_models and eval.fid_features on the command line")
        model["eval_models"] = OmegaConf.to_container(OmegaConf.load(source).eval_models, resolve=False)
    return container


def eval_config(cli_cfg: DictConfig) -> DictConfig:
    """The run's own config with this command's eval, logger, hardware and cache paths in place of its own."""
    run_dir = Path(str(cli_cfg.run_dir)).expanduser()
    container = OmegaConf.to_container(load_run_config(run_dir), resolve=False)
    cli = OmegaConf.to_container(cli_cfg, resolve=False)
    for key in ("eval", "logger", "hardware"):
        container[key] = cli[key]
    paths = dict(container.get("paths") or {})
    paths.update({k: v for k, v in cli["paths"].items() if k != "output_dir"})
    container["paths"] = paths
    container["task_name"] = cli.get("task_name", "eval")
    if cli.get("tags"):
        container["tags"] = list(container.get("tags") or []) + list(cli["tags"])
    container["run_dir"] = str(run_dir)
    return OmegaConf.create(_with_eval_models(container))


def evaluate_run_dir(cli_cfg: DictConfig) -> list[dict]:
    """Re-evaluate an existing run dir (no training), logging to a new W&B run (job type `eval`) in it."""
    from personalize.tracking import build_logger, finishing_wandb
    from personalize.train import device_of, resolve_hardware

    cfg = eval_config(cli_cfg)
    run_dir = Path(cfg.run_dir)
    accelerator, _, dtype = resolve_hardware(cfg.hardware)
    check_settings(EvalSettings.from_cfg(cfg.eval))
    with finishing_wandb():
        logger = build_logger(cfg, run_dir) if EvalSettings.from_cfg(cfg.eval).enabled else False
        records = evaluate_run(run_dir, cfg.eval, run_cfg=cfg, device=device_of(accelerator), dtype=dtype, logger=logger)
    return records
