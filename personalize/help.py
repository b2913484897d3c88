"""What `--help` prints for each entry point: what the tool does, three example commands, the groups.

Hydra's default help opens with "<app> is powered by Hydra" and lists every file of every config group,
internal ones (`method/_common`) included. Each primary config sets `hydra.help.template:
${personalize_help:<config name>}`; this resolver builds the text when Hydra renders the help, and
Hydra then fills in `$CONFIG` (the composed config) and `$FLAGS_HELP` as usual.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from personalize.config import CONF_DIR
from personalize.schema import group_options

# config name -> (command, what it does, example commands)
_APPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "train": (
        "personalize",
        "Teach a text-to-image diffusion model one subject from 4-6 photos (textual inversion, Zeng et al.'s\n"
        "two-stage method, DreamBooth, LoRA, fine-tuning), save stock-diffusers checkpoints, evaluate every\n"
        "checkpoint (CLIP-I, CLIP-T, DINO, FID, IS) and log it all to Weights & Biases.",
        (
            "personalize experiment=demo                                   # tiny model, offline, CPU: a first run",
            "personalize method=two_stage subject=dog model=sd21_base hardware=gpu_bf16",
            "personalize subject=folder subject.data_dir=~/photos/mug subject.class_noun=mug method=lora",
            "personalize -m experiment=zeng2023_table1                     # the paper's sweep, 60 jobs",
        ),
    ),
    "sample": (
        "personalize-sample",
        "Sample images from a checkpoint of a finished run through the stock diffusers pipeline.",
        (
            "personalize-sample run_dir=outputs/train/runs/<run>",
            "personalize-sample run_dir=outputs/train/runs/<run> step=400 prompts='[\"a {phrase} in the snow\"]'",
            "personalize-sample run_dir=<run> num_images=8 device=cuda",
        ),
    ),
    "evaluate": (
        "personalize-eval",
        "Evaluate the checkpoints of a finished run (again, or on other protocols), without training.",
        (
            "personalize-eval run_dir=outputs/train/runs/<run>",
            "personalize-eval run_dir=<run> eval=jindal",
            "personalize-eval run_dir=<run> 'eval.protocols=[dreambooth,simple]' eval.images_per_prompt.simple=16",
        ),
    ),
    "report": (
        "personalize-report",
        "Print a paper's table with our numbers beside the paper's, from the runs of a sweep; write CSVs,\n"
        "a metric-vs-step plot and one HTML page per experiment.",
        (
            "personalize-report experiment=zeng2023_table1_smoke",
            "personalize-report experiment=zeng2023_table1 report.selection=400",
            "personalize-report experiment=zeng2023_table1 report.source=both",
        ),
    ),
    "edit": (
        "personalize-edit",
        "Put a personalized subject into another picture with prompt-to-prompt and null-text inversion.",
        (
            "personalize-edit run_dir=<run> image=photo.jpg",
            "personalize-edit run_dir=<run> image=photo.jpg edit=refine "
            "'target_prompt=\"a photo of {phrase} on the beach\"'",
            "personalize-edit run_dir=<run> edit=local_blend seed=3",
        ),
    ),
    "data": (
        "personalize-data",
        "Fetch the DreamBooth dataset (github.com/google/dreambooth: 30 subjects, 158 photos, ~110 MB) into\n"
        "paths.dreambooth_dir and verify it; offline, say in one line what to download by hand and where to put it.",
        (
            "personalize-data                                   # fetch, or say it is already complete",
            "personalize-data verify_only=true                  # check a copy put there by hand",
            "personalize-data force=true paths.dreambooth_dir=/data/dreambooth   # fetch again, elsewhere",
        ),
    ),
}


def _groups_of(config_name: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The config groups a primary config chooses from (its defaults list, and what it builds on)."""
    primary = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{config_name}.yaml"))
    groups: list[str] = []
    for entry in primary.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_" and (conf_dir / f"{entry}.yaml").is_file():
            groups += _groups_of(entry, conf_dir)  # report.yaml builds on train.yaml
        elif isinstance(entry, dict):
            for key in entry:
                name = str(key).replace("optional ", "").replace("override ", "").strip()
                if (conf_dir / name).is_dir() and not name.startswith("hydra"):
                    groups.append(name)
    return list(dict.fromkeys(groups))


def group_listing(config_name: str, conf_dir: Path = CONF_DIR) -> str:
    """`group: option, option` lines. Files starting with `_` are shared bases and files in a group's
    subfolders are parts of one option (experiment/jindal2023_table1_smoke/lora.yaml): neither is a choice."""
    lines = []
    for group in _groups_of(config_name, conf_dir):
        options = [o for o in group_options(group, str(conf_dir)) if "/" not in o and not o.startswith("_")]
        if options:
            lines.append(f"  {group}: {', '.join(options)}")
    return "\n".join(lines)


def help_text(config_name: str) -> str:
    """The help template of one entry point (`$CONFIG` and `$FLAGS_HELP` are Hydra's to fill)."""
    command, what, examples = _APPS[config_name]
    body = (
        f"{command}: {what}\n\n"
        "Examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n"
        "Config groups (choose with group=option):\n" + group_listing(config_name) + "\n\n"
        "Any setting below can be overridden with key=value (a typo'd key is an error, not ignored).\n"
        f"Shell completion: eval \"$({command} -sc install=bash)\" (zsh: the same in ~/.zshrc; fish: install=fish).\n"
        "Documentation: README.md, docs/ (troubleshooting, editing, benchmark).\n\n"
        "== Config ==\n"
    )
    return body.replace("$", "$$") + "$CONFIG\n== Flags ==\n$FLAGS_HELP"


OmegaConf.register_new_resolver("personalize_help", help_text, replace=True)
