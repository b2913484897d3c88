"""Config helpers shared by the CLI, tests and notebooks: resolvers and composing outside a Hydra app."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


# ---------------------------------------------------------------- a subject from a folder (subject=folder)
# What `personalize subject=folder subject.data_dir=<dir> subject.class_noun=<noun>` derives, as resolvers
# (not in Subject.from_cfg) so the derived values are in the composed config: the method configs read
# `${subject.init_word}`, Hydra's run dir reads `${subject.name}`, and config.yaml records what was used.

# Head nouns of living subjects: DreamBooth's "live" prompt list (outfits, hats, ...) suits them; people
# count too, the list's prompts are as apt for a person as for a pet.
LIVE_NOUNS = frozenset("""
    animal pet dog puppy doggy pup cat kitten kitty bird parrot budgie canary cockatiel owl chicken hen rooster
    duck goose swan penguin horse pony donkey rabbit bunny hamster gerbil mouse rat ferret chinchilla hedgehog
    squirrel fox wolf bear panda koala lion tiger leopard cheetah monkey gorilla cow calf bull pig piglet sheep
    lamb goat deer elephant giraffe zebra camel llama alpaca otter raccoon seal dolphin turtle tortoise frog
    lizard gecko iguana snake fish goldfish corgi poodle retriever labrador terrier bulldog pug husky beagle
    dachshund chihuahua spaniel collie shepherd schnauzer rottweiler doberman greyhound samoyed shiba akita
    tabby siamese persian person man woman boy girl child kid baby toddler
""".split())
# Words that make a living head noun a thing: "stuffed animal", "toy dog", "teddy bear", "dog statue" ...
OBJECT_WORDS = frozenset("""
    toy toys stuffed plush plushie teddy statue figurine sculpture robot robotic mechanical cartoon
    ceramic porcelain wooden plastic metal glass stone paper origami lego inflatable balloon painted
""".split())


def _words(class_noun: str) -> list[str]:
    return [w.strip(".,;:!?'\"()").lower() for w in str(class_noun).split() if w.strip(".,;:!?'\"()")]


def _singular(word: str) -> str:
    if word not in LIVE_NOUNS and word.endswith("s") and word[:-1] in LIVE_NOUNS:
        return word[:-1]
    return word


def derive_kind(class_noun: str) -> str:
    """'live' when the class noun's head (last) word is a living subject and no word makes it a thing, else
    'object'. Picks the DreamBooth prompt list; `subject.kind=` overrides it."""
    words = _words(class_noun)
    if not words or _singular(words[-1]) not in LIVE_NOUNS:
        return "object"
    return "object" if OBJECT_WORDS.intersection(words) else "live"


def derive_init_word(class_noun: str) -> str:
    """The word a new noun token starts from (textual inversion): the class noun's head (last) word,
    "stuffed animal" -> "animal". It must be one token of the model's tokenizer (`check_init_word`)."""
    words = str(class_noun).split()
    return words[-1] if words else str(class_noun)


def folder_name(path: str) -> str:
    """A subject name from its folder: the last path part, reduced to characters that are safe in a run
    dir name and a W&B tag ("~/photos/My Dog/" -> "My_Dog")."""
    name = os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(str(path)))))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:64] or "folder"


OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)
OmegaConf.register_new_resolver("subject_kind", derive_kind, replace=True)
OmegaConf.register_new_resolver("init_word", derive_init_word, replace=True)


def compose(config_name: str = "train", overrides: list[str] | None = None, output_dir: str | Path | None = None) -> DictConfig:
    """Compose a config as the CLI would (tests, notebooks); `output_dir` stands in for Hydra's run dir."""
    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"paths.output_dir={output_dir}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
