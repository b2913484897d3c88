"""The `personalize-edit` job: edit a picture with a personalized run's checkpoint, save and log the result.

    personalize-edit run_dir=outputs/train/runs/<run> image=data/samples/dog2/00.jpg edit=fast

writes into `<run_dir>/edits/<time>/` (or `out_dir`):
- side_by_side.png: source | null-text reconstruction (photos only) | edit, captioned
- source.png, reconstruction.png, edited.png: the three images at the model's resolution
- attention_source.png, attention_target.png: each prompt's cross-attention, one tile per word
- edit.json: prompts, checkpoint, the settings used and the resolved config

`run_edit(cfg)` takes the composed `edit` config (conf/edit.yaml); `settings_from_config` turns its
`edit` group into `EditSettings`, filling {phrase}/{identifier}/{class_noun} from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image, UnidentifiedImageError

from personalize.artifacts import load_checkpoint_pipeline
from personalize.backbones import BACKBONES, backbone_for
from personalize.devices import resolve_device, resolve_dtype
from personalize.edit.editor import EditSettings, build_controller, edit_image, save_attention_maps, save_side_by_side
from personalize.edit.inversion import convert_prompt, decode_latents, encode_image, pipeline_tokenizers
from personalize.errors import PersonalizeError
from personalize.io import atomic_save_image, atomic_write_json
from personalize.rundir import CHECKPOINTS_DIR, CheckpointInfo, load_run_config, read_info, resolve_checkpoint
from personalize.tracking import finishing_wandb, resolved_config

log = logging.getLogger("personalize.edit")

PLACEHOLDERS = ("phrase", "identifier", "class_noun")
FILES = {
    "side_by_side": "side_by_side.png", "source": "source.png", "reconstruction": "reconstruction.png",
    "edited": "edited.png", "attention_source": "attention_source.png", "attention_target": "attention_target.png",
    "info": "edit.json",
}


def fill(template: str, info: dict, what: str = "prompt") -> str:
    """`template` with {phrase}, {identifier} and {class_noun} taken from a checkpoint's info."""
    values = {key: info[key] for key in PLACEHOLDERS}
    try:
        return str(template).format(**values)
    except (KeyError, IndexError, ValueError) as error:
        raise PersonalizeError(f"cannot fill the {what} {template!r} ({error!r}): the only placeholders are "
                               + ", ".join("{" + k + "}" for k in PLACEHOLDERS)) from None


def settings_from_config(edit_cfg, info: dict):
    """`EditSettings` from the `edit` config group (same keys), templates filled from `info`."""
    values = OmegaConf.to_container(edit_cfg, resolve=True) if isinstance(edit_cfg, DictConfig) else dict(edit_cfg)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(EditSettings)})
    if unknown:
        raise PersonalizeError(f"unknown edit setting(s) {unknown}: the edit config's keys are EditSettings' fields")
    for key in ("cross_steps", "self_steps"):  # a window is a fraction or a [start, end] pair
        if isinstance(values.get(key), (list, tuple)):
            values[key] = tuple(float(v) for v in values[key])
    if values.get("blend_words"):
        words = values["blend_words"]
        words = [words] if isinstance(words, str) else words
        # A filled-in phrase ("<rare> dog") stands for each of its words.
        values["blend_words"] = [w for word in words for w in fill(word, info, "blend word").split()]
    if values.get("reweight"):  # {word: factor}, or [[word, factor], ...] (what a command line can override)
        pairs = values["reweight"]
        pairs = pairs.items() if isinstance(pairs, dict) else pairs
        try:
            values["reweight"] = {fill(word, info, "reweight word"): float(factor) for word, factor in pairs}
        except (TypeError, ValueError):
            raise PersonalizeError(f"edit.reweight={values['reweight']} is not a list of [word, factor] pairs, "
                                   "e.g. 'edit.reweight=[[\"{identifier}\", 2.0]]'") from None
    try:
        return EditSettings(**values)
    except (TypeError, ValueError) as error:
        raise PersonalizeError(f"bad edit settings: {error}") from None


def check_prompts(source: str, target: str, mode: str) -> None:
    if not source.strip() or not target.strip():
        raise PersonalizeError("source_prompt and target_prompt must not be empty")
    if mode == "replace" and len(source.split()) != len(target.split()):
        raise PersonalizeError(
            f"mode=replace swaps words one for one, but {source!r} has {len(source.split())} words and {target!r} "
            f"has {len(target.split())}: give the prompts as many words, or use edit=refine (or edit.mode=auto)")


def open_photo(path) -> Image.Image:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PersonalizeError(f"image '{path}' does not exist: pass image=<path to a photo>, or image=null to "
                               "edit a generated image")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise PersonalizeError(f"cannot read image '{path}' ({type(error).__name__}): pass a JPEG or PNG photo") from None


