"""One personalization run: subject photos + base model + method config -> checkpoints and samples.

    personalize method=two_stage subject=dog model=sd21_base hardware=gpu_bf16
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from personalize.class_images import ClassImageSpec, ensure_class_images
from personalize.data import Subject, center_crop_resize, load_subject_images, open_rgb, to_tensor
from personalize.io import atomic_write_text
from personalize.methods.callbacks import ArtifactCheckpoint
from personalize.methods.module import Personalizer
from personalize.methods.stages import parse_stages
from personalize.models import load_components, load_pipeline, resolve_pretrained
from personalize.tracking import build_logger, finishing_wandb, resolved_config

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_hardware(hw: DictConfig) -> tuple[str, str, torch.dtype]:
    """(accelerator, precision, dtype of frozen parts) with `auto` decided by what this machine has."""
    cuda = torch.cuda.is_available()
    accelerator = hw.accelerator if hw.accelerator != "auto" else ("gpu" if cuda else "cpu")
    if accelerator == "gpu" and not cuda:
        from personalize.errors import PersonalizeError

        raise PersonalizeError(f"hardware={hw.name} needs a CUDA GPU but none is visible: use hardware=cpu (or auto)")
    precision = str(hw.precision)
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if accelerator == "gpu" else "32-true"
    frozen = str(hw.frozen_dtype)
    if frozen == "auto":
        frozen = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}.get(precision, "float32")
    return accelerator, precision, _DTYPES[frozen]


def device_of(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator == "gpu" else "cpu")


def prompts_for(method_cfg: DictConfig, subject: Subject) -> dict:
    identifier = str(method_cfg.identifier)
    phrase = str(method_cfg.phrase).format(identifier=identifier, class_noun=subject.class_noun)
    fill = dict(identifier=identifier, class_noun=subject.class_noun, phrase=phrase)
    return {
        "identifier": identifier,
        "phrase": phrase,
        "instance": str(method_cfg.instance_prompt).format(**fill),
        "class": str(method_cfg.class_prompt).format(**fill) if method_cfg.get("class_prompt") else None,
    }


def component_dtypes(stages, frozen: torch.dtype) -> dict[str, torch.dtype]:
    """What never trains is stored in the compute dtype: half the memory, and no casts inside the step.

    What trains stays fp32 (master weights); autocast runs its math in bf16/fp16.
    """
    trains = {t for stage in stages for t in stage.train}
    return {
        "vae": frozen,
        "text_encoder": torch.float32 if "text_encoder" in trains else frozen,  # the new token row is its own fp32 param
        "unet": torch.float32 if "unet" in trains else frozen,
    }


def prepare_class_images(cfg: DictConfig, subject: Subject, stages, device, dtype) -> torch.Tensor | None:
    if not any(stage.prior_loss_weight > 0 for stage in stages):
        return None
    ci = cfg.class_images
    prompt = str(ci.prompt).format(class_noun=subject.class_noun)
    spec = ClassImageSpec(
        model=resolve_pretrained(cfg.model), revision=cfg.model.get("revision"), prompt=prompt,
        negative_prompt=str(ci.negative_prompt or ""), sampler=str(ci.sampler), steps=int(ci.steps),
        guidance_scale=float(ci.guidance_scale), resolution=int(cfg.model.resolution), seed=int(ci.seed),
    )
    paths = ensure_class_images(
        spec, int(ci.count), Path(cfg.paths.class_image_dir), lambda: load_pipeline(cfg.model, dtype=dtype),
        batch_size=int(ci.batch_size), device=device,
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

    @property
    def device(self) -> torch.device:
        return device_of(self.accelerator)

    def checkpoints(self) -> list[Path]:
        from personalize.checkpoints import list_checkpoints

        return list_checkpoints(self.run_dir)


def prepare_run(cfg: DictConfig) -> Run:
    """Validate the config and inputs (cheap checks first), load the model, build the method's module."""
    run_dir = Path(cfg.paths.output_dir)
    subject = Subject.from_cfg(cfg.subject)
    stages = parse_stages(cfg.method.stages)
    accelerator, precision, frozen_dtype = resolve_hardware(cfg.hardware)
    images = load_subject_images(subject.data_dir, int(cfg.model.resolution))
    prompts = prompts_for(cfg.method, subject)

    run_dir.mkdir(parents=True, exist_ok=True)
    config = resolved_config(cfg)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    log.info("%s on %s (%d photos): '%s'", cfg.method.name, subject.name, len(images), prompts["instance"])

    class_images = prepare_class_images(cfg, subject, stages, device_of(accelerator), frozen_dtype)
    components = load_components(cfg.model, component_dtypes(stages, frozen_dtype))
    model_info = dict(config["model"], pretrained=resolve_pretrained(cfg.model))
    info = dict(method=cfg.method.name, subject=subject.name, class_noun=subject.class_noun, kind=subject.kind,
                phrase=prompts["phrase"], seed=int(cfg.seed), model=model_info)
    module = Personalizer(components, cfg.method, prompts, images, class_images, cfg.hardware, info)
    return Run(cfg, run_dir, module, accelerator, precision, frozen_dtype)


def fit(run: Run) -> Run:
    """Train, saving checkpoints; then sample from the last one through the stock pipeline."""
    cfg, module = run.cfg, run.module
    with finishing_wandb():
        logger = build_logger(cfg, run.run_dir)
        trainer = L.Trainer(
            accelerator=run.accelerator, devices=cfg.hardware.devices, num_nodes=cfg.hardware.num_nodes,
            strategy=cfg.hardware.strategy, precision=run.precision, max_steps=module.total_steps(),
            callbacks=[ArtifactCheckpoint(run.run_dir, check_every=int(cfg.hardware.nan_check_every))],
            logger=logger, enable_checkpointing=False, enable_model_summary=False,
            log_every_n_steps=int(cfg.trainer.log_every_n_steps), enable_progress_bar=bool(cfg.trainer.progress_bar),
            default_root_dir=str(run.run_dir), num_sanity_val_steps=0,
        )
        trainer.fit(module)
        if trainer.is_global_zero:
            write_samples(cfg, run.run_dir, run.device, run.frozen_dtype, logger)
    log.info("run dir: %s", run.run_dir)
    return run


def train(cfg: DictConfig) -> Run:
    """Run one personalization end to end."""
    return fit(prepare_run(cfg))


def write_samples(cfg: DictConfig, run_dir: Path, device, dtype, logger) -> list[Path]:
    """Sample from the last checkpoint through the stock pipeline: proves the artifacts load and work."""
    from personalize.checkpoints import list_checkpoints
    from personalize.sample import sample_checkpoint

    last = list_checkpoints(run_dir)[-1]
    s = cfg.samples
    paths = sample_checkpoint(
        last, list(s.prompts), run_dir / "samples" / last.name, num_images=int(s.num_images), seed=int(s.seed),
        steps=int(s.steps), guidance_scale=float(s.guidance_scale), sampler=str(s.sampler), device=str(device), dtype=dtype,
    )
    if logger:
        logger.log_image(key="samples", images=[str(p) for p in paths], caption=[p.stem for p in paths])
    return paths
