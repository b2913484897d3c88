"""Prompt protocols: lists by subject kind, counts, formatting, clean prompts and seeds."""

from __future__ import annotations

import pytest

from personalize.errors import PersonalizeError
from personalize.eval.protocols import build_protocol, subject_phrase
from personalize.prompts import DREAMBOOTH_LIVE_PROMPTS, DREAMBOOTH_OBJECT_PROMPTS, JINDAL_PROMPTS


def test_dreambooth_list_follows_subject_kind():
    live = build_protocol("dreambooth", "<rare>", "dog", kind="live")
    obj = build_protocol("dreambooth", "sks", "backpack", kind="object")
    assert live.prompts == [t.format("<rare> dog") for t in DREAMBOOTH_LIVE_PROMPTS]
    assert obj.prompts == [t.format("sks backpack") for t in DREAMBOOTH_OBJECT_PROMPTS]
    assert "a <rare> dog wearing a red hat" in live.prompts
    assert not any("hat" in p for p in obj.prompts)
    with pytest.raises(PersonalizeError, match="kind"):
        build_protocol("dreambooth", "sks", "dog", kind="animal")


@pytest.mark.parametrize(
    ("name", "n_prompts", "per_prompt"),
    [("dreambooth", 25, 4), ("simple", 1, 64), ("jindal", 20, 1), ("prior", 1, 64)],
)
def test_counts(name, n_prompts, per_prompt):
    protocol = build_protocol(name, "<rare>", "dog", kind="live")
    assert len(protocol.prompts) == len(protocol.clean_prompts) == len(protocol.seeds) == n_prompts
    assert protocol.images_per_prompt == per_prompt
    assert all(len(s) == per_prompt for s in protocol.seeds)
    assert len(protocol) == len(list(protocol.samples())) == n_prompts * per_prompt


def test_formatting_and_clean_prompts():
    simple = build_protocol("simple", "<rare>", "dog")
    assert simple.prompts == ["a photo of <rare> dog"] and simple.clean_prompts == ["a photo of dog"]
    # Textual inversion with a noun token: the caller passes the phrase; the clean prompt gets the class back.
    ti = build_protocol("dreambooth", "<sks>", "dog", kind="live", phrase="<sks>")
    assert ti.prompts[1] == "a <sks> in the snow" and ti.clean_prompts[1] == "a dog in the snow"
    assert subject_phrase("sks", "dog") == "sks dog"
    assert subject_phrase("<sks>", "dog", "{identifier}") == "<sks>"
    prior = build_protocol("prior", "<rare>", "dog")
    assert prior.prompts == prior.clean_prompts == ["a photo of a dog"]
    jindal = build_protocol("jindal", "sks", "cat")
    assert jindal.prompts == [t.format("sks cat") for t in JINDAL_PROMPTS]
    assert all("sks" not in p for p in jindal.clean_prompts)


def test_seeds_fixed_per_prompt_and_image_across_builds():
    a = build_protocol("dreambooth", "<rare>", "dog", kind="live", base_seed=7)
    b = build_protocol("dreambooth", "sks", "dog", kind="live", base_seed=7)  # another method, same noise
    assert a.seeds == b.seeds == [[7, 8, 9, 10]] * 25
    assert [s.seed for s in a.samples()] == [s.seed for s in b.samples()]
    first = next(a.samples())
    assert (first.prompt_index, first.image_index, first.seed) == (0, 0, 7)
    assert build_protocol("simple", "<rare>", "dog").seeds == [list(range(64))]
    assert build_protocol("simple", "<rare>", "dog", images_per_prompt=3, base_seed=100).seeds == [[100, 101, 102]]


def test_jindal_uses_one_common_seed():
    protocol = build_protocol("jindal", "sks", "dog", base_seed=42)
    assert {s.seed for s in protocol.samples()} == {42}
    assert len(protocol) == 20


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(PersonalizeError, match="unknown evaluation protocol"):
        build_protocol("drembooth", "sks", "dog")
    with pytest.raises(PersonalizeError, match="images_per_prompt"):
        build_protocol("simple", "sks", "dog", images_per_prompt=0)
