"""What the benchmark measures, read from conf/method/ and benchmarks/variants.yaml rather than listed here.

Every method file not starting with `_` is a method, composed by Hydra (so its `defaults` apply, as in
a run); each of its stages is a training row. A new method YAML therefore appears in the benchmark,
with its rows in the table and the JSON, without an edit here.

An option variant (variants.yaml) is a method with a few overrides (`lora+dora`: method=lora
method.lora.use_dora=true): it is measured as a run of its own, and each of its stages also against the
same stage of its plain method.

Row names: the method's (or variant's) name when it has one stage (`dreambooth`, `lora+dora`),
`name.stage` otherwise (`two_stage.token`, `two_stage.unet`): the ids docs/benchmark.md cites.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from personalize.config import CONF_DIR

VARIANTS_FILE = Path(__file__).resolve().parent / "variants.yaml"


@dataclass(frozen=True)
class Variant:
    name: str  # its rows' name, e.g. lora+dora
    method: str  # the conf/method/ file it starts from
    overrides: tuple[str, ...]  # Hydra overrides of the train config, e.g. method.lora.use_dora=true
    what: str  # what it changes, for the table's why


@dataclass(frozen=True)
class TrainingRow:
    name: str  # the row's name in its ids (step_vs_floor/<name>, naive_vs_ours/<name>)
    method: str  # conf/method/<method>.yaml
    stage: str  # a key of its `stages`
    run: str = ""  # the measured run it comes from: the method's name, or the variant's
    plain: str | None = None  # a variant's row: the plain method's row of the same stage

    def __post_init__(self):
        if not self.run:
            object.__setattr__(self, "run", self.method)


def method_names(conf_dir: Path = CONF_DIR) -> list[str]:
    """The methods of <conf>/method/, in file-name order (files starting with `_` are shared parts)."""
    return sorted(path.stem for path in (Path(conf_dir) / "method").glob("*.yaml") if not path.stem.startswith("_"))


def method_stages(method: str, conf_dir: Path = CONF_DIR, overrides: tuple[str, ...] = ()) -> dict[str, dict]:
    """stage name -> its settings as configured (steps, lr, prior_loss_weight, ...), in training order."""
    if overrides:
        return _compose_method(str(Path(conf_dir).resolve()), method, tuple(overrides))["stages"]
    return _all_stages(str(Path(conf_dir).resolve()))[method]


def composed_method(method: str, conf_dir: Path = CONF_DIR, overrides: tuple[str, ...] = ()) -> dict:
    """The method's whole config as a run composes it (with `overrides`), as a plain dict (its stages resolved)."""
    return _compose_method(str(Path(conf_dir).resolve()), method, tuple(overrides))


def _stem(name: str) -> str:
    return name.removesuffix(".yaml")


@functools.lru_cache(maxsize=None)
def _all_stages(conf_dir: str) -> dict[str, dict[str, dict]]:
    """Every method's stages, each file composed by Hydra as a run would (its defaults list applies)."""
    return {name: _compose_method(conf_dir, name, ())["stages"] for name in method_names(Path(conf_dir))}


@functools.lru_cache(maxsize=None)
def _compose_method(conf_dir: str, method: str, overrides: tuple[str, ...]) -> dict:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = compose(config_name=f"method/{_stem(method)}", overrides=list(overrides)).method
            # interpolations outside the method (a new token's ${subject.init_word}) stay unresolved
            return dict(OmegaConf.to_container(cfg), stages=OmegaConf.to_container(cfg.stages, resolve=True))
    finally:
        GlobalHydra.instance().clear()


def variants(path: Path = VARIANTS_FILE, conf_dir: Path = CONF_DIR) -> list[Variant]:
    """The option variants of variants.yaml, in file order; a variant of no method of `conf_dir` is an error."""
    known = method_names(conf_dir)
    found = []
    for name, spec in (OmegaConf.to_container(OmegaConf.load(path)) or {}).items():
        if spec.get("method") not in known:
            raise ValueError(f"{path}: variant {name!r} has method {spec.get('method')!r}, which is not a method "
                             f"of {Path(conf_dir) / 'method'}: choose from {', '.join(known)}")
        found.append(Variant(str(name), spec["method"], tuple(spec.get("overrides") or ()), str(spec.get("what", ""))))
    return found


def row_name(run: str, stage: str, stages: list[str]) -> str:
    return run if len(stages) == 1 else f"{run}.{stage}"


def training_rows(conf_dir: Path = CONF_DIR, variants_file: Path = VARIANTS_FILE) -> list[TrainingRow]:
    """Every stage of every method, then every stage of every variant (each naming its plain row)."""
    rows = []
    for method in method_names(conf_dir):
        stages = list(method_stages(method, conf_dir))
        rows += [TrainingRow(row_name(method, stage, stages), method, stage) for stage in stages]
    for variant in variants(variants_file, conf_dir):
        plain = list(method_stages(variant.method, conf_dir))
        stages = list(method_stages(variant.method, conf_dir, variant.overrides))
        rows += [TrainingRow(row_name(variant.name, stage, stages), variant.method, stage, run=variant.name,
                             plain=row_name(variant.method, stage, plain) if stage in plain else None)
                 for stage in stages]
    return rows


def run_names(conf_dir: Path = CONF_DIR, variants_file: Path = VARIANTS_FILE) -> list[str]:
    """The measured runs: every method, then every variant (one worker process each)."""
    return method_names(conf_dir) + [v.name for v in variants(variants_file, conf_dir)]


@functools.lru_cache(maxsize=None)
def class_image_count() -> int:
    """`class_images.count` of conf/train.yaml: how many class images a prior-preserving run makes."""
    return int(OmegaConf.load(CONF_DIR / "train.yaml").class_images.count)
