"""Crash and resume: what a killed run needs to continue, where it lives, and which run to continue.

A run dir holds, next to the stock-diffusers `checkpoints/step-NNNNNN/`, one `resume/step-NNNNNN/`: the
Lightning checkpoint of the same step (trained parameters only, optimizer states, loop counters, data
position, RNG states) written as `tensors.safetensors` + `state.json`. Lightning's own restore
(`trainer.fit(ckpt_path=...)`) reads it back through `SafetensorsCheckpointIO`, so nothing is ever
unpickled. Only the newest resume state is kept: for a UNet method it is three UNets big (weights and
two Adam moments).

    personalize ... resume=true          # continue the newest run with the same settings (or start one)
    personalize ... resume=<run dir>     # continue that run

A resumed run writes into the original run dir (Hydra's new dir of the resuming call keeps only its log)
and, on CPU with the same config, ends bit-identical to a run that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from personalize.rundir import CONFIG_FILE, RESUME_DIR, list_step_dirs, load_run_config
from personalize.errors import PersonalizeError
from personalize.methods.trainables import structure as trainable_structure
from personalize.io import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"


# ---------------------------------------------------------------- the checkpoint format
class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning's checkpoint dict as a folder: every tensor in `tensors.safetensors`, the rest in `state.json`.

    Lightning's default `torch.save`/`torch.load` would unpickle the file on resume, and a pickle can run
    code; this format cannot. The folder is written atomically, so a kill mid-save leaves no resume state
    that a later run would trust.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        state = _encode(checkpoint, tensors, "")
        with atomic_dir(Path(path)) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE))
            atomic_write_text(tmp / STATE_FILE, json.dumps(state))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        path = Path(path)
        if not (path / STATE_FILE).exists() or not (path / TENSORS_FILE).exists():
            raise PersonalizeError(f"'{path}' is not a resume state (no {STATE_FILE}/{TENSORS_FILE}): resume from a run dir")
        return _decode(json.loads((path / STATE_FILE).read_text()), load_file(str(path / TENSORS_FILE)))

    def remove_checkpoint(self, path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def _encode(obj: Any, tensors: dict, key: str) -> Any:
    """JSON-able form of a checkpoint; tensors go to `tensors` under their path. Tuples and non-string dict
    keys (optimizer states are keyed by int) are tagged so they come back as they were."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: _encode(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{key}/k{i}"), _encode(v, tensors, f"{key}/{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} at '{key}' of a checkpoint as safetensors + JSON")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------- RNG states
def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG a step could draw from: the module's own noise generator, torch (CPU, CUDA), python, numpy."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": dict(np_state, state=dict(np_state["state"], key=np_state["state"]["key"].tolist())),
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(dict(np_state, state=dict(np_state["state"], key=np.asarray(np_state["state"]["key"], dtype=np.uint32))))
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- resume states of a run
def list_resume_states(run_dir: Path) -> list[Path]:
    """Complete resume states of a run, oldest first (a folder is complete once it has its state file)."""
    return list_step_dirs(Path(run_dir) / RESUME_DIR, STATE_FILE)


def latest_resume_state(run_dir: Path) -> Path | None:
    states = list_resume_states(run_dir)
    return states[-1] if states else None


def prune_resume_states(run_dir: Path, keep: Path) -> None:
    """Remove every resume state but `keep` (called once `keep` is complete)."""
    for state in list_resume_states(run_dir):
        if state != Path(keep):
            shutil.rmtree(state, ignore_errors=True)


# ---------------------------------------------------------------- which run to resume
# What decides a run's result: `resume=true` continues the newest run whose saved config agrees on all of it.
def _identity(config: dict) -> dict:
    class_images = {k: v for k, v in (config.get("class_images") or {}).items() if k != "batch_size"}
    return {
        "method": config.get("method"), "subject": (config.get("subject") or {}).get("name"),
        "model": (config.get("model") or {}).get("name"), "seed": config.get("seed"), "group": config.get("group"),
        "class_images": class_images,
    }


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _new_token(method: dict) -> dict | None:
    """The new token's settings; a run written before `num_vectors` existed had one vector."""
    token = method.get("new_token")
    return {**token, "num_vectors": token.get("num_vectors") or 1} if token else None


def _structure(config: dict) -> dict:
    """What a resume state's tensors depend on: a run cannot continue under a config that changes it."""
    method = config.get("method") or {}
    stages = list((method.get("stages") or {}).items())
    return {
        "method": method.get("name"), "identifier": method.get("identifier"), "new_token": _new_token(method),
        **trainable_structure(method),  # e.g. the LoRA rank and targets, where a stage trains LoRA
        "stages": [(name, list(s.get("train", []))) for name, s in stages],
        # every stage but the last must keep its length (the last may be extended)
        "stage_steps": [s.get("steps") for _, s in stages[:-1]],
        "model": (config.get("model") or {}).get("name"), "subject": (config.get("subject") or {}).get("name"),
    }


def _saved_config(run_dir: Path) -> dict:
    return OmegaConf.to_container(load_run_config(run_dir))


def _candidates(log_dir: Path, task_name: str) -> list[Path]:
    root = Path(log_dir) / task_name
    found = list(root.glob(f"runs/*/{CONFIG_FILE}")) + list(root.glob(f"multiruns/*/*/*/{CONFIG_FILE}"))
    return [p.parent for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def find_run(cfg, config: dict) -> Path | None:
    """The run dir that `cfg.resume` names: None for a fresh run."""
    resume = cfg.get("resume")
    if resume in (None, False) or str(resume).lower() in ("false", "none", "null", ""):
        return None
    if resume is True or str(resume).lower() == "true":
        wanted = _identity(config)
        for run_dir in _candidates(Path(cfg.paths.log_dir), str(cfg.task_name)):
            try:
                if _identity(_saved_config(run_dir)) == wanted:
                    return run_dir
            except Exception as error:  # an unreadable config.yaml is not a run to continue
                log.warning("skipping '%s' while looking for a run to resume: %s", run_dir, error)
        log.info("resume=true: no earlier run with these settings under %s; starting a new one", cfg.paths.log_dir)
        return None
    run_dir = Path(str(resume)).expanduser().absolute()
    if not (run_dir / CONFIG_FILE).exists():
        raise PersonalizeError(
            f"resume={resume}: not a run dir of `personalize` (no {CONFIG_FILE}): pass a folder under "
            f"{cfg.paths.log_dir}/{cfg.task_name}/runs, or resume=true for the newest run with these settings"
        )
    check_compatible(_saved_config(run_dir), config, run_dir)
    return run_dir


def check_compatible(saved: dict, current: dict, run_dir: Path) -> None:
    """A run continues only under a config with the same structure; other changes are allowed but logged."""
    before, after = _flatten(_structure(saved)), _flatten(_structure(current))
    clash = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if clash:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in clash)
        raise PersonalizeError(
            f"cannot resume '{run_dir}' under this config ({diffs}): use the run's own settings "
            f"(see its {CONFIG_FILE}) or start a new run without resume="
        )
    ignore = ("paths.", "resume", "trainer.", "logger.", "tags")
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(ignore))
    if changed:
        log.warning("resuming '%s' with changed settings (%s): it will not match an uninterrupted run",
                    run_dir, ", ".join(changed))


# ---------------------------------------------------------------- ranks and leftovers
def is_launch_rank_zero() -> bool:
    """Whether this process is the global rank 0 of a (possibly multi-process) launch.

    Read from the launchers' environment, so it is known before the Trainer exists (config and class
    images are written before training starts)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        if int(os.environ.get(var, "0") or 0) != 0:
            return False
    return True
