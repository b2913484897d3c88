"""Evaluate every checkpoint of a run dir on the prompt protocols: images on disk, metrics in
`metrics.jsonl`, and W&B.

What a run dir holds after an evaluation (`personalize.rundir` names each path):

    metrics.jsonl                              one JSON record per checkpoint step x protocol (x settings)
    eval/step-000300/<protocol>/pXX_iXX.png    the generated images (prompt XX, image XX)
    eval/step-000300/<protocol>/spec.json      what decides those images; they are reused only if it matches
    eval/step-000300/<protocol>/grid.png       the grid that went to W&B

The parts: `settings` (conf/eval as values, the checks before anything runs), `evaluator` (what is loaded
once, one pair from generation to record), `images` (photos, image folders, grids), `publish` (W&B and
the printed table), `rerun` (`personalize-eval` on an existing run); this module decides which pairs to
evaluate and in what order.

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

Resuming. A (checkpoint, protocol) pair is done when metrics.jsonl has records for its step and protocol
with the same settings (`key`: generation settings + evaluation models) that hold every requested metric
between them (`rundir.is_done`: records of one key extend each other, the rule the report reads them by).
Done pairs are skipped; images already on disk (each written atomically) are reused, so a killed
evaluation restarts where it stopped, and asking for one more metric later re-scores the images on disk
without generating them again. metrics.jsonl is rewritten atomically per record, so it never holds a half
line. Records of other settings stay in the file; the images on disk are those of the latest settings.
A checkpoint folder rewritten in place (a training resumed over it) is not detected: delete its records.
One evaluation per run dir at a time (two concurrent ones could each drop the other's appended record).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from personalize.errors import PersonalizeError
from personalize.eval.evaluator import Evaluator, Pair
from personalize.eval.images import reference_images
from personalize.eval.protocols import build_protocol
from personalize.eval.publish import log_record, log_summary
from personalize.eval.real_images import evaluate_real_images, pending_spec
from personalize.eval.settings import EvalSettings, check_settings, spec_key
from personalize.rundir import CHECKPOINTS_DIR, METRICS_FILE, is_done, list_checkpoints, load_run_config, read_info, read_records

log = logging.getLogger(__name__)


def _pairs(run_dir: Path, settings: EvalSettings) -> list[Pair]:
    """Every checkpoint (or the last) x protocol of the settings, checkpoint-major."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise PersonalizeError(f"no checkpoints under '{run_dir}/{CHECKPOINTS_DIR}': nothing to evaluate")
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

    records = read_records(run_dir)
    results = [is_done(records, p.step, p.protocol.name, p.key, settings.metrics) for p in pairs]
    todo = [pair for pair, done in zip(pairs, results) if done is None]
    for done in filter(None, results):  # the W&B run at hand gets the whole evaluation, earlier pairs included
        log_record(logger, done, run_dir, settings.metrics)
    log.info("eval: %d checkpoint(s) x %d protocol(s): %d pair(s) to evaluate, %d already in %s",
             len({p.checkpoint for p in pairs}), len(settings.protocols), len(todo), len(pairs) - len(todo), METRICS_FILE)
    real_images = pending_spec(records, settings, int(run_cfg.model.resolution))  # eval.real_images, once per run
    if todo or real_images is not None:
        evaluator = Evaluator(run_dir, run_cfg, settings, model_cfg, device, dtype)
        if real_images is not None:  # the photos against each other: seconds, and before any generation
            evaluate_real_images(evaluator, real_images, logger)
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
