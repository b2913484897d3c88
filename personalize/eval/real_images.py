"""The "real images" row of a paper's table: the subject's own photos scored against each other.

Ruiz et al. (DreamBooth, Table 1) put it above the methods as the ceiling of subject fidelity: no
generated image can be more like the subject's photos than the photos are like each other. Here it is,
for every run whose evaluation asks for it (`eval.real_images=true`) and whose metrics include CLIP-I or
DINO: per metric, the mean cosine over every pair of distinct photos of the subject. The report
averages it over subjects, as it averages the methods' per-subject values.

Everything is the generated-vs-real metric's: the photos are the references the evaluation compares
generated images with (`images.reference_images`: upright RGB, centre square at the model's resolution),
encoded by the same CLIP / DINO encoders (their own resize, crop and normalisation), as unit vectors.
Only the pairs differ: photo i with photo j != i, instead of generated image i with photo j.

The record goes to metrics.jsonl through the run dir's store like a pair's, once per run (it depends on
the photos, the resolution and the evaluation models, not on any checkpoint), under protocol
`real_images` at step 0 (before any training step), so the rule that says a pair is done says it of
this record too, and `personalize-eval run_dir=<run> eval.real_images=true` adds it to a finished run in
seconds (nothing is generated). W&B gets eval/real_images/<metric> at step 0.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from personalize.eval.evaluator import Evaluator
from personalize.eval.images import reference_images
from personalize.eval.settings import EvalSettings, spec_key
from personalize.rundir import REAL_IMAGES_METRICS, REAL_IMAGES_PROTOCOL, REAL_IMAGES_STEP, append_record, is_done

log = logging.getLogger(__name__)

# each metric that has a real-images value (the keys are rundir.REAL_IMAGES_METRICS) -> the encoder it uses
ENCODER_OF = {"clip_i": "clip", "dino": "dino"}


def real_image_metrics(metrics: Sequence[str]) -> list[str]:
    """The metrics of `metrics` that have a real-images value (CLIP-I, DINO), in their order."""
    return [m for m in metrics if m in REAL_IMAGES_METRICS]


def mean_pairwise_similarity(features: torch.Tensor) -> float:
    """Mean cosine between every two distinct rows of [n, dim] features (n >= 2), in float64.

    The mean over ordered pairs (i, j), i != j, equals the mean over unordered ones (cosine is symmetric):
    the Gram matrix's sum without its diagonal, over n (n - 1)."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"a mean over pairs of distinct photos needs at least 2 photos, got {n}")
    unit = F.normalize(features.double(), dim=-1)
    gram = unit @ unit.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def real_images_spec(settings: EvalSettings, resolution: int) -> dict[str, Any]:
    """What decides the record's numbers: the photos' resolution and the evaluation models."""
    return {"protocol": REAL_IMAGES_PROTOCOL, "resolution": int(resolution), "clip_model": settings.clip_model,
            "dino_model": settings.dino_model}


def pending_spec(records: Sequence[Mapping[str, Any]], settings: EvalSettings, resolution: int) -> dict | None:
    """The spec of the real-images record still to compute, or None: not asked for, no CLIP-I/DINO among
    the metrics, or already in `records` (metrics.jsonl) with this spec and every asked metric."""
    metrics = real_image_metrics(settings.metrics)
    if not settings.real_images or not metrics:
        return None
    spec = real_images_spec(settings, resolution)
    done = is_done(records, REAL_IMAGES_STEP, REAL_IMAGES_PROTOCOL, spec_key(spec), metrics)
    return None if done is not None else spec


def score_photos(photos: Sequence, encoders: Mapping[str, Any], metrics: Sequence[str]) -> dict[str, float]:
    """metric -> mean cosine over the pairs of distinct photos, each metric with its encoder ("clip", "dino")."""
    features: dict[str, torch.Tensor] = {}
    scores = {}
    for metric in real_image_metrics(metrics):
        kind = ENCODER_OF[metric]
        if kind not in features:
            features[kind] = encoders[kind].encode_images(photos)
        scores[metric] = mean_pairwise_similarity(features[kind])
    return scores


def evaluate_real_images(evaluator: Evaluator, spec: Mapping[str, Any], logger: Any = None) -> dict | None:
    """Score the run's subject photos against each other, append the record to metrics.jsonl, log it to W&B.

    None (and a warning, nothing written) for a subject with a single photo: it has no pair."""
    start = time.time()
    settings, run_cfg = evaluator.settings, evaluator.run_cfg
    photos = reference_images(run_cfg)
    if len(photos) < 2:
        log.warning("eval.real_images: subject '%s' has %d photo; the real-images row needs two or more, "
                    "so it is left out", run_cfg.subject.get("name"), len(photos))
        return None
    clip, dino = evaluator.encoders()  # the encoders the pairs use, loaded once per evaluation
    encoders = {"clip": clip, "dino": dino}
    metrics = real_image_metrics(settings.metrics)
    scores = score_photos(photos, encoders, metrics)
    record = {
        "step": REAL_IMAGES_STEP, "stage": None, "stage_step": None,
        "method": run_cfg.method.get("name"), "subject": run_cfg.subject.get("name"), "checkpoint": None,
        "protocol": REAL_IMAGES_PROTOCOL, "references": "subject", "num_images": len(photos),
        **scores,
        "metric_settings": {m: {"impl": "personalize real_images: mean cosine over pairs of distinct photos",
                                **encoders[ENCODER_OF[m]].describe()} for m in metrics},
        "key": spec_key(spec), "spec": dict(spec), "seconds": round(time.time() - start, 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    append_record(evaluator.run_dir, record)
    if logger:
        logger.log_metrics({f"eval/{REAL_IMAGES_PROTOCOL}/{m}": v for m, v in scores.items()}, step=REAL_IMAGES_STEP)
    log.info("eval real images (%d photos, %d pairs): %s", len(photos), len(photos) * (len(photos) - 1) // 2,
             ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return record
