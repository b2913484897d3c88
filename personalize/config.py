"""Config helpers shared by the CLI, tests and notebooks: resolvers and composing outside a Hydra app."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


def compose(config_name: str = "train", overrides: list[str] | None = None, output_dir: str | Path | None = None) -> DictConfig:
    """Compose a config as the CLI would (tests, notebooks); `output_dir` stands in for Hydra's run dir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"paths.output_dir={output_dir}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