def run_root(run_or_ckpt: Path, ckpt: Path) -> Path:
    """The run folder, also when a checkpoint folder itself was passed as run_dir."""
    run_or_ckpt = Path(run_or_ckpt)
    if run_or_ckpt.resolve() == ckpt.resolve() and ckpt.parent.name == CHECKPOINTS_DIR:
        return ckpt.parent.parent
    return run_or_ckpt


def default_out_dir(run_dir: Path) -> Path:
    """<run_dir>/edits/<time>, with a -1, -2... suffix when two edits start in the same second."""
    base = Path(run_dir) / "edits" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, n = base, 0
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run_group(run_dir: Path) -> str:
    """The trained run's W&B group (from its config.yaml), so its edits sit beside it."""
    try:
        return str(load_run_config(run_dir).get("group") or "edit")
    except Exception:  # no or unreadable config.yaml: a copied checkpoint
        return "edit"


def psnr(a, b) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def resolved_mode(mode: str, source: str, target: str) -> str:
    """What mode=auto picks (as `build_controller` does): replace for equal word counts, else refine."""
    if mode != "auto":
        return mode
    return "replace" if len(source.split()) == len(target.split()) else "refine"


def controller_name(controller) -> str:
    base = getattr(controller, "base", None)
    return type(controller).__name__ + (f"({type(base).__name__})" if base is not None else "")


def _with_output_dir(cfg: DictConfig, out_dir: Path) -> DictConfig:
    """A copy whose paths.output_dir is the edit folder (it is Hydra's run dir otherwise, unset outside Hydra)."""
    cfg = cfg.copy()
    if OmegaConf.select(cfg, "paths") is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
    return cfg


def _log_to_wandb(cfg: DictConfig, info: CheckpointInfo, out_dir: Path, record: dict) -> None:
    import wandb  # optional, and only for logger=wandb*: an edit without W&B never loads it

    os.environ.setdefault("WANDB_SILENT", "true")
    group = str(cfg.group) if cfg.get("group") else run_group(record["run_dir"])
    model = info.model.get("name", "model")
    run = wandb.init(
        project=cfg.logger.project, entity=cfg.logger.get("entity"), group=group,
        tags=[str(info.method), str(info.subject), str(model), "edit", record["mode"], *cfg.get("tags", [])],
        name=f"edit-{info.method}-{info.subject}", dir=str(out_dir), mode=str(cfg.logger.mode),
        job_type="edit", config={**record["config"], "settings": record["settings"]},
    )
    captions = {"side_by_side": f"{record['source_prompt']} -> {record['target_prompt']}",
                "source": record["source_prompt"], "reconstruction": "reconstruction",
                "edited": record["target_prompt"], "attention_source": record["source_prompt"],
                "attention_target": record["target_prompt"]}
    run.log({f"edit/{key}": wandb.Image(str(out_dir / name), caption=captions[key])
             for key, name in FILES.items() if key in captions and (out_dir / name).exists()})
    for key in ("reconstruction_psnr", "vae_psnr", "seconds"):
        if record.get(key) is not None:
            run.summary[key] = record[key]


def check_backbone(ckpt: Path, info: CheckpointInfo):
    """The checkpoint's Backbone, if prompt-to-prompt knows its attention layers and conditioning
    (`Backbone.supports_editing`: SD 1.x/2.x, SDXL); a checkpoint of another family (FLUX.1, whose joint
    attention has no cross-attention maps: docs/editing.md) is one line."""
    backbone = backbone_for(info.model)
    if not backbone.supports_editing:
        editable = [name for name, cls in BACKBONES.items() if cls.supports_editing]
        names = " and ".join(editable)
        raise PersonalizeError(
            f"{ckpt} is a checkpoint of model.backbone={backbone.name}: editing supports the {names} "
            f"backbone{'s' if len(editable) > 1 else ''} only (prompt-to-prompt's attention control is built for "
            f"their cross-attention layers): sample it with `personalize-sample` instead, or edit a run of "
            + " or ".join(f"model.backbone={name}" for name in editable))
    return backbone


