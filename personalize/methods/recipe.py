"""Which training options a run set away from its method's defaults: what checkpoint.json names.

A checkpoint records the settings that make it differ from what its method's YAML (conf/method/<name>.yaml
over _common.yaml) would train, so two checkpoints of "lora" with different `method.loss.snr_gamma` are
told apart without opening config.yaml. Values that the method file takes from elsewhere by
interpolation (`${subject.init_word}`) are the subject's, not the recipe's, and are left out.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from personalize.config import CONF_DIR


def method_defaults(name: str) -> DictConfig | None:
    """conf/method/<name>.yaml merged over the files its defaults list names, unresolved; None if unknown."""
    folder = CONF_DIR / "method"
    path = folder / f"{name}.yaml"
    if not name or name.startswith("_") or not path.is_file():
        return None
    own = OmegaConf.load(path)
    merged = OmegaConf.create()
    for entry in own.get("defaults") or []:
        if str(entry) == "_self_":
            merged = OmegaConf.merge(merged, {k: v for k, v in own.items() if k != "defaults"})
        elif (folder / f"{entry}.yaml").is_file():
            merged = OmegaConf.merge(merged, OmegaConf.load(folder / f"{entry}.yaml"))
    return merged


def _leaves(node: Any, prefix: str = ""):
    if isinstance(node, DictConfig):
        for key in node:
            if OmegaConf.is_interpolation(node, key):
                yield f"{prefix}{key}", _INTERPOLATED
            else:
                yield from _leaves(node[key], f"{prefix}{key}.")
    else:
        value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
        yield prefix.rstrip("."), value


_INTERPOLATED = object()


def overrides(method_cfg) -> dict[str, Any]:
    """`method.<key>: value` for every setting of the run's method that differs from its method file.

    Stages of the file that the run dropped, or stages the run added, show as the stage's whole entry."""
    defaults = method_defaults(str(method_cfg.get("name", "")))
    run = method_cfg if isinstance(method_cfg, DictConfig) else OmegaConf.create(method_cfg)
    if defaults is None:
        return {}
    default_leaves = dict(_leaves(defaults))
    changed = {}
    for key, value in _leaves(run):
        default = default_leaves.get(key, _MISSING)
        if default is _INTERPOLATED:
            continue
        if default is _MISSING or default != value:
            changed[f"method.{key}"] = value
    return changed


_MISSING = object()
