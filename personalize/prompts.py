"""Prompt lists of the evaluation protocols and of training, and the vocabulary our prompts use.

The DreamBooth lists come from the DreamBooth dataset (Ruiz et al., CC BY 4.0,
`prompts_and_classes.txt`); the Jindal list from shared/protocols/jindal2023_prompts.txt; the training
templates are those of the textual-inversion paper (Gal et al. 2022), which diffusers' textual_inversion
example also uses (`imagenet_templates_small`, `imagenet_style_templates_small`).
They live in the package (not read from ../shared) so a fresh install can evaluate without the dataset.
`{}` is replaced by the subject phrase, e.g. "<rare> dog" or "sks backpack".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

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

# Textual inversion's training prompts (`method.prompt_templates`): one is drawn per example. The style list
# names a template twice ("a cropped painting...", "a close-up painting..."), as the paper's does.
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

PROMPT_TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}  # method.prompt_templates (null: none)


def template_index(seed: int, position: int, count: int) -> int:
    """Which of `count` templates the example at dataset position `position` gets: the first 8 bytes of
    sha256("<seed>:<position>") as a little-endian integer, modulo `count`.

    A pure function of the data seed and the example's position in the run's data order (not of any
    generator's state), so a resumed run, a DDP rank and a run of another length draw the same template
    for the same example."""
    digest = hashlib.sha256(f"{int(seed)}:{int(position)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % count


@dataclass(frozen=True)
class ExamplePrompts:
    """The training prompt of each example: its photo's caption where it has one (a `.txt` beside it),
    else the template drawn for its position filled with the phrase (`method.prompt_templates`), else the
    method's instance prompt."""

    instance: str  # the method's instance prompt, filled
    phrase: str  # what fills a template's {}
    captions: tuple[str | None, ...] = ()  # per photo, filled; None: the photo has no caption
    templates: tuple[str, ...] = ()
    seed: int = 0  # method.data_seed

    def every_prompt(self) -> list[str]:
        """Every prompt `for_example` can return, each once: the captions, the templates filled, the instance prompt."""
        filled = [template.format(self.phrase) for template in self.templates]
        return list(dict.fromkeys([*(c for c in self.captions if c is not None), *filled, self.instance]))

    def for_example(self, photo: int, position: int) -> str:
        caption = self.captions[photo] if photo < len(self.captions) else None
        if caption is not None:
            return caption
        if self.templates:
            return self.templates[template_index(self.seed, position, len(self.templates))].format(self.phrase)
        return self.instance


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
