"""The evaluation's settings (`conf/eval` as plain values), what decides a pair's numbers (its spec and
key), and the checks that run before any training step or generation."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from personalize.errors import PersonalizeError
from personalize.eval.protocols import PROTOCOLS, build_protocol


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
    real_images: bool = False  # also score the subject's photos against each other (eval/real_images.py)

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
            real_images=bool(c.get("real_images", False)),
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
            from personalize.eval.metrics import INCEPTION_RESIZE  # torchmetrics, transformers: only when asked

            spec["inception_resize"] = INCEPTION_RESIZE
        return spec


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


# The part of a spec that decides the images themselves (the rest decides how they are scored).
GENERATION_KEYS = ("protocol", "images_per_prompt", "sampler", "steps", "guidance_scale", "seed")


def spec_key(spec: Mapping[str, Any]) -> str:
    """A short hash of a spec: the `key` of a metrics record."""
    return hashlib.sha256(json.dumps(dict(spec), sort_keys=True).encode()).hexdigest()[:12]


def _protocol_size(name: str, images_per_prompt: int | None) -> int:
    return len(build_protocol(name, "x", "thing", "object", images_per_prompt))


def check_settings(settings: EvalSettings) -> None:
    """Fail before any training step (or any generation) on settings the evaluation would reject later.

    Checks names, counts (FID needs two images on each side), the optional Inception extra, and that
    hub models are in the cache when the hub is off (HF_HUB_OFFLINE). Loads nothing.
    """
    # the metric names live beside the metrics, which import torchmetrics: imported only once evaluation is on
    from personalize.eval.metrics import FID_FEATURES, FIDELITY_HINT, METRIC_NAMES, _has_torch_fidelity

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
    if settings.real_images and not {"clip_i", "dino"} & set(settings.metrics):
        raise PersonalizeError(f"eval.real_images=true scores the subject's photos against each other with CLIP-I or "
                               f"DINO, but eval.metrics={list(settings.metrics)} has neither: add clip_i or dino to "
                               "eval.metrics, or set eval.real_images=false")
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
    needed = needed_encoders(settings.metrics, settings.fid_features)
    for kind in sorted(needed):
        name = settings.clip_model if kind == "clip" else settings.dino_model
        if not name:
            raise PersonalizeError(f"eval metrics {list(settings.metrics)} need a {kind.upper()} model: set eval.{kind}_model")
        if not settings.tiny_models:
            _check_available(name)


def needed_encoders(metrics: Iterable[str], fid_features: str) -> set[str]:
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
    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")):
        raise PersonalizeError(f"evaluation model folder '{name}' does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache  # only offline: the hub client is not needed otherwise

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise PersonalizeError(
                f"evaluation model '{name}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: run "
                f"`hf download {name}` first, use model=tiny, or skip evaluation with eval=none")
