"""Textual inversion as the references run it, and the data options (issue 12).

Each option is compared with its reference semantics computed here, independently of the code under test:
the prompt templates with the documented draw (sha256 of the data seed and the example's position in the
documented data order), multi-vector tokens with what a stock diffusers pipeline computes after its own
`load_textual_inversion`, crops and resize filters with PIL itself, captions with the files beside the
photos. Runs are on the tiny model with real photos (the shipped sample dog, and a copy of the DreamBooth
dog folder for captions).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from personalize import signals
from personalize.artifacts import apply_checkpoint
from personalize.config import PROJECT_ROOT, compose
from personalize.data import (
    DataSettings, SubjectPhotos, crop_offsets, crop_square, list_images, load_subject_photos, resize_short_side,
)
from personalize.errors import PersonalizeError
from personalize.methods.module import Personalizer
from personalize.prompts import OBJECT_TEMPLATES, STYLE_TEMPLATES, ExamplePrompts, template_index
from personalize.train import fit, prepare_run
from tests.conftest import SHARED_DREAMBOOTH
from tests.helpers import stock_pipeline

SAMPLE_DOG = PROJECT_ROOT / "data" / "samples" / "dog"
QUICK = ["method=textual_inversion", "eval=none", "method.stages.token.lr=5e-2"]


def documented_template(seed: int, position: int, templates: list[str]) -> str:
    """The draw method.prompt_templates documents, written out here."""
    digest = hashlib.sha256(f"{seed}:{position}".encode()).digest()
    return templates[int.from_bytes(digest[:8], "little") % len(templates)]


def documented_positions(steps: int, batch: int, seed: int) -> list[list[int]]:
    """The dataset positions of each step (StepSampler: one seeded permutation of the whole run)."""
    perm = torch.randperm(steps * batch, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[s * batch:(s + 1) * batch] for s in range(steps)]


def pil_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)).permute(2, 0, 1)


class Recorder(list):
    """What each training step used: its instance indices and prompts, and (crop=random) its crops and
    their offsets. With `interrupt_at` set, a stop signal arrives during that step (0-based), as SLURM's would."""

    interrupt_at: int | None = None


def record_steps(monkeypatch) -> Recorder:
    seen = Recorder()
    step, crops = Personalizer.training_step, Personalizer._random_crops

    def recording_step(self, batch, batch_idx):
        seen.append({"step": self.global_step, "index": batch[0].tolist(), "prompts": list(batch[2])})
        if seen.interrupt_at == self.global_step:
            signal.raise_signal(signal.SIGUSR1)
        return step(self, batch, batch_idx)

    def recording_crops(self, index):
        pixels, offsets = crops(self, index)
        seen[-1]["crops"], seen[-1]["offsets"] = pixels.clone(), list(offsets)
        return pixels, offsets

    monkeypatch.setattr(Personalizer, "training_step", recording_step)
    monkeypatch.setattr(Personalizer, "_random_crops", recording_crops)
    return seen


# ---------------------------------------------------------------- prompt templates
def test_the_templates_are_the_papers_and_the_draw_covers_them_evenly():
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    assert all(t.count("{}") == 1 for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)
    assert OBJECT_TEMPLATES[0] == "a photo of a {}" and STYLE_TEMPLATES[0] == "a painting in the style of {}"
    for templates in (OBJECT_TEMPLATES, STYLE_TEMPLATES):
        draws = [template_index(7, p, len(templates)) for p in range(100 * len(templates))]
        assert [templates[i] for i in draws] == [documented_template(7, p, templates) for p in range(len(draws))]
        counts = np.bincount(draws, minlength=len(templates))
        assert counts.min() > 60 and counts.max() < 140, counts  # every template, about 100 times each
    # a pure function of (seed, position): the same for any run length, another for another seed
    assert [template_index(0, p, 27) for p in range(50)] != [template_index(1, p, 27) for p in range(50)]

    prompts = ExamplePrompts(instance="a photo of <sks>", phrase="<sks>", captions=(None, "my {}".format("<sks>")),
                             templates=tuple(OBJECT_TEMPLATES), seed=3)
    assert prompts.for_example(1, 5) == "my <sks>"  # a caption wins
    assert prompts.for_example(0, 5) == documented_template(3, 5, OBJECT_TEMPLATES).format("<sks>")
    assert ExamplePrompts(instance="a photo of <sks>", phrase="<sks>").for_example(0, 5) == "a photo of <sks>"


