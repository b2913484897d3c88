"""One personalization run: subject photos + base model + method config -> checkpoints and samples.

    personalize method=two_stage subject=dog model=sd21_base hardware=gpu_bf16
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from personalize.banner import end_lines, hardware_choice, start_lines
from personalize.class_images import ClassImageSpec, ensure_class_images
from personalize.data import Subject, center_crop_resize, check_init_word, load_subject_photos, open_rgb, to_tensor
from personalize.devices import HardwareSettings, device_of, resolve_hardware
from personalize.errors import PersonalizeError
from personalize.eval.evaluate import evaluate_run
from personalize.eval.publish import print_table
from personalize.eval.settings import EvalSettings, check_settings
from personalize.io import atomic_write_text, remove_stale_temps
from personalize import signals
from personalize.methods.callbacks import ArtifactCheckpoint, RunProgressBar
from personalize.methods.module import Personalizer
from personalize.methods.settings import MethodSettings
from personalize.methods.token import check_new_token
from personalize.methods.recipe import overrides as method_overrides
from personalize.methods.trainables import check_against_model, component_dtypes
from personalize.rundir import CONFIG_FILE, list_checkpoints, samples_dir
from personalize.backbones import backbone_for, load_components, load_pipeline
from personalize.models import model_not_available, resolve_pretrained
from personalize.resume import SafetensorsCheckpointIO, find_run, is_launch_rank_zero, latest_resume_state
from personalize.sample import sample_checkpoint
from personalize.schema import check_config, check_run_settings, check_values
from personalize.tracking import build_logger, finishing_wandb, resolved_config

log = logging.getLogger(__name__)


def prompts_for(method: MethodSettings, subject: Subject) -> dict:
    """The run's prompts, filled for the subject. Reads four fields by attribute, so the composed `method`
    config gives the same (the paper tests fill a config's prompts without building a run)."""
    identifier = str(method.identifier)
    phrase = str(method.phrase).format(identifier=identifier, class_noun=subject.class_noun)
    fill = dict(identifier=identifier, class_noun=subject.class_noun, phrase=phrase)
    return {
        "identifier": identifier,
        "phrase": phrase,
        "instance": str(method.instance_prompt).format(**fill),
        "class": str(method.class_prompt).format(**fill) if method.class_prompt else None,
    }


def class_image_spec(cfg: DictConfig, subject: Subject) -> ClassImageSpec:
    """What decides the run's class images (their cache folder is `spec.folder(paths.class_image_dir)`).

    Public so that a caller can fill that folder beforehand: the benchmark puts placeholder pictures
    there, since a training step's cost does not depend on what the class images show.
    """
    ci = cfg.class_images
    return ClassImageSpec(
        model=resolve_pretrained(cfg.model), revision=cfg.model.get("revision"),
        prompt=str(ci.prompt).format(class_noun=subject.class_noun), negative_prompt=str(ci.negative_prompt or ""),
        sampler=str(ci.sampler), steps=int(ci.steps), guidance_scale=float(ci.guidance_scale),
        resolution=int(cfg.model.resolution), seed=int(ci.seed),
        vae=str(cfg.model.vae) if cfg.model.get("vae") else None,
    )


def prepare_class_images(cfg: DictConfig, subject: Subject, stages, device, dtype) -> torch.Tensor | None:
    if not any(stage.prior_loss_weight > 0 for stage in stages):
        return None
    ci = cfg.class_images
    spec = class_image_spec(cfg, subject)
    paths = ensure_class_images(
        spec, int(ci.count), Path(cfg.paths.class_image_dir), lambda: load_pipeline(cfg.model, dtype=dtype),
        batch_size=int(ci.batch_size), device=device, generate=is_launch_rank_zero(),  # other ranks wait for rank 0
    )
    return torch.stack([to_tensor(center_crop_resize(open_rgb(p), int(cfg.model.resolution))) for p in paths])


@dataclass
class Run:
    """Everything a run needs, built and validated, before any training step."""

    cfg: DictConfig
    run_dir: Path
    module: Personalizer
    accelerator: str
    precision: str
    frozen_dtype: torch.dtype
    resume_from: Path | None = None  # a resume state (resume/step-NNNNNN) that trainer.fit continues from

    @property
    def device(self) -> torch.device:
        return device_of(self.accelerator)

    @property
    def method(self) -> MethodSettings:
        """The method's settings, as parsed from `cfg.method` (the module trains by them)."""
        return self.module.method

    @property
    def hardware(self) -> HardwareSettings:
        """The hardware preset's settings, as parsed from `cfg.hardware`."""
        return self.module.hardware

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.run_dir)


