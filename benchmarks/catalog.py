"""What the benchmark measures, read from conf/method/ rather than listed here.

Every method file not starting with `_` is a method, composed by Hydra (so its `defaults` apply, as in
a run); each of its stages is a training row. A new method YAML therefore appears in the benchmark,
with its rows in the table and the JSON, without an edit here.

Row names: the method's name when it has one stage (`dreambooth`), `method.stage` otherwise
(`two_stage.token`, `two_stage.unet`): the ids docs/benchmark.md cites.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from personalize.config import CONF_DIR


@dataclass(frozen=True)
class TrainingRow:
    name: str  # the row's name in its ids (step_vs_floor/<name>, naive_vs_ours/<name>)
    method: str  # conf/method/<method>.yaml
    stage: str  # a key of its `stages`


def method_names(conf_dir: Path = CONF_DIR) -> list[str]:
    """The methods of <conf>/method/, in file-name order (files starting with `_` are shared parts)."""
    return sorted(path.stem for path in (Path(conf_dir) / "method").glob("*.yaml") if not path.stem.startswith("_"))


def method_stages(method: str, conf_dir: Path = CONF_DIR) -> dict[str, dict]:
    """stage name -> its settings as configured (steps, lr, prior_loss_weight, ...), in training order."""
    return _all_stages(str(Path(conf_dir).resolve()))[method]


@functools.lru_cache(maxsize=None)
def _all_stages(conf_dir: str) -> dict[str, dict[str, dict]]:
    """Every method's stages, each file composed by Hydra as a run would (its defaults list applies)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            return {name: OmegaConf.to_container(compose(config_name=f"method/{name}").method.stages, resolve=True)
                    for name in method_names(Path(conf_dir))}
    finally:
        GlobalHydra.instance().clear()


def training_rows(conf_dir: Path = CONF_DIR) -> list[TrainingRow]:
    rows = []
    for method in method_names(conf_dir):
        stages = list(method_stages(method, conf_dir))
        rows += [TrainingRow(method if len(stages) == 1 else f"{method}.{stage}", method, stage) for stage in stages]
    return rows


@functools.lru_cache(maxsize=None)
def class_image_count() -> int:
    """`class_images.count` of conf/train.yaml: how many class images a prior-preserving run makes."""
    return int(OmegaConf.load(CONF_DIR / "train.yaml").class_images.count)
