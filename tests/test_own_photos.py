"""Own photos without a YAML: `personalize subject=folder subject.data_dir=<dir> subject.class_noun=<noun>`.

Name, kind and init word are derived (and overridable); the init word is checked against the model's
tokenizer where a method uses it; a forgotten setting is one line naming it. End to end on the tiny
model with the sample dog's photos copied into a folder of the user's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from personalize.rundir import list_checkpoints, load_run_config, read_info
from personalize.config import CONF_DIR, PROJECT_ROOT, compose, derive_init_word, derive_kind, folder_name
from personalize.data import load_subject_images
from personalize.errors import PersonalizeError
from personalize.train import fit, prepare_run

SAMPLE_DOG = PROJECT_ROOT / "data" / "samples" / "dog"
SHORT = ["eval=none", "method.stages.token.steps=2", "method.stages.unet.steps=2", "method.stages.unet.checkpoint_every=2"]


@pytest.fixture
def rex(tmp_path) -> Path:
    """A user's folder of photos: the sample dog's, under a name of its own (with a space)."""
    folder = tmp_path / "photos" / "Rex the dog"
    shutil.copytree(SAMPLE_DOG, folder, ignore=shutil.ignore_patterns("*.md", "*.txt"))
    return folder


def test_own_photos_train_end_to_end(rex, make_cfg, tmp_path):
    cfg = make_cfg("subject=folder", f"subject.data_dir={rex}", "subject.class_noun=dog", *SHORT)
    assert (cfg.subject.name, cfg.subject.kind, cfg.subject.init_word) == ("Rex_the_dog", "live", "dog")
    run = fit(prepare_run(cfg), sample=False)
    # it trained on that folder's photos: the same pixels as the shipped sample dog's five
    assert torch.equal(run.module._images["instance"], load_subject_images(SAMPLE_DOG, int(cfg.model.resolution)))
    assert len(run.module._images["instance"]) == 5
    steps = [read_info(c).step for c in list_checkpoints(run.run_dir)]
    assert steps[-1] == 4  # 2 token steps + 2 UNet steps
    info = read_info(list_checkpoints(run.run_dir)[-1])
    assert (info.subject, info.class_noun, info.kind, info.phrase) == ("Rex_the_dog", "dog", "live", "<rare> dog")
    saved = load_run_config(run.run_dir).subject  # config.yaml records the derived values, resolved
    assert OmegaConf.to_container(saved) == {"name": "Rex_the_dog", "class_noun": "dog", "kind": "live",
                                              "init_word": "dog", "data_dir": str(rex)}


def test_textual_inversion_starts_from_the_derived_init_word(rex, make_cfg, tiny_model_dir):
    from transformers import CLIPTokenizer

    cfg = make_cfg("subject=folder", f"subject.data_dir={rex}", "subject.class_noun=golden dog",
                   "method=textual_inversion", "eval=none")
    assert cfg.method.new_token.initializer == "dog"  # the class noun's last word
    module = prepare_run(cfg).module
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    (dog,) = tokenizer.encode("dog", add_special_tokens=False)
    embedding = module.token_embedding
    assert embedding.new_rows.shape[0] == 1
    assert (embedding.new_rows[0] == embedding.base.weight[dog].float()).all()  # a copy of "dog"'s row, bit for bit


def test_an_init_word_of_several_tokens_is_one_line_with_a_suggestion(rex, make_cfg, tiny_model_dir, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    pieces = tokenizer.tokenize("corgi")
    assert len(pieces) > 1 and len(tokenizer.tokenize("animal")) == 1  # the tiny vocabulary: rare words are letters
    cfg = make_cfg("subject=folder", f"subject.data_dir={rex}", "subject.class_noun=corgi", "method=textual_inversion",
                   name="ti")
    assert cfg.subject.kind == "live"
    with pytest.raises(PersonalizeError) as error:
        prepare_run(cfg)
    message = str(error.value)
    assert "\n" not in message and message == (
        f"subject.init_word 'corgi' (from subject.class_noun 'corgi') is {len(pieces)} tokens of the model's tokenizer "
        f"({' '.join(pieces)}), not one: set a one-token word close in meaning, e.g. subject.init_word=animal"
    )
    assert not (tmp_path / "ti").exists()  # checked before anything is written
    # the suggestion works; and two-stage starts its token from "rare", so the noun's tokens do not matter there
    prepare_run(make_cfg("subject=folder", f"subject.data_dir={rex}", "subject.class_noun=corgi", "subject.init_word=animal",
                         "method=textual_inversion", name="ti2"))
    prepare_run(make_cfg("subject=folder", f"subject.data_dir={rex}", "subject.class_noun=corgi", name="two"))


def test_forgetting_the_class_noun_is_one_line(rex, make_cfg, tmp_path):
    with pytest.raises(PersonalizeError) as error:
        prepare_run(make_cfg("subject=folder", f"subject.data_dir={rex}", name="nonoun"))
    message = str(error.value)
    assert message.startswith("subject.class_noun is not set: ") and "\n" not in message and "e.g. dog" in message
    assert not (tmp_path / "nonoun").exists()


def test_forgetting_the_folder_on_the_command_line_is_one_line(tmp_path):
    env = {**os.environ, "PERSONALIZE_OUTPUTS": str(tmp_path / "outputs")}
    result = subprocess.run([sys.executable, "-m", "personalize.cli", "debug=default", "subject=folder",
                             "subject.class_noun=dog"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: subject.data_dir is not set: "), line
    assert not list((tmp_path / "outputs").rglob("checkpoints"))


def test_kind_is_derived_and_overridable(rex, make_cfg):
    cfg = make_cfg("subject=folder", f"subject.data_dir={rex}", "subject.class_noun=stuffed animal")
    assert (cfg.subject.kind, cfg.subject.init_word) == ("object", "animal")
    cfg = make_cfg("subject=folder", f"subject.data_dir={rex}", "subject.class_noun=stuffed animal", "subject.kind=live",
                   "subject.name=bear")
    assert (cfg.subject.kind, cfg.subject.name) == ("live", "bear")
    with pytest.raises(PersonalizeError, match="kind.*alive.*: use one of live, object"):  # one line, a valid choice
        prepare_run(make_cfg("subject=folder", f"subject.data_dir={rex}", "subject.class_noun=dog", "subject.kind=alive",
                             "subject.name=bear"))


def test_the_derivations_agree_with_the_thirty_dreambooth_subjects():
    """The DreamBooth dataset's own classes: the nine dogs and cats are live, everything else (stuffed
    animals included) an object, and each subject's init word is its class noun's last word."""
    subjects = [OmegaConf.load(p) for p in sorted((CONF_DIR / "subject").glob("*.yaml")) if p.stem != "folder"]
    assert len(subjects) == 33  # 30 DreamBooth subjects + 3 shipped samples
    for subject in subjects:
        assert derive_kind(subject.class_noun) == subject.kind, subject.name
        assert derive_init_word(subject.class_noun) == subject.init_word, subject.name


@pytest.mark.parametrize("noun, kind", [
    ("dog", "live"), ("Dogs", "live"), ("golden retriever", "live"), ("kitten", "live"), ("person", "live"),
    ("woman", "live"), ("teddy bear", "object"), ("toy dog", "object"), ("dog statue", "object"),
    ("stuffed animal", "object"), ("mug", "object"), ("backpack", "object"), ("plush dogs", "object"),
])
def test_kind_of_a_class_noun(noun, kind):
    assert derive_kind(noun) == kind


def test_folder_names_are_safe_run_dir_names(tmp_path, monkeypatch):
    assert folder_name("~/photos/My Dog/") == "My_Dog"
    assert folder_name("/data/rex") == "rex" and folder_name("/data/rex/") == "rex"
    assert folder_name("/data/..hidden!!") == "hidden"
    monkeypatch.chdir(tmp_path)
    assert folder_name(".") == tmp_path.name.strip("._-")
    assert folder_name("/") == "folder"
