"""Checkpoint folders of a run dir: their layout, names and info file (no torch here).

Loading one into a stock pipeline is `personalize.artifacts`; what each file holds and how it loads
belongs to the Trainable that writes it (`personalize.methods.trainables`).

`checkpoints/step-000200/` holds exactly what trained up to that step and nothing else:
- `learned_embeds.safetensors` ({token: tensor[dim]}) -> `pipe.load_textual_inversion(dir)`
- `pytorch_lora_weights.safetensors` (`unet.`-prefixed diffusers keys) -> `pipe.load_lora_weights(dir)`;
  its header holds the adapter's LoraConfig under `lora_adapter_metadata`, as diffusers writes it, so the
  loader rebuilds the trained rank and alpha. A file written before that (no metadata) still loads, with
  alpha = rank as diffusers assumes: the trained model only if the run had method.lora.alpha = rank
  (loading warns when it cannot tell or the run's config says otherwise).
- `pytorch_custom_diffusion_weights.safetensors` (Custom Diffusion's cross-attention k/v) ->
  `pipe.unet.load_attn_procs(dir, weight_name=...)`
- `unet/` and `text_encoder/` via `save_pretrained` -> `X.from_pretrained(dir / "unet")`
- `checkpoint.json`: step, stage, base model, prompt, identifier: what a sampler needs to know.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from personalize.errors import PersonalizeError

CONFIG_FILE = "config.yaml"  # a run dir's resolved config, written once when the run begins
INFO_FILE = "checkpoint.json"
EMBEDS_FILE = "learned_embeds.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"
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
