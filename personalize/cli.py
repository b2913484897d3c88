"""Command-line entry points (Hydra apps). Each prints a PersonalizeError as one line, no traceback.

In a multirun a failing job writes FAILED into its run dir and returns, so the sweep goes on.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from personalize.config import CONF_DIR as _CONF_DIR
from personalize.errors import PersonalizeError

CONF_DIR = str(_CONF_DIR)
log = logging.getLogger("personalize")


def quiet_libraries() -> None:
    """Keep the console to our own progress: no per-file loading bars or library chatter."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*modules? in eval mode.*", ".*LeafSpec.*", ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:  # composed outside a Hydra app (tests)
        return False


def run_task(task, cfg: DictConfig):
    """Run `task(cfg)`; user errors become one line (and a FAILED file in multirun, without stopping it)."""
    quiet_libraries()
    try:
        return task(cfg)
    except PersonalizeError as error:
        print(f"error: {error}", file=sys.stderr)
        if _is_multirun():
            from personalize.io import atomic_write_text

            atomic_write_text(Path(cfg.paths.output_dir) / "FAILED", f"{error}\n")
            log.error("job failed: %s", error)
            return None
        raise SystemExit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_main(cfg: DictConfig):
    from personalize.train import train

    result = run_task(train, cfg)
    return None if result is None else str(result.run_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def sample_main(cfg: DictConfig):
    from personalize.checkpoints import resolve_checkpoint
    from personalize.sample import sample_checkpoint

    def task(cfg):
        ckpt = resolve_checkpoint(Path(cfg.run_dir), cfg.step)
        out = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.run_dir) / "samples" / f"{ckpt.name}-cli"
        paths = sample_checkpoint(ckpt, list(cfg.prompts), out, num_images=int(cfg.num_images), seed=int(cfg.seed),
                                  steps=int(cfg.steps), guidance_scale=float(cfg.guidance_scale), sampler=str(cfg.sampler),
                                  device=cfg.device)
        print(f"wrote {len(paths)} images to {out}")
        return out

    return run_task(task, cfg)


if __name__ == "__main__":  # python -m personalize.cli ...
    train_main()
