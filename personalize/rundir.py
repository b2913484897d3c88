"""The run directory, the contract between training, evaluation, sampling, editing and the report.

Everything that names a file or folder of a run dir, reads `config.yaml` or `checkpoint.json`, or reads or
appends `metrics.jsonl` does it here. No torch is imported (only the standard library and omegaconf), so
the report and other readers of finished runs start fast on a machine without the training stack.

    <run>/config.yaml                          the resolved config the run began with (written once)
    <run>/.hydra/config.yaml                   Hydra's composed config (all a run that failed a check has)
    <run>/checkpoints/step-NNNNNN/             what trained up to step N, in stock diffusers formats:
        checkpoint.json                        a CheckpointInfo: step, stage, subject, base model, prompt
        learned_embeds.safetensors             {token: tensor[dim]}  -> pipe.load_textual_inversion(dir)
                                               SDXL {clip_l, clip_g} / FLUX {clip_l, t5}: [n, dim] each, the token
                                               in the metadata -> load_textual_inversion per encoder
        pytorch_lora_weights.safetensors       `unet.`-prefixed diffusers keys -> pipe.load_lora_weights(dir)
        pytorch_custom_diffusion_weights.safetensors   cross-attention k/v -> unet.load_attn_procs(dir, ...)
        unet/, text_encoder/                   save_pretrained -> X.from_pretrained(dir / "unet")
    <run>/resume/step-NNNNNN/                  Lightning's resume state (personalize.resume owns its files)
    <run>/eval/step-NNNNNN/<protocol>/         pXX_iXX.png (prompt XX, image XX), spec.json, grid.png
    <run>/eval/base/                           the prior protocol's base-model images (unless shared)
    <run>/metrics.jsonl                        one record per checkpoint x protocol (x settings key)
    <run>/samples/                             images sampled from the last checkpoint
    <run>/INTERRUPTED, <run>/FAILED            how a stopped or failed run ended

What each checkpoint file holds and how it loads belongs to the Trainable that writes it
(`personalize.methods.trainables`); loading a checkpoint into a pipeline is `personalize.artifacts`.
The LoRA file's header holds the adapter's LoraConfig under `lora_adapter_metadata`, as diffusers writes
it, so the loader rebuilds the trained rank and alpha; a file written before that loads with alpha = rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from personalize.errors import PersonalizeError
from personalize.io import atomic_write_json, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- layout
CONFIG_FILE = "config.yaml"
HYDRA_CONFIG_FILE = Path(".hydra") / "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
RESUME_DIR = "resume"
EVAL_DIR = "eval"
SAMPLES_DIR = "samples"
WANDB_DIR = "wandb"
METRICS_FILE = "metrics.jsonl"
INTERRUPTED_FILE = "INTERRUPTED"  # JSON: the run was stopped by a signal and can be resumed (personalize.signals)
FAILED_FILE = "FAILED"  # text: a multirun job's error, the sweep went on without it

INFO_FILE = "checkpoint.json"
EMBEDS_FILE = "learned_embeds.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"

# inside eval/step-NNNNNN/<protocol>/
SPEC_FILE = "spec.json"  # what decided the images (generation settings, prompts); they are reused only if it matches
GRID_FILE = "grid.png"  # the grid that went to W&B
BASE_IMAGES_DIR = "base"  # eval/base: the prior protocol's base-model images when eval.base_image_dir is unset
_IMAGE_NAME = re.compile(r"^p(\d+)_i(\d+)\.png$")
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Folders of a run dir that never hold another run (a walk over a sweep skips them).
RUN_SUBDIRS = (CHECKPOINTS_DIR, RESUME_DIR, EVAL_DIR, SAMPLES_DIR, WANDB_DIR)


def step_name(step: int) -> str:
    """The folder name of a step's checkpoint, resume state and evaluation: step-000300."""
    return f"step-{int(step):06d}"


def step_of(folder: str | Path) -> int | None:
    """The step a `step-NNNNNN` folder belongs to; None for any other name."""
    match = _STEP_DIR.match(Path(folder).name)
    return int(match.group(1)) if match else None


def list_step_dirs(root: Path, marker: str) -> list[Path]:
    """The complete `step-NNNNNN` folders under `root`, by step (complete: `marker` exists in it, as the
    last file its writer puts there)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and (p / marker).exists()]
    return sorted(found, key=step_of)


def config_path(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / step_name(step)


def resume_state_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / RESUME_DIR / step_name(step)


def samples_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SAMPLES_DIR


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def eval_dir(run_dir: Path, checkpoint: str | Path, protocol: str) -> Path:
    """Where a checkpoint's images of one protocol go: <run>/eval/<checkpoint folder name>/<protocol>."""
    return Path(run_dir) / EVAL_DIR / Path(checkpoint).name / protocol


def base_images_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL_DIR / BASE_IMAGES_DIR


def image_name(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:02d}_i{image_index:02d}.png"


def parse_image_name(name: str) -> tuple[int, int] | None:
    """(prompt index, image index) of an evaluation image's file name; None for any other file."""
    match = _IMAGE_NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


