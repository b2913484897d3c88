"""Checkpoint folders in stock diffusers formats, and loading them back into a stock pipeline.

`checkpoints/step-000200/` holds exactly what trained up to that step and nothing else:
- `learned_embeds.safetensors` ({token: tensor[dim]}) -> `pipe.load_textual_inversion(dir)`
- `pytorch_lora_weights.safetensors` (`unet.`-prefixed diffusers keys) -> `pipe.load_lora_weights(dir)`;
  its header holds the adapter's LoraConfig under `lora_adapter_metadata`, as diffusers writes it, so the
  loader rebuilds the trained rank and alpha. A file written before that (no metadata) still loads, with
  alpha = rank as diffusers assumes: the trained model only if the run had method.lora.alpha = rank
  (`apply_checkpoint` warns when it cannot tell or the run's config says otherwise).
- `unet/` and `text_encoder/` via `save_pretrained` -> `X.from_pretrained(dir / "unet")`
- `checkpoint.json`: step, stage, base model, prompt, identifier: what a sampler needs to know.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # a run dir's resolved config, written once when the run begins
INFO_FILE = "checkpoint.json"
EMBEDS_FILE = "learned_embeds.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def load_run_config(run_dir: Path):
    """The resolved config a run began with (its `config.yaml`), as a DictConfig."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise PersonalizeError(f"'{run_dir}' has no {CONFIG_FILE}: pass a run dir written by `personalize`")
    return OmegaConf.load(path)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, by step (a folder without its info file is not complete)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / INFO_FILE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def read_info(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / INFO_FILE
    if not path.exists():
        raise PersonalizeError(f"'{ckpt_dir}' is not a checkpoint folder (no {INFO_FILE}): pass a run's checkpoints/step-NNNNNN")
    return json.loads(path.read_text())


def resolve_checkpoint(run_or_ckpt: Path, step: int | str | None = None) -> Path:
    """A checkpoint folder from a run dir (+ step, default the last) or a checkpoint folder itself."""
    path = Path(run_or_ckpt)
    if (path / INFO_FILE).exists():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise PersonalizeError(f"no checkpoints under '{path}/checkpoints': pass a run dir written by `personalize`")
    if step in (None, "last", "latest"):
        return checkpoints[-1]
    wanted = checkpoint_dir(path, int(step))
    if wanted not in checkpoints:
        steps = ", ".join(str(read_info(c)["step"]) for c in checkpoints)
        raise PersonalizeError(f"run '{path}' has no checkpoint at step {step}: available steps are {steps}")
    return wanted


def apply_checkpoint(pipe, ckpt_dir: Path):
    """Load a checkpoint's artifacts into a base-model pipeline, only through diffusers' own loaders.

    Safe to call repeatedly on the same pipeline (evaluating checkpoint after checkpoint): a token that
    is already in the tokenizer gets its embedding row overwritten, and earlier LoRA weights are unloaded.
    A LoRA comes back with the rank and alpha it trained with (the file's adapter metadata); a file from
    before that metadata was saved loads with alpha = rank, as it always did, with a warning where that may
    not be what trained.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    ckpt_dir = Path(ckpt_dir)
    dtype, device = pipe.unet.dtype, pipe.unet.device
    if (ckpt_dir / "text_encoder").is_dir():
        pipe.text_encoder = CLIPTextModel.from_pretrained(ckpt_dir / "text_encoder", dtype=dtype).to(device)
    if (ckpt_dir / EMBEDS_FILE).exists():
        embeds = load_file(ckpt_dir / EMBEDS_FILE)
        vocab = pipe.tokenizer.get_vocab()
        if not any(token in vocab for token in embeds):
            pipe.load_textual_inversion(str(ckpt_dir), weight_name=EMBEDS_FILE)  # the stock path
        else:  # a later checkpoint of the same run: the token exists, so only its row changes
            table = pipe.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                for token, vector in embeds.items():
                    table[vocab[token]] = vector.to(table.dtype)
    if (ckpt_dir / "unet").is_dir():
        pipe.unet = UNet2DConditionModel.from_pretrained(ckpt_dir / "unet", dtype=dtype).to(device)
    if getattr(pipe, "_personalize_lora", False):
        pipe.unload_lora_weights()
        pipe._personalize_lora = False
    if (ckpt_dir / LORA_FILE).exists():
        _warn_if_lora_scale_unknown(ckpt_dir)
        # the stock loader reads rank and alpha from the file's adapter metadata (see the module docstring)
        pipe.load_lora_weights(str(ckpt_dir), weight_name=LORA_FILE)
        pipe._personalize_lora = True
    return pipe


def _warn_if_lora_scale_unknown(ckpt_dir: Path) -> None:
    """A LoRA file without adapter metadata loads with alpha = rank; say so unless the run's config shows that
    is what trained (alpha = rank, the default), so an old checkpoint of an alpha != rank run is not silently
    evaluated as another model."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(ckpt_dir / LORA_FILE, "pt") as f:
        if LORA_ADAPTER_METADATA_KEY in (f.metadata() or {}):
            return
    run_dir = ckpt_dir.parent.parent  # <run>/checkpoints/step-NNNNNN
    lora = load_run_config(run_dir).method.get("lora") if (run_dir / CONFIG_FILE).exists() else None
    if lora is not None and float(lora.alpha) == float(lora.rank):
        return
    if lora is not None:
        why = f"its run trained method.lora.alpha={lora.alpha} with rank={lora.rank}: this is not the trained model"
    else:
        why = f"no {CONFIG_FILE} beside it tells the trained alpha: the model is the trained one only if alpha was = rank"
    log.warning("%s has no LoRA adapter metadata (written before alpha was saved), so it loads with alpha = rank; %s",
                ckpt_dir / LORA_FILE, why)


def load_checkpoint_pipeline(ckpt_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A stock `StableDiffusionPipeline` of the checkpoint's base model with the checkpoint applied."""
    from omegaconf import OmegaConf

    from personalize.models import load_pipeline

    info = read_info(ckpt_dir)
    model_cfg = OmegaConf.create(info["model"])
    pipe = load_pipeline(model_cfg, dtype=dtype).to(device)
    return apply_checkpoint(pipe, ckpt_dir)
