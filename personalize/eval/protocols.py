"""Prompt protocols: which prompts to sample, how many images each, and with which seeds.

- `dreambooth`: the 25 DreamBooth prompts (object or live list, by the subject's kind) x 4 images.
- `simple`:     "a photo of {phrase}" x 64 images (the textual-inversion protocol).
- `jindal`:     the 20 prompts of Jindal et al., 1 image each, one common seed.
- `prior`:      the plain class prompt "a photo of a {class}" x 64, sampled on the base and on the
                personalized model and scored against each other (prior drift).

Seeds depend only on the image index (seed = base_seed + image index), never on the method or the
checkpoint, so every method and checkpoint starts from the same noise for the same (prompt, image);
with one image per prompt (jindal) all prompts share one seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

from personalize.errors import PersonalizeError
from personalize.prompts import DREAMBOOTH_LIVE_PROMPTS, DREAMBOOTH_OBJECT_PROMPTS, JINDAL_PROMPTS

PROTOCOLS = ("dreambooth", "simple", "jindal", "prior")
KINDS = ("object", "live")
DEFAULT_IMAGES_PER_PROMPT = {"dreambooth": 4, "simple": 64, "jindal": 1, "prior": 64}
SIMPLE_TEMPLATE = "a photo of {}"
PRIOR_TEMPLATE = "a photo of a {}"


class Sample(NamedTuple):
    """One image to generate."""

    prompt_index: int
    image_index: int
    prompt: str
    clean_prompt: str
    seed: int


@dataclass(frozen=True)
class Protocol:
    """A fully formatted prompt set.

    prompts[i] is sampled images_per_prompt times, image j with seeds[i][j]; clean_prompts[i] is the
    same prompt with the subject phrase replaced by the bare class noun ("a dog in the snow"), the text
    CLIP-T and the CLIP score compare against.
    """

    name: str
    prompts: list[str]
    images_per_prompt: int
    seeds: list[list[int]]
    clean_prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def samples(self) -> Iterator[Sample]:
        """Every image of the protocol, prompt-major, with its prompt, clean prompt and seed."""
        for i, (prompt, clean) in enumerate(zip(self.prompts, self.clean_prompts)):
            for j in range(self.images_per_prompt):
                yield Sample(i, j, prompt, clean, self.seeds[i][j])


def templates(name: str, kind: str = "object") -> list[str]:
    """The protocol's prompt templates, `{}` standing for the subject phrase."""
    if name == "dreambooth":
        if kind not in KINDS:
            raise PersonalizeError(f"subject kind must be one of {list(KINDS)}, got '{kind}'")
        return list(DREAMBOOTH_LIVE_PROMPTS if kind == "live" else DREAMBOOTH_OBJECT_PROMPTS)
    if name == "simple":
        return [SIMPLE_TEMPLATE]
    if name == "jindal":
        return list(JINDAL_PROMPTS)
    if name == "prior":
        return [PRIOR_TEMPLATE]
    raise PersonalizeError(f"unknown evaluation protocol '{name}'; choose from {list(PROTOCOLS)}")


def subject_phrase(identifier: str, class_noun: str, phrase: str | None = None) -> str:
    """What replaces `{}` in a prompt.

    Default "{identifier} {class}" ("<rare> dog", "sks dog": the identifier is an adjective or a rare
    word before the class). A textual-inversion noun token stands for the whole subject, so its caller
    passes phrase="<sks>" ("a <sks> in the snow"). Any phrase may contain "{identifier}" / "{class_noun}".
    """
    if phrase is None:
        return f"{identifier} {class_noun}".strip()
    return phrase.format(identifier=identifier, class_noun=class_noun)


def build_protocol(
    name: str,
    identifier: str,
    class_noun: str,
    kind: str = "object",
    images_per_prompt: int | None = None,
    base_seed: int = 0,
    phrase: str | None = None,
) -> Protocol:
    """The prompts, clean prompts and seeds of protocol `name` for one subject.

    kind: "object" or "live" (DreamBooth's two prompt lists). images_per_prompt: the protocol's
    default when None. phrase: see `subject_phrase`. The `prior` protocol ignores identifier and phrase.
    """
    tmpl = templates(name, kind)
    n = DEFAULT_IMAGES_PER_PROMPT[name] if images_per_prompt is None else images_per_prompt
    if n < 1:
        raise PersonalizeError(f"images_per_prompt must be >= 1, got {n}")
    if name == "prior":
        prompts = [t.format(class_noun) for t in tmpl]
        clean = prompts
    else:
        prompts = [t.format(subject_phrase(identifier, class_noun, phrase)) for t in tmpl]
        # Replacing the whole phrase by the class noun, rather than deleting the identifier, also gives
        # a sensible text for noun tokens: "a <sks> in the snow" -> "a dog in the snow".
        clean = [t.format(class_noun) for t in tmpl]
    # Seed by image index only: the same seeds for every method/checkpoint, and for jindal (1 image per
    # prompt) one seed for all prompts, as that paper did.
    seeds = [[base_seed + j for j in range(n)] for _ in prompts]
    return Protocol(name=name, prompts=prompts, images_per_prompt=n, seeds=seeds, clean_prompts=clean)
