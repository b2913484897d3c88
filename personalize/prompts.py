"""Prompt lists of the evaluation protocols, and the vocabulary our prompts use.

The DreamBooth lists come from the DreamBooth dataset (Ruiz et al., CC BY 4.0,
`prompts_and_classes.txt`); the Jindal list from shared/protocols/jindal2023_prompts.txt.
They live in the package (not read from ../shared) so a fresh install can evaluate without the dataset.
`{}` is replaced by the subject phrase, e.g. "<rare> dog" or "sks backpack".
"""

from __future__ import annotations

import re

_COMMON = [
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
]

DREAMBOOTH_OBJECT_PROMPTS = _COMMON + [
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
]

DREAMBOOTH_LIVE_PROMPTS = _COMMON + [
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
]

JINDAL_PROMPTS = [
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on top of a wooden floor",
    "a {} with a mountain in the background",
    "a {} with a city in the background",
    "a {} with a blue house in the background",
    "a {} wearing a red hat",
    "a {} wearing a yellow shirt",
    "a {} sitting near the window",
    "a {} on top of green grass with sunflowers around it",
    "a {} wearing a tuxedo",
    "a {} walking on a red carpet on the beach",
    "a {} on top of the sidewalk in a crowded city",
    "a {} with the Taj Mahal in the background",
    "a {} getting a bath",
    "a {} surfing on a wave",
    "a {} floating in space",
    "a {} jumping in the air",
    "a {} sleeping on a bed",
]

# The class nouns of the 30 DreamBooth subjects.
CLASS_NOUNS = [
    "backpack", "stuffed animal", "bowl", "can", "candle", "cat", "clock", "sneaker", "dog",
    "toy", "boot", "glasses", "cartoon", "teapot", "vase",
]

# Words the training, class and editing prompts of the project use besides the lists above.
EXTRA_WORDS = "a an the of photo picture rare sks on in with and at".split()


def words_in(texts: list[str]) -> list[str]:
    """Lower-cased whole words, in first-seen order, as CLIP's pre-tokenizer would split them."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[a-z]+", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def project_vocabulary() -> list[str]:
    """Every word a prompt of this project uses: the tiny tokenizer gets one token for each."""
    texts = DREAMBOOTH_OBJECT_PROMPTS + DREAMBOOTH_LIVE_PROMPTS + JINDAL_PROMPTS + CLASS_NOUNS + EXTRA_WORDS
    return words_in(texts)