def prepare_run(cfg: DictConfig) -> Run:
    """Validate the config and inputs (cheap checks first), load the model, build the method's module.

    Every check runs before anything is written, so bad input leaves no half-made run behind.
    With `resume` set, the run continues in the earlier run dir from its newest resume state.

    The method and hardware settings are parsed here, once, after the schema's checks; the module and
    everything below it take those settings, not the config.
    """
    check_config(cfg)  # a typo'd key fails here, not silently ignored
    overrides = method_overrides(cfg.method)  # what the run changed of its method file, before the family fills it in
    backbone_for(cfg.model).fill_method_defaults(cfg.method)
    check_values(cfg)  # every value in its declared range, every prompt template fillable (schema.RULES)
    subject = Subject.from_cfg(cfg.subject)
    method = MethodSettings.from_cfg(cfg.method)  # the stages' checks (parse_stages) run here
    hardware = HardwareSettings.from_cfg(cfg.hardware)
    stages = list(method.stages)
    accelerator, precision, frozen_dtype = resolve_hardware(hardware)
    check_run_settings(cfg, stages)
    photos = load_subject_photos(subject.data_dir, int(cfg.model.resolution), method.data)
    images = photos.images
    prompts = prompts_for(method, subject)
    prompts["captions"] = photos.captions_by_name(prompts["identifier"], subject.class_noun, prompts["phrase"])
    check_model(cfg, method)
    check_prompts(cfg, prompts, method)
    check_evaluation(cfg)

    config = resolved_config(cfg)
    rank_zero = is_launch_rank_zero()
    run_dir = find_run(cfg, config)
    resume_from = None
    if run_dir is None:
        run_dir = Path(cfg.paths.output_dir)
    else:
        cfg.paths.output_dir = str(run_dir)  # everything of this call goes into the resumed run's dir
        resume_from = latest_resume_state(run_dir)
        log.info("resuming %s from %s", run_dir, resume_from.name if resume_from else "the start (no checkpoint yet)")
        if rank_zero:  # what a killed writer left there is never read; free the disk
            remove_stale_temps(run_dir, recursive=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero and not (run_dir / CONFIG_FILE).exists():  # a resumed run keeps the config it began with
        atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(config)))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    hardware_line = hardware_choice(cfg.hardware, accelerator, precision, frozen_dtype)
    for line in start_lines(cfg, subject, stages, len(images), hardware_line, run_dir,
                            resume_from.name if resume_from else None) if rank_zero else ():
        log.info(line)
    log.info("training prompt '%s'", prompts["instance"])

    class_images = prepare_class_images(cfg, subject, stages, device_of(accelerator), frozen_dtype)
    components = load_components(cfg.model, component_dtypes(method.trained, frozen_dtype))
    model_info = dict(config["model"], pretrained=resolve_pretrained(cfg.model))
    # what checkpoint.json says of the run; `overrides` compares the method's config with its file's
    info = dict(method=method.name, subject=subject.name, class_noun=subject.class_noun, kind=subject.kind,
                phrase=prompts["phrase"], seed=int(cfg.seed), model=model_info,
                overrides=overrides)
    module = Personalizer(components, method, prompts, images, class_images, hardware=hardware, checkpoint_info=info,
                          seed=int(cfg.seed), uncropped_images=photos.uncropped, instance_sizes=photos.sizes,
                          backbone=backbone_for(cfg.model))
    return Run(cfg, run_dir, module, accelerator, precision, frozen_dtype, resume_from)


