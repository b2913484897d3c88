"""The Evaluator: what is loaded once per evaluation (the base pipeline, CLIP/DINO, the reference
features) and the evaluation of one checkpoint x protocol pair, from generation to its metrics record."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from personalize import instrument
from personalize.eval.images import grid_samples, make_grid, open_image, prepare_image_dir
from personalize.eval.settings import GENERATION_KEYS, EvalSettings, needed_encoders
from personalize.io import atomic_save_image
from personalize.rundir import GRID_FILE, CheckpointInfo, append_record, base_images_dir, eval_dir, image_name
from personalize.sample import seeded_images
from personalize.signals import raise_if_interrupted

log = logging.getLogger(__name__)


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


def base_image_spec(model_cfg, settings: EvalSettings, prompt: str):
    """What decides the prior protocol's base-model images: their key in the shared class-image cache.

    The model, its revision and model.vae (another VAE decodes other pixels: SDXL's fp16-fix), as the training
    class images' spec names them (train.class_image_spec), and the evaluation's own sampling settings."""
    from personalize.class_images import ClassImageSpec
    from personalize.models import resolve_pretrained

    return ClassImageSpec(
        model=resolve_pretrained(model_cfg), revision=model_cfg.get("revision"),
        prompt=prompt, negative_prompt="", sampler=settings.sampler, steps=settings.steps,
        guidance_scale=settings.guidance_scale, resolution=int(model_cfg.resolution), seed=settings.seed,
        vae=str(model_cfg.vae) if model_cfg.get("vae") else None,
    )


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


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
    # (diffusers, transformers and torchmetrics are imported here, when an evaluation needs them)

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
        from personalize.eval.standins import ensure_tiny_clip, ensure_tiny_dino

        s = self.settings
        needed = needed_encoders(s.metrics, s.fid_features)
        if "clip" in needed and "clip" not in self._encoders:
            path = str(ensure_tiny_clip(s.clip_model)) if s.tiny_models else s.clip_model
            self._encoders["clip"] = ClipEncoder(path, device=self.device)
        if "dino" in needed and "dino" not in self._encoders:
            path = str(ensure_tiny_dino(s.dino_model)) if s.tiny_models else s.dino_model
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
        return seeded_images(self.pipeline(), [s.prompt for s in samples], [s.seed for s in samples],
                             self.settings.steps, self.settings.guidance_scale, int(self.model_cfg.resolution))

    def base_images(self, protocol) -> list:
        """The prior protocol's images from the base model, from (or into) the shared class-image cache.

        Must run before any checkpoint is applied to the pipeline (the caller orders it so).
        """
        from personalize.class_images import ensure_class_images

        if self.applied is not None:
            raise RuntimeError("base images must be generated before a checkpoint is applied")
        s = self.settings
        spec = base_image_spec(self.model_cfg, s, protocol.prompts[0])
        root = s.base_image_dir or base_images_dir(self.run_dir)
        paths = ensure_class_images(spec, protocol.images_per_prompt, root, self.pipeline,
                                    batch_size=s.batch_size, device=self.device)
        self.base_dir = paths[0].parent
        return [open_image(p) for p in paths]

    # -- one pair -----------------------------------------------------------------------------------

    @instrument.timed("eval.pair")  # one checkpoint x protocol: generation, metrics, grid, record
    def evaluate_pair(self, pair: Pair) -> dict:
        from personalize.eval.metrics import compute_metrics, metric_settings, reset_metrics, update_metrics

        start = time.time()
        protocol = pair.protocol
        out = eval_dir(self.run_dir, pair.checkpoint, protocol.name)
        prepare_image_dir(out, {k: pair.spec[k] for k in GENERATION_KEYS}, protocol.prompts)
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
            images = [None if i in missing else open_image(p) for i, p in enumerate(paths)]
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

        grid = make_grid([open_image(out / image_name(s.prompt_index, s.image_index))
                          for s in grid_samples(samples, self.settings.grid_size)])
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