def test_a_stage_without_text_gradients_encodes_each_distinct_prompt_once(make_cfg):
    run = prepare_run(make_cfg("method=two_stage", "subject=sample_dog", "eval=none", "method.prompt_templates=object"))
    module = run.module
    calls = []
    encode = module._encode_prompts
    module._encode_prompts = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    dataset = module.train_dataloader().dataset
    prompts = [dataset[i][2] for i in range(12)]
    distinct = set(prompts)
    assert len(distinct) > 3 and all(p.endswith("<rare> dog") for p in prompts)

    module._enter_stage(module.stages[1])  # the UNet stage: token and text encoder frozen
    first = module._conditioning(prompts)["encoder_hidden_states"]
    assert sorted(c[0] for c in calls) == sorted(distinct) and all(len(c) == 1 for c in calls)
    again = module._conditioning(prompts[::-1])["encoder_hidden_states"]
    assert len(calls) == len(distinct), "a cached prompt must not be encoded again"
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = encode([prompt])["encoder_hidden_states"][0]
            assert torch.equal(first[row], alone) and torch.equal(again[len(prompts) - 1 - row], alone)

    calls.clear()
    module._enter_stage(module.stages[0])  # the token stage: encoded with gradients, every step
    with_grad = module._conditioning(prompts)["encoder_hidden_states"]
    assert len(calls) == 1 and sorted(calls[0]) == sorted(distinct) and with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), first, rtol=0, atol=1e-5)  # another batch shape: close, not bit-equal


# ---------------------------------------------------------------- defaults of token stages
def test_token_stages_flip_and_do_not_clip_by_default_and_the_paper_recipes_keep_theirs(tmp_path):
    def method(name):
        return compose("train", ["debug=default", f"method={name}"], output_dir=tmp_path).method

    ti = method("textual_inversion")
    assert ti.flip is True and ti.optimizer.max_grad_norm is None
    assert (ti.new_token.num_vectors, ti.prompt_templates, ti.data.crop, ti.data.interpolation) == (1, None, "center", "bicubic")
    two_stage = method("two_stage")  # Zeng et al.'s recipe, whose table we reproduce: unchanged
    assert two_stage.flip is False and two_stage.optimizer.max_grad_norm == 1.0