def check_model(cfg: DictConfig, method: MethodSettings | None = None) -> None:
    """The model must be there and suit the settings (its backbone says what that means); checked on its
    config files (a few bytes, loaded through the same path as the weights: local folder, cache, hub),
    before anything is written. `method`: the run's parsed settings (parsed from `cfg.method`, with the family's
    defaults filled in, if not given)."""
    backbone = backbone_for(cfg.model)
    if method is None:
        backbone.fill_method_defaults(cfg.method)
        method = MethodSettings.from_cfg(cfg.method)
    backbone.check_trainables(method)  # settings alone: a method the family cannot train, before its files
    backbone.check_model(method)
    check_against_model(method, cfg.model)  # e.g. LoRA targets: on weightless copies of the components


def check_prompts(cfg: DictConfig, prompts: dict, method: MethodSettings) -> None:
    """The identifier must be in the training prompt (else nothing learns the subject), and a new token must
    be a valid new word; checked on the tokenizer alone, before class images or the model are loaded."""
    identifier = prompts["identifier"]
    if not identifier.strip() or identifier not in prompts["instance"]:
        raise PersonalizeError(
            f"the training prompt '{prompts['instance']}' does not contain the identifier '{identifier}': "
            "keep {identifier} in method.phrase (or {phrase} in method.instance_prompt)"
        )
    token = method.new_token
    if token is not None:
        tokenizers = backbone_for(cfg.model).load_tokenizers()  # the token goes into every text encoder
        if any(len(tokenizer) < 256 for tokenizer in tokenizers.values()):
            # transformers builds an empty tokenizer when the vocabulary files are missing
            raise model_not_available(resolve_pretrained(cfg.model), cfg.model)
        if token.initializer == str(cfg.subject.init_word):  # textual inversion's ${subject.init_word}
            check_init_word(Subject.from_cfg(cfg.subject), tokenizers["tokenizer"])  # the fix is subject.init_word=, said so
        for name, tokenizer in tokenizers.items():
            check_new_token(tokenizer, identifier, token.initializer, token.num_vectors,
                            name if len(tokenizers) > 1 else None)


def fit(run: Run, callbacks_before: Sequence[L.Callback] = (), callbacks_after: Sequence[L.Callback] = (),
        sample: bool = True, evaluate: bool = True) -> Run:
    """Train, saving checkpoints; then sample from the last one through the stock pipeline, evaluate every
    checkpoint (conf/eval; see `evaluate_checkpoints`) and print the metrics per checkpoint.

    `callbacks_before`/`_after` run around the run's own callbacks (the benchmark times steps with them);
    `sample`/`evaluate` switch off what follows training.

    A stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2; `personalize.signals`) ends training after the
    current step with a resume state of that step, or evaluation between batches, by raising
    `signals.Interrupted` (the CLI turns it into exit code 128 + the signal). A run that gets to the end
    removes the INTERRUPTED note an earlier, interrupted call left.
    """
    cfg, module, hardware = run.cfg, run.module, run.hardware  # prepare_run has checked the eval config
    records: list[dict] = []
    check_every = hardware.nan_check_every
    callbacks = [*callbacks_before, ArtifactCheckpoint(run.run_dir, check_every=check_every)]
    if cfg.trainer.progress_bar:
        callbacks.append(RunProgressBar(run.method.name, loss_every=check_every or int(cfg.trainer.log_every_n_steps)))
    plugins = [SafetensorsCheckpointIO()]  # resume states: safetensors + JSON (never pickle)
    if SLURMEnvironment.detect():
        # Lightning's own SLURM requeue (on SIGUSR1: a pickled checkpoint, then `scontrol requeue` from
        # inside the signal handler) is off: ours stops after the step, and submitit requeues
        plugins.append(SLURMEnvironment(auto_requeue=False))
    interrupted_before = signals.read_interrupted(run.run_dir) is not None
    with signals.deferred(), finishing_wandb(continues_interrupted=interrupted_before):
        logger = build_logger(cfg, run.run_dir)
        trainer = L.Trainer(
            accelerator=run.accelerator, devices=hardware.trainer_devices, num_nodes=hardware.num_nodes,
            strategy=hardware.strategy, precision=run.precision, max_steps=module.total_steps(),
            callbacks=[*callbacks, *callbacks_after],
            # the module's sampler splits data over ranks itself
            plugins=plugins, use_distributed_sampler=False,
            deterministic=hardware.deterministic,
            logger=logger, enable_checkpointing=False, enable_model_summary=False,
            log_every_n_steps=int(cfg.trainer.log_every_n_steps), enable_progress_bar=bool(cfg.trainer.progress_bar),
            default_root_dir=str(run.run_dir), num_sanity_val_steps=0,
        )
        trainer.fit(module, ckpt_path=run.resume_from)
        if trainer.is_global_zero and sample:
            write_samples(cfg, run.run_dir, run.device, run.frozen_dtype, logger)
        if trainer.is_global_zero and evaluate:
            records = evaluate_checkpoints(cfg, run.run_dir, run.device, run.frozen_dtype, logger)
        if trainer.is_global_zero:
            signals.clear_interrupted(run.run_dir)
    if records:
        print_table(records, run.run_dir)
    if trainer.is_global_zero:
        for line in end_lines(run.run_dir, str(cfg.task_name)):
            log.info(line)
    return run


