"""`personalize-eval run_dir=<run>`: evaluate an existing run dir again (no training), with this command's
evaluation, logger and hardware settings in place of the run's own."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from personalize.config import CONF_DIR
from personalize.devices import device_of, resolve_hardware
from personalize.errors import PersonalizeError
from personalize.eval.evaluate import evaluate_run
from personalize.eval.settings import EvalSettings, check_settings
from personalize.rundir import load_run_config
from personalize.tracking import build_logger, finishing_wandb


def _with_eval_models(container: dict) -> dict:
    """Runs written before evaluation existed have no model.eval_models: take them from conf/model/<name>."""
    model = container.get("model") or {}
    if "eval_models" not in model:
        source = CONF_DIR / "model" / f"{model.get('name')}.yaml"
        if not source.exists():
            raise PersonalizeError(
                f"the run's model '{model.get('name')}' has no eval_models: set eval.clip_model, eval.dino_model, "
                "eval.tiny_models and eval.fid_features on the command line")
        model["eval_models"] = OmegaConf.to_container(OmegaConf.load(source).eval_models, resolve=False)
    return container


def eval_config(cli_cfg: DictConfig) -> DictConfig:
    """The run's own config with this command's eval, logger, hardware and cache paths in place of its own."""
    run_dir = Path(str(cli_cfg.run_dir)).expanduser()
    container = OmegaConf.to_container(load_run_config(run_dir), resolve=False)
    cli = OmegaConf.to_container(cli_cfg, resolve=False)
    for key in ("eval", "logger", "hardware"):
        container[key] = cli[key]
    paths = dict(container.get("paths") or {})
    paths.update({k: v for k, v in cli["paths"].items() if k != "output_dir"})
    container["paths"] = paths
    container["task_name"] = cli.get("task_name", "eval")
    if cli.get("tags"):
        container["tags"] = list(container.get("tags") or []) + list(cli["tags"])
    container["run_dir"] = str(run_dir)
    return OmegaConf.create(_with_eval_models(container))


def evaluate_run_dir(cli_cfg: DictConfig) -> list[dict]:
    """Re-evaluate an existing run dir (no training), logging to a new W&B run (job type `eval`) in it."""
    cfg = eval_config(cli_cfg)
    run_dir = Path(cfg.run_dir)
    accelerator, _, dtype = resolve_hardware(cfg.hardware)
    settings = EvalSettings.from_cfg(cfg.eval)
    check_settings(settings)
    with finishing_wandb():
        logger = build_logger(cfg, run_dir) if settings.enabled else False
        records = evaluate_run(run_dir, cfg.eval, run_cfg=cfg, device=device_of(accelerator), dtype=dtype, logger=logger)
    return records