# ---------------------------------------------------------------- multi-vector tokens
@pytest.mark.parametrize("vectors", [1, 3])
def test_a_multi_vector_token_loads_in_a_stock_pipeline_and_encodes_as_it_does(vectors, make_cfg, tiny_model_dir, monkeypatch):
    from transformers import CLIPTextModel, CLIPTokenizer

    clipped = []
    monkeypatch.setattr(Personalizer, "clip_gradients", lambda self, *a, **k: clipped.append(a))
    run = prepare_run(make_cfg(*QUICK, "subject=sample_dog", f"method.new_token.num_vectors={vectors}",
                               "method.stages.token.steps=2", "method.stages.token.checkpoint_every=1"))
    module = run.module
    fit(run, sample=False)

    base_tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    base = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").get_input_embeddings().weight
    vocab = len(base_tokenizer)
    table = module.token_embedding.base.weight
    assert table.shape[0] == vocab + vectors and torch.equal(table[:vocab], base)  # every other row, bit for bit
    dog = base[base_tokenizer.convert_tokens_to_ids("dog</w>")]
    assert all(torch.equal(row, dog) for row in table[vocab:])  # each new row starts from the initializer
    trained = module.token_embedding.new_rows.detach()
    # all trained: AdamW's weight decay alone would only have scaled a row that no prompt reached
    decayed = dog * (1 - 5e-2 * float(run.cfg.method.optimizer.weight_decay)) ** 2
    assert trained.shape == (vectors, 32) and all(not torch.allclose(row, decayed, rtol=0, atol=1e-6) for row in trained)

    first, last = run.checkpoints()
    saved = load_file(last / "learned_embeds.safetensors")
    assert list(saved) == ["<sks>"] and saved["<sks>"].shape == ((32,) if vectors == 1 else (vectors, 32))
    info = json.loads((last / "checkpoint.json").read_text())
    assert info.get("num_vectors") == (None if vectors == 1 else vectors)

    pipe = stock_pipeline(tiny_model_dir, last)
    names = ["<sks>"] + [f"<sks>_{i}" for i in range(1, vectors)]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], trained)
    prompt = "a photo of <sks> on the beach"
    stock_ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer)).input_ids
    assert all(i in stock_ids for i in ids)
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        ours = module._encode_prompt(prompt)["encoder_hidden_states"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    # a later checkpoint applied to a pipeline that has an earlier one (evaluation does this) replaces the rows
    earlier = stock_pipeline(tiny_model_dir, first)
    apply_checkpoint(earlier, last)
    assert torch.equal(earlier.text_encoder.get_input_embeddings().weight[ids], trained)

    # flips on, clipping off (the method's defaults): the mirrored photos' latents are cached beside the photos'
    assert clipped == []
    photos = module._images["instance"]
    mean = module._latents["instance"][0]
    assert len(mean) == 2 * len(photos)
    with torch.no_grad():
        mirrored = module.vae.encode(photos.flip(-1)).latent_dist.mean * module.vae.config.scaling_factor
    torch.testing.assert_close(mean[len(photos):], mirrored, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- crop and resize filter
def test_centre_crops_and_each_resize_filter_are_pils(tmp_path):
    paths = list_images(SAMPLE_DOG)
    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
    results = {}
    for name, pil_filter in filters.items():
        photos = load_subject_photos(SAMPLE_DOG, 48, DataSettings(interpolation=name))
        expected = []
        for path in paths:
            img = Image.open(path).convert("RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            expected.append(pil_tensor(img.crop((left, top, left + side, top + side)).resize((48, 48), pil_filter)))
        assert torch.equal(photos.images, torch.stack(expected)), name
        results[name] = photos.images
    assert all(not torch.equal(results[a], results[b]) for a in filters for b in filters if a < b)
    assert torch.equal(load_subject_photos(SAMPLE_DOG, 48).images, results["bicubic"])  # the default, as before

    # the shorter side to the resolution, the longer one as torchvision's Resize(int) rounds it
    landscape = Image.open(paths[0]).convert("RGB").crop((0, 10, 128, 106))  # 128 x 96
    for name, pil_filter in filters.items():
        resized = resize_short_side(landscape, 64, name)
        assert resized.size == (int(64 * 128 / 96), 64)
        assert np.array_equal(np.asarray(resized), np.asarray(landscape.resize((85, 64), pil_filter)))
    portrait = pil_tensor(resize_short_side(landscape.transpose(Image.Transpose.ROTATE_90), 64))
    assert portrait.shape == (3, 85, 64) and crop_offsets(portrait, 64) == 22
    assert torch.equal(crop_square(portrait, 21, 64), portrait[:, 21:85, :])
    with pytest.raises(ValueError):
        crop_square(portrait, 22, 64)


@pytest.fixture
def mixed_photos(tmp_path):
    """Three real photos: a landscape and a portrait crop of sample-dog photos (PNG) and a square one, with a
    caption for the landscape."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.open(SAMPLE_DOG / "00.jpg").convert("RGB").crop((0, 16, 128, 112)).save(folder / "00.png")
    Image.open(SAMPLE_DOG / "01.jpg").convert("RGB").crop((20, 0, 116, 128)).save(folder / "01.png")
    shutil.copy(SAMPLE_DOG / "02.jpg", folder / "02.jpg")
    (folder / "00.txt").write_text("a photo of {phrase} lying on the grass\n")
    return folder


def expected_crop(path, index: int, photos: int, offset: int) -> torch.Tensor:
    """A crop as the issue defines it, with PIL: shorter side to 64 (bicubic), a 64 x 64 window at `offset`
    along the longer side, mirrored for the second half of the indices (flip)."""
    img = Image.open(path).convert("RGB")
    short, long = min(img.size), max(img.size)
    size = (int(64 * long / short), 64) if img.width >= img.height else (64, int(64 * long / short))
    img = img.resize(size, Image.Resampling.BICUBIC)
    box = (offset, 0, offset + 64, 64) if img.width >= img.height else (0, offset, 64, offset + 64)
    crop = pil_tensor(img.crop(box))
    return crop.flip(-1) if index >= photos else crop


def test_a_recipe_run_uses_the_documented_prompts_and_crops_and_resumes_exactly(mixed_photos, make_cfg, monkeypatch):
    settings = [*QUICK, "subject=folder", f"subject.data_dir={mixed_photos}", "subject.class_noun=dog",
                "method.prompt_templates=object", "method.new_token.num_vectors=3", "method.data.crop=random",
                "method.batch_size=2", "method.stages.token.steps=6", "method.stages.token.checkpoint_every=3"]
    seen = record_steps(monkeypatch)
    whole = fit(prepare_run(make_cfg(*settings, name="whole")), sample=False)
    assert [s["step"] for s in seen] == list(range(6))

    paths = list_images(mixed_photos)
    caption = "a photo of <sks> lying on the grass"
    for step, positions in zip(seen, documented_positions(6, 2, seed=0)):
        assert step["index"] == [p % 6 for p in positions]  # 3 photos and their mirror images
        expected = [caption if p % 6 % 3 == 0 else documented_template(0, p, OBJECT_TEMPLATES).format("<sks>")
                    for p in positions]
        assert step["prompts"] == expected
        for row, index in enumerate(step["index"]):
            photo = paths[index % 3]
            offset = step["offsets"][row]
            assert 0 <= offset < (22 if photo.suffix == ".png" else 1)
            torch.testing.assert_close(step["crops"][row], expected_crop(photo, index, 3, offset), rtol=0, atol=1e-6)
    offsets_of = {}
    for step in seen:
        for index, offset in zip(step["index"], step["offsets"]):
            offsets_of.setdefault(index % 3, []).append(offset)
    assert len(set(offsets_of[0])) > 1 and len(set(offsets_of[1])) > 1, offsets_of  # a fresh crop each time

    info = json.loads((whole.checkpoints()[-1] / "checkpoint.json").read_text())
    assert (info["prompt_templates"], info["num_vectors"], info["data"]) == ("object", 3, {"crop": "random"})
    assert info["captions"] == {"00.png": caption}

    # stopped by a signal during step 3, then resumed: the same prompts, crops and weights as the whole run
    whole_steps = list(seen)
    seen.clear()
    seen.interrupt_at = 2
    with pytest.raises(signals.Interrupted):
        fit(prepare_run(make_cfg(*settings, name="stopped")), sample=False)
    stopped_dir = whole.run_dir.parent / "stopped"
    assert [s["step"] for s in seen] == [0, 1, 2] and not (stopped_dir / "checkpoints" / "step-000006").exists()
    seen.interrupt_at = None
    resumed = fit(prepare_run(make_cfg(*settings, f"resume={stopped_dir}", name="again")), sample=False)
    assert resumed.run_dir == stopped_dir
    assert [s["step"] for s in seen] == list(range(6))
    for a, b in zip(whole_steps, seen):
        assert (a["index"], a["prompts"], a["offsets"]) == (b["index"], b["prompts"], b["offsets"])
        assert torch.equal(a["crops"], b["crops"])
    for name in ("step-000003", "step-000006"):  # same machine, same shapes: bit for bit
        a = load_file(whole.run_dir / "checkpoints" / name / "learned_embeds.safetensors")["<sks>"]
        b = load_file(stopped_dir / "checkpoints" / name / "learned_embeds.safetensors")["<sks>"]
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- captions
@pytest.fixture
def captioned_dog(tmp_path):
    """A copy of the shipped sample dog folder with captions beside two of its five photos."""
    folder = tmp_path / "dog"
    shutil.copytree(SAMPLE_DOG, folder)  # the shipped real photos: a fresh machine has no ../shared
    (folder / "00.txt").write_text("a photo of {phrase} on a sofa")
    (folder / "02.txt").write_text("{identifier}, a {class_noun}, in the garden\n")
    return folder


def test_each_example_trains_on_its_photos_caption_or_the_default(captioned_dog, make_cfg, caplog):
    caplog.set_level("WARNING")
    assert [p.name for p in list_images(captioned_dog)] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    assert "skipping" not in caplog.text  # captions are not "other files"
    base = [*QUICK, "subject=folder", f"subject.data_dir={captioned_dog}", "subject.class_noun=dog", "method.batch_size=2"]
    captions = {0: "a photo of <sks> on a sofa", 2: "<sks>, a dog, in the garden"}
    for templates in (None, "style"):
        run = prepare_run(make_cfg(*base, *([f"method.prompt_templates={templates}"] if templates else []),
                                   name=f"run-{templates}"))
        dataset = run.module.train_dataloader().dataset
        for position in range(len(dataset)):
            index, _, prompt = dataset[position]
            photo = index % 5  # flips (index 5..9) keep the photo's caption
            default = (documented_template(0, position, STYLE_TEMPLATES).format("<sks>") if templates
                       else "a photo of <sks>")
            assert prompt == captions.get(photo, default), (position, index)
        assert {dataset[p][0] for p in range(len(dataset))} == set(range(10))


@pytest.mark.parametrize("text, problem", [
    ("a photo of {cool} dog", "has the placeholder {cool}, which is never filled"),
    ("  \n", "is empty"),
    ("a {phrase:>10}", "not a plain placeholder"),
])
def test_a_caption_that_cannot_be_a_prompt_is_one_line_before_anything_is_written(captioned_dog, make_cfg, tmp_path,
                                                                                 text, problem):
    (captioned_dog / "03.txt").write_text(text)
    cfg = make_cfg(*QUICK, "subject=folder", f"subject.data_dir={captioned_dog}", "subject.class_noun=dog", name="bad")
    with pytest.raises(PersonalizeError) as error:
        prepare_run(cfg)
    message = str(error.value)
    assert "\n" not in message and str(captioned_dog / "03.txt") in message and problem in message
    assert not (tmp_path / "bad" / "config.yaml").exists()


def test_a_caption_without_the_subject_is_named(captioned_dog, caplog):
    (captioned_dog / "04.txt").write_text("a dog in the garden")
    photos = load_subject_photos(captioned_dog, 64)
    assert isinstance(photos, SubjectPhotos) and photos.captions[4] == "a dog in the garden"
    filled = photos.captions_by_name("<sks>", "dog", "<sks>")
    assert filled["04.jpg"] == "a dog in the garden" and filled["01.jpg"] is None
    assert "04.txt" in caplog.text and "does not name the subject" in caplog.text


def test_a_run_from_before_num_vectors_resumes_as_one_vector(tmp_path):
    """config.yaml of a token run written before method.new_token.num_vectors existed means one vector."""
    from personalize.errors import PersonalizeError
    from personalize.resume import check_compatible

    def config(new_token):
        return {"method": {"name": "textual_inversion", "identifier": "<sks>", "new_token": new_token,
                           "stages": {"token": {"train": ["token"], "steps": 4}}},
                "model": {"name": "tiny"}, "subject": {"name": "sample_dog"}}

    old = config({"initializer": "dog"})
    check_compatible(old, config({"initializer": "dog", "num_vectors": 1}), tmp_path)
    with pytest.raises(PersonalizeError, match="num_vectors"):
        check_compatible(old, config({"initializer": "dog", "num_vectors": 2}), tmp_path)