# ---------------------------------------------------------------------------------------- config.yaml
def run_config_path(run_dir: Path, early: bool = False) -> Path | None:
    """The run's config file: its config.yaml, or with `early` Hydra's .hydra/config.yaml where the run
    stopped before writing its own (a check failed); None if there is neither."""
    for candidate in (CONFIG_FILE, HYDRA_CONFIG_FILE) if early else (CONFIG_FILE,):
        path = Path(run_dir) / candidate
        if path.is_file():
            return path
    return None


def load_run_config(run_dir: Path, early: bool = False) -> DictConfig:
    """The config a run began with (its `config.yaml`, resolved when written), as a DictConfig.

    `early`: also accept Hydra's unresolved `.hydra/config.yaml` of a run that never wrote its own.
    """
    path = run_config_path(run_dir, early)
    if path is None:
        raise PersonalizeError(f"'{run_dir}' has no {CONFIG_FILE}: pass a run dir written by `personalize`")
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # yaml's scanner/parser errors and OmegaConf's own: the file is not usable either way
        raise PersonalizeError(f"'{path}' is not a readable config ({type(error).__name__}: {error}): "
                               "restore it or remove the run dir") from error
    if not isinstance(config, DictConfig):
        raise PersonalizeError(f"'{path}' holds a {type(config).__name__}, not a config mapping: restore it or remove the run dir")
    return config


# ------------------------------------------------------------------------------------ checkpoint.json
@dataclass
class CheckpointInfo:
    """`checkpoint.json`: which step and stage a checkpoint is, of which method, subject and base model,
    and what a sampler needs to prompt it.

    `from_json` reads every checkpoint.json written so far (fields added later get their defaults, keys
    this version does not know are kept in `extra`); `to_json` writes the keys checkpoints have always
    had (and a later field only where it is set), so stock readers and older code read the new files.
    """

    step: int  # the global step the checkpoint was saved after
    identifier: str  # the trained token or rare word ("<rare>", "sks")
    class_noun: str
    model: dict[str, Any]  # the base model's config (`pretrained` resolved to what was loaded)
    phrase: str = ""  # what replaces {} in prompts ("<rare> dog"); from_json: "{identifier} {class_noun}" if absent
    stage: str | None = None  # the stage that trained last
    stage_step: int | None = None  # steps into that stage
    method: str | None = None
    subject: str | None = None
    kind: str = "object"  # DreamBooth's prompt list: "object" or "live"
    prompt: str | None = None  # the instance prompt it trained with
    seed: int = 0
    contents: list[str] = field(default_factory=list)  # the files and folders its Trainables saved
    # the run's method settings that differ from its method file ({"method.loss.snr_gamma": 5.0}): methods/recipe.py
    overrides: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, written back as read

    REQUIRED = ("step", "identifier", "class_noun", "model")
    # Fields added after the first checkpoints: written only when not empty, so the file of a run that sets
    # none has exactly the keys checkpoints always had.
    WRITTEN_WHEN_SET = ("overrides",)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str | Path = "checkpoint.json") -> "CheckpointInfo":
        if not isinstance(data, Mapping):
            raise PersonalizeError(f"'{source}' holds a {type(data).__name__}, not a checkpoint record: "
                                   "pass a checkpoint folder written by `personalize`")
        missing = [k for k in cls.REQUIRED if data.get(k) is None]
        if missing:
            raise PersonalizeError(f"'{source}' has no {', '.join(missing)}: it is not a checkpoint record of "
                                   "`personalize`; pass a run's checkpoints/step-NNNNNN")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**{
                **values,
                "step": int(values["step"]),
                "identifier": str(values["identifier"]), "class_noun": str(values["class_noun"]),
                "phrase": str(values["phrase"]) if values.get("phrase") is not None
                else f"{values['identifier']} {values['class_noun']}".strip(),
                "model": dict(values["model"]),
                "stage_step": None if values.get("stage_step") is None else int(values["stage_step"]),
                "seed": int(values.get("seed") or 0),
                "kind": str(values.get("kind") or "object"),
                "contents": [str(c) for c in values.get("contents") or []],
                "overrides": dict(values.get("overrides") or {}),
                "extra": {k: v for k, v in data.items() if k not in known},
            })
        except (TypeError, ValueError) as error:
            raise PersonalizeError(f"'{source}' has a value of the wrong type ({error}): restore the file from "
                                   "the run, or save the checkpoint again") from error

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "extra" and (f.name not in self.WRITTEN_WHEN_SET or getattr(self, f.name))}
        return {**self.extra, **data}

    def prompt_values(self) -> dict[str, str]:
        """What a prompt template may name: {phrase}, {identifier}, {class_noun}."""
        return {"phrase": self.phrase, "identifier": self.identifier, "class_noun": self.class_noun}

    @property
    def name(self) -> str:
        """The checkpoint folder's name (step-NNNNNN)."""
        return step_name(self.step)


