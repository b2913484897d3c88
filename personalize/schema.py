"""Config checks that turn a typo or a wrong name into one line before anything runs.

The schema is the conf/ folder itself, so it needs no upkeep: the known keys are those of the primary
config (train.yaml, ...) and the union of the keys of every option of each group (conf/<group>/*.yaml);
`method.stages.<any name>` takes the fields of `Stage`. Files packaged `_global_` (experiment, debug,
local) only override: a key they set must exist elsewhere, so a new setting gets its default (and its
comment) in train.yaml or in a group file.

- `check_config(cfg)`: every key of a composed config is known (a key typo'd in a YAML file or added
  with `+` would otherwise be silently ignored).
- `preflight(config_name, argv)`: the command line's group options and keys exist, checked before Hydra
  composes (Hydra's own messages are many lines and exit 1). `checked_cli` wraps an entry point with it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import sys
from dataclasses import fields
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from personalize.config import CONF_DIR
from personalize.errors import PersonalizeError

_ANY = "*"  # a mapping whose keys are names the user picks (stage names)


def _stage_keys() -> dict:
    from personalize.methods.stages import Stage

    return {f.name: None for f in fields(Stage) if f.name not in ("name", "start")}


def _is_global(path: Path) -> bool:
    head = path.read_text().lstrip().splitlines()[:3]
    return any(line.replace(" ", "").startswith("#@package_global_") for line in head)


def _merge(tree: dict, node) -> None:
    """Add the keys of a YAML mapping to a tree of known keys (a leaf is None)."""
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            child = tree.get(key)
            if not isinstance(child, dict):
                child = tree[key] = {}
            _merge(child, value)
        else:
            tree.setdefault(key, None)


@lru_cache(maxsize=None)
def known_keys(config_name: str = "train", conf_dir: str = str(CONF_DIR)) -> dict:
    """The tree of keys a composed `config_name` may have."""
    conf = Path(conf_dir)
    tree: dict = {}
    primary = OmegaConf.to_container(OmegaConf.load(conf / f"{config_name}.yaml"))
    for entry in primary.get("defaults", []):  # another primary config it builds on (report.yaml: train)
        if isinstance(entry, str) and entry != "_self_" and (conf / f"{entry}.yaml").is_file():
            _merge(tree, known_keys(entry, conf_dir))
    _merge(tree, primary)
    tree.pop("hydra", None)
    for group in sorted(p for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        subtree = tree.get(group.name) if isinstance(tree.get(group.name), dict) else {}
        for option in sorted(group.rglob("*.yaml")):
            if not _is_global(option):
                _merge(subtree, OmegaConf.to_container(OmegaConf.load(option)) or {})
        if subtree:  # groups of `_global_` files only (experiment, debug) add no key of their own
            tree[group.name] = subtree
    if isinstance(tree.get("method"), dict):
        tree["method"]["stages"] = {_ANY: _stage_keys()}
    return tree


def group_options(group: str, conf_dir: str = str(CONF_DIR)) -> list[str]:
    """The options of a group, as Hydra names them (`sub/name` for files in subfolders)."""
    root = Path(conf_dir) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.stem.startswith("_"))


def _unknown(tree: dict, parts: list[str]) -> str | None:
    """None if the key path is known, else a one-line message about the first unknown part."""
    node = tree
    for i, part in enumerate(parts):
        if node is None:  # below a leaf: a value the schema does not describe (free-form)
            return None
        if part in node:
            node = node[part]
        elif _ANY in node:
            node = node[_ANY]
        else:
            where = ".".join(parts[:i])
            names = sorted(k for k in node if k != _ANY)
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            shown = ", ".join(names[:15]) + (", ..." if len(names) > 15 else "")
            return (f"unknown config key '{'.'.join(parts[:i + 1])}': {hint}"
                    f"the keys {'under ' + repr(where) if where else 'at the top level'} are: {shown}")
    return None


def _key_paths(node, prefix: tuple = ()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (str(key),)
            yield from _key_paths(value, prefix + (str(key),))


def check_config(cfg: DictConfig, config_name: str = "train") -> None:
    """Every key of the composed config must be known (see the module docstring)."""
    tree = known_keys(config_name)
    container = OmegaConf.to_container(cfg, resolve=False)
    for parts in _key_paths(container):
        message = _unknown(tree, list(parts))
        if message:
            raise PersonalizeError(f"{message} (fix the key in your command line or config file)")


def check_run_settings(cfg: DictConfig, stages) -> None:
    """Settings whose problems would otherwise show up mid-run."""
    if int(cfg.method.batch_size) <= 0:
        raise PersonalizeError(f"method.batch_size={cfg.method.batch_size}: use 1 or more photos per step and process")
    hw = cfg.hardware
    devices = hw.get("devices", 1)
    # -1 / "auto" / a list of ids may all mean several processes
    multi_process = (len(devices) > 1 if OmegaConf.is_list(devices) or isinstance(devices, list) else str(devices) != "1") \
        or int(hw.get("num_nodes", 1) or 1) > 1
    if multi_process and str(hw.strategy) in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        if len({tuple(sorted(s.train)) for s in stages}) > 1:
            raise PersonalizeError(
                f"hardware.strategy={hw.strategy} with method {cfg.method.name}: its stages train different parameters, "
                "which plain DDP cannot follow; use hardware.strategy=ddp_find_unused_parameters_true (hardware=ddp does)"
            )


# ---------------------------------------------------------------- the command line
def preflight(config_name: str, argv: list[str]) -> None:
    """Check the command line's group options and config keys before Hydra composes anything."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # not a command line Hydra accepts either: let it say why
        return
    if args.shell_completion:  # `-sc install=bash` / `-sc query=bash`: words for Hydra, not overrides
        return
    config_name = args.config_name or config_name
    if args.config_path or args.config_dir or not (Path(CONF_DIR) / f"{config_name}.yaml").exists():
        return  # a config from elsewhere: Hydra checks it
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # a syntax error: Hydra reports it with its position
        return
    tree = known_keys(config_name)
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    for override in overrides:
        key = override.key_or_group
        if key.startswith("hydra") or "/" in key or override.is_delete():
            continue
        group = key.split("@")[0]
        if group in groups:
            options = group_options(group)
            if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
                if not override.value().filter(options):
                    raise PersonalizeError(f"{override.input_line}: matches no {group}; the {group}s are: {', '.join(options)}")
                continue
            if override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
                values = list(override.sweep_string_iterator())
            elif override.value_type == ValueType.ELEMENT:
                values = [override.value()]
            else:
                continue
            for value in values:
                if value is not None and str(value) not in options:
                    close = difflib.get_close_matches(str(value), options, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise PersonalizeError(f"unknown {group} '{value}'{hint}: the {group}s are: {', '.join(options)}")
        else:
            message = _unknown(tree, key.split("."))
            if message:
                raise PersonalizeError(f"{message} (in `{override.input_line}`)")


def checked_cli(config_name: str):
    """Decorate a `@hydra.main` entry point: a bad command line is one `error:` line and exit code 2."""
    def wrap(main):
        @functools.wraps(main)
        def entry(*args, **kwargs):
            try:
                preflight(config_name, sys.argv[1:])
            except PersonalizeError as error:
                print(f"error: {error}", file=sys.stderr)
                raise SystemExit(2)
            return main(*args, **kwargs)
        return entry
    return wrap