def run_edit(cfg: DictConfig) -> Path:
    """The whole `personalize-edit` job; returns the folder the results went to."""
    started = time.perf_counter()
    if OmegaConf.is_missing(cfg, "run_dir") or not cfg.run_dir:
        raise PersonalizeError("pass run_dir=<a run folder written by `personalize`>, e.g. "
                               "run_dir=outputs/train/runs/<time>_two_stage-sample_dog-s0")
    # Everything the user typed is checked before the model loads or any folder is created.
    step = cfg.get("step", "last")
    if step not in (None, "last", "latest") and not str(step).isdigit():
        raise PersonalizeError(f"step={step} is not a step number: pass step=<N> or step=last")
    ckpt = resolve_checkpoint(Path(str(cfg.run_dir)), step)
    info = read_info(ckpt)
    backbone = check_backbone(ckpt, info)
    values = info.prompt_values()
    source_prompt = fill(cfg.source_prompt, values, "source_prompt")
    target_prompt = fill(cfg.target_prompt, values, "target_prompt")
    settings = settings_from_config(cfg.edit, values)
    check_prompts(source_prompt, target_prompt, settings.mode)
    photo_path = Path(str(cfg.image)).expanduser() if cfg.get("image") else None
    photo = open_photo(photo_path) if photo_path is not None else None
    device, dtype = resolve_device(cfg.get("device")), resolve_dtype(cfg.get("dtype"))
    run_dir = run_root(Path(str(cfg.run_dir)), ckpt)
    out_dir = Path(str(cfg.out_dir)) if cfg.get("out_dir") else default_out_dir(run_dir)

    log.info("loading %s (%s, step %s) on %s", ckpt, info.method, info.step, device)
    pipe = load_checkpoint_pipeline(ckpt, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    try:  # word/blend-word checks that need the tokenizer (the identifier is a token only now)
        controller = build_controller(pipeline_tokenizers(pipe, backbone), source_prompt, target_prompt, settings)
    except ValueError as error:
        raise PersonalizeError(f"cannot edit {source_prompt!r} -> {target_prompt!r}: {error}") from None

    if photo is not None:
        log.info("null-text inversion of %s under %r (%d steps x %d inner steps)", photo_path, source_prompt,
                 settings.num_inference_steps, settings.null_text_inner_steps)
    log.info("editing %r -> %r with %s", source_prompt, target_prompt, controller_name(controller))
    result = edit_image(pipe, source_prompt, target_prompt, image=photo, seed=int(cfg.seed), settings=settings,
                        backbone=backbone)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_side_by_side(result, out_dir / FILES["side_by_side"])
    atomic_save_image(result.source, out_dir / FILES["source"])
    atomic_save_image(result.reconstruction, out_dir / FILES["reconstruction"])
    atomic_save_image(result.edited, out_dir / FILES["edited"])
    if cfg.get("attention_maps", True):
        convert = convert_prompt(pipe)
        save_attention_maps(result.attention, pipe.tokenizer, source_prompt, out_dir / FILES["attention_source"],
                            prompt_index=0, image=result.reconstruction, convert=convert)
        save_attention_maps(result.attention, pipe.tokenizer, target_prompt, out_dir / FILES["attention_target"],
                            prompt_index=1, image=result.edited, convert=convert)

    vae_psnr = None
    if photo is not None:  # the best any reconstruction can do: the photo through the VAE and back
        z0 = encode_image(pipe, photo, result.source.height, result.source.width)
        vae_psnr = psnr(result.source, decode_latents(pipe, z0)[0])
    record = {
        "run_dir": str(run_dir.resolve()), "checkpoint": str(ckpt.resolve()), "step": info.step,
        "method": info.method, "subject": info.subject, "phrase": info.phrase,
        "identifier": info.identifier, "class_noun": info.class_noun,
        "source_template": str(cfg.source_prompt), "target_template": str(cfg.target_prompt),
        "source_prompt": source_prompt, "target_prompt": target_prompt,
        "image": str(photo_path.resolve()) if photo_path is not None else None,
        "seed": None if photo is not None else int(cfg.seed),
        "controller": controller_name(result.attention), "mode": resolved_mode(settings.mode, source_prompt, target_prompt),
        "settings": dataclasses.asdict(settings),
        "reconstruction_psnr": psnr(result.source, result.reconstruction) if photo is not None else None,
        "vae_psnr": vae_psnr,
        "null_text_final_loss": (result.inversion.losses[-1] if result.inversion is not None
                                 and result.inversion.losses else None),
        "files": {key: name for key, name in FILES.items() if (out_dir / name).exists() or key == "info"},
        "device": device, "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - started, 2),
        "config": resolved_config(_with_output_dir(cfg, out_dir)),
    }
    atomic_write_json(out_dir / FILES["info"], record)

    if cfg.logger.backend != "none":
        with finishing_wandb():
            _log_to_wandb(cfg, info, out_dir, record)

    print(f"edited {source_prompt!r} -> {target_prompt!r} ({record['controller']}, "
          f"{settings.num_inference_steps} steps) with {ckpt}")
    if record["reconstruction_psnr"] is not None:
        print(f"null-text reconstruction of {photo_path}: PSNR {record['reconstruction_psnr']:.1f} dB "
              f"(the VAE alone: {vae_psnr:.1f} dB)")
    print(f"wrote {out_dir}")
    print(f"side by side: {out_dir / FILES['side_by_side']}")
    return out_dir