def read_info(ckpt_dir: Path) -> CheckpointInfo:
    path = Path(ckpt_dir) / INFO_FILE
    if not path.exists():
        raise PersonalizeError(f"'{ckpt_dir}' is not a checkpoint folder (no {INFO_FILE}): pass a run's checkpoints/step-NNNNNN")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PersonalizeError(f"'{path}' is not valid JSON ({error}): restore it, or delete the checkpoint folder") from error
    return CheckpointInfo.from_json(data, path)


def write_info(ckpt_dir: Path, info: CheckpointInfo) -> Path:
    path = Path(ckpt_dir) / INFO_FILE
    atomic_write_json(path, info.to_json())
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, by step (a folder without its info file is not complete)."""
    return list_step_dirs(Path(run_dir) / CHECKPOINTS_DIR, INFO_FILE)


def resolve_checkpoint(run_or_ckpt: Path, step: int | str | None = None) -> Path:
    """A checkpoint folder from a run dir (+ step, default the last) or a checkpoint folder itself."""
    path = Path(run_or_ckpt)
    if (path / INFO_FILE).exists():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise PersonalizeError(f"no checkpoints under '{path}/{CHECKPOINTS_DIR}': pass a run dir written by `personalize`")
    if step in (None, "last", "latest"):
        return checkpoints[-1]
    wanted = checkpoint_dir(path, int(step))
    if wanted not in checkpoints:
        steps = ", ".join(str(step_of(c)) for c in checkpoints)
        raise PersonalizeError(f"run '{path}' has no checkpoint at step {step}: available steps are {steps}")
    return wanted


# -------------------------------------------------------------------------------------- metrics.jsonl
# The evaluation appends one record per (checkpoint step, protocol, settings key) and may append again for
# the same ones (a resumed evaluation, a metric asked for later, other settings). One rule reads them, for
# the evaluation's "is this pair done" and for the report alike (`merge_records`, `current_records`):
# - records of the same (step, protocol, key) extend each other: a later value replaces an earlier one,
#   except that a missing value (None: the metric was not finite) never erases a number;
# - of several keys of one (step, protocol), the one written last is the current one.

# One record per run is not a checkpoint's: the subject's photos scored against each other (eval.real_images,
# personalize/eval/real_images.py), the "real images" row of a report. Its protocol and step, and its metrics:
REAL_IMAGES_PROTOCOL = "real_images"
REAL_IMAGES_STEP = 0  # before any training step
REAL_IMAGES_METRICS = ("clip_i", "dino")  # the image-image similarities; the others have no real-images value

# What a record holds besides its metric values (which sit beside these, under the metric's name).
RECORD_FIELDS = ("step", "stage", "stage_step", "method", "subject", "checkpoint", "protocol", "references",
                 "num_images", "metric_settings", "key", "spec", "seconds", "time", "base_images")
# ... and what tools that gather records from many runs put beside them.
RECORD_KEYS = frozenset(RECORD_FIELDS) | {"seed", "run_dir"}


def read_records(run_dir: Path) -> list[dict]:
    """Every record of `<run>/metrics.jsonl` that names its step and protocol, in file order (a line that
    does not parse, cut short by a kill or edited by hand, is skipped with a warning)."""
    return [r for r in read_jsonl(metrics_path(run_dir), log) if "step" in r and "protocol" in r]


def append_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Add one record, atomically: the whole file is rewritten under a temporary name, so it never holds a
    half line. One writer per run dir at a time (two would each drop the other's record)."""
    path = metrics_path(run_dir)
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    atomic_write_text(path, text + json.dumps(dict(record), allow_nan=False) + "\n")


def record_key(record: Mapping[str, Any]) -> tuple[int, str, str]:
    """(step, protocol, settings key) of a record."""
    return int(record["step"]), str(record["protocol"]), str(record.get("key"))


def merge_records(records: Iterable[Mapping[str, Any]]) -> dict[tuple[int, str, str], dict]:
    """(step, protocol, key) -> its records merged in file order (the first record itself when it is the
    only one: nothing is copied until a second one extends it)."""
    merged: dict[tuple[int, str, str], dict] = {}
    for record in records:
        key = record_key(record)
        earlier = merged.get(key)
        if earlier is None:
            merged[key] = record  # type: ignore[assignment]
        else:
            merged[key] = {**earlier, **{k: v for k, v in record.items() if v is not None or k not in earlier}}
    return merged


def current_records(records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The current record of each (step, protocol), by step then protocol: the merged record of the settings
    key written last."""
    last_key: dict[tuple[int, str], tuple[int, str, str]] = {}
    for record in records:
        key = record_key(record)
        last_key[key[:2]] = key
    merged = merge_records(records)
    return [merged[last_key[pair]] for pair in sorted(last_key)]


def is_done(records: Iterable[Mapping[str, Any]], step: int, protocol: str, key: str,
            metrics: Sequence[str]) -> dict | None:
    """The merged record of (step, protocol, key) if it holds every metric of `metrics`, else None."""
    record = merge_records(records).get((int(step), str(protocol), str(key)))
    if record is not None and all(m in record for m in metrics):
        return record
    return None


def metric_names(record: Mapping[str, Any]) -> list[str]:
    """The metric values of a record: its numbers that are not one of the identifying fields."""
    return [k for k, v in record.items()
            if k not in RECORD_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)]