def check_evaluation(cfg: DictConfig) -> None:
    """Validate conf/eval (names, counts, optional extras, cached models) without loading anything."""
    if cfg.get("eval") is not None:
        check_settings(EvalSettings.from_cfg(cfg.eval))


def evaluate_checkpoints(cfg: DictConfig, run_dir: Path, device, dtype, logger) -> list[dict]:
    """Evaluate every saved checkpoint of the run (conf/eval), logging to the run's own W&B run.

    A post-training pass rather than a callback inside the training loop: the loop stays free of sampling
    (no pipeline, CLIP or DINO in memory beside the optimizer state, no evaluation time inside the step
    timings), generation is batched across prompts, the base pipeline is loaded once for all checkpoints
    (each applied in turn) and the reference features are encoded once. It is also exactly what
    `personalize-eval run_dir=<run>` runs on a finished run. The price: numbers arrive after training.
    Records go to <run>/metrics.jsonl; W&B gets eval/<protocol>/<metric> at each checkpoint's step.
    """
    if cfg.get("eval") is None or not cfg.eval.get("enabled", True):
        return []
    try:
        return evaluate_run(run_dir, cfg.eval, run_cfg=cfg, device=device, dtype=dtype, logger=logger)
    except PersonalizeError as error:
        raise PersonalizeError(
            f"training finished (checkpoints in {run_dir}/checkpoints) but its evaluation failed: {error}. "
            f"Evaluate it again with `personalize-eval run_dir={run_dir}`"
        ) from error


def train(cfg: DictConfig) -> Run:
    """Run one personalization end to end."""
    return fit(prepare_run(cfg))


def write_samples(cfg: DictConfig, run_dir: Path, device, dtype, logger) -> list[Path]:
    """Sample from the last checkpoint through the stock pipeline: proves the artifacts load and work."""
    last = list_checkpoints(run_dir)[-1]
    s = cfg.samples
    paths = sample_checkpoint(
        last, list(s.prompts), samples_dir(run_dir) / last.name, num_images=int(s.num_images), seed=int(s.seed),
        steps=int(s.steps), guidance_scale=float(s.guidance_scale), sampler=str(s.sampler), device=str(device), dtype=dtype,
    )
    if logger:
        logger.log_image(key="samples", images=[str(p) for p in paths], caption=[p.stem for p in paths])
    return paths
