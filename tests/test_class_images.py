"""The class-image cache: shared across subjects of a class and across methods, keyed by content."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import personalize.class_images as class_images
from personalize.config import PROJECT_ROOT
from personalize.train import prepare_run


def _generated_counts(monkeypatch) -> list[int]:
    counts: list[int] = []
    original = class_images._generate

    def counting(pipe, spec, folder, todo, batches, device):
        counts.append(len(todo))
        return original(pipe, spec, folder, todo, batches, device)

    monkeypatch.setattr(class_images, "_generate", counting)
    return counts


def test_second_subject_of_the_same_class_reuses_the_images(make_cfg, monkeypatch, tmp_path):
    counts = _generated_counts(monkeypatch)
    cache = f"paths.class_image_dir={tmp_path / 'class_images'}"
    prepare_run(make_cfg("method=dreambooth", "subject=sample_dog", "class_images.count=3", cache, name="a"))
    prepare_run(make_cfg("method=dreambooth", "subject=sample_dog2", "class_images.count=3", cache, name="b"))
    prepare_run(make_cfg("method=lora", "method.stages.lora.prior_loss_weight=1.0", "subject=sample_dog",
                         "class_images.count=3", cache, name="c"))
    assert counts == [3], "only the first run generates; the second subject and the other method reuse"


def test_a_changed_key_regenerates_and_a_larger_count_tops_up(make_cfg, monkeypatch, tmp_path):
    counts = _generated_counts(monkeypatch)
    cache = f"paths.class_image_dir={tmp_path / 'class_images'}"
    base = ("method=dreambooth", "subject=sample_backpack", cache)
    prepare_run(make_cfg(*base, "class_images.count=2", name="a"))
    prepare_run(make_cfg(*base, "class_images.count=2", "class_images.seed=7", name="b"))
    prepare_run(make_cfg(*base, "class_images.count=2", "class_images.steps=3", name="c"))
    prepare_run(make_cfg(*base, "class_images.count=3", name="d"))
    assert counts == [2, 2, 2, 1]
    folders = sorted(p for p in (tmp_path / "class_images").iterdir() if p.is_dir())
    assert len(folders) == 3  # seed and steps are part of the key; the count is not


def test_model_vae_is_part_of_the_key_and_a_spec_without_it_keeps_its_old_key():
    """Another VAE (SDXL's fp16-fix) decodes other pixels: its own cache folder. Without model.vae the key is
    the hash of the fields the spec had before `vae` existed, so no cache made then is generated again."""
    import hashlib
    import json

    fields = dict(model="/m", revision=None, prompt="a photo of a dog", negative_prompt="", sampler="ddim",
                  steps=3, guidance_scale=7.5, resolution=64, seed=0)
    old_key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    plain = class_images.ClassImageSpec(**fields)
    other_vae = class_images.ClassImageSpec(**fields, vae="madebyollin/sdxl-vae-fp16-fix")
    assert plain.key() == old_key
    assert other_vae.key() != plain.key() and other_vae.folder(Path("/c")) != plain.folder(Path("/c"))


def test_a_run_with_model_vae_keys_its_class_images_by_it(make_cfg):
    from personalize.data import Subject
    from personalize.train import class_image_spec

    cfg = make_cfg("method=dreambooth", "subject=sample_dog", "model=tiny_sdxl")
    assert class_image_spec(cfg, Subject.from_cfg(cfg.subject)).vae is None
    cfg.model.vae = "/somewhere/sdxl-vae-fp16-fix"
    assert class_image_spec(cfg, Subject.from_cfg(cfg.subject)).vae == "/somewhere/sdxl-vae-fp16-fix"


@pytest.fixture(scope="module")
def tiny_spec():
    """The tiny base model and a class-image spec on it (2 sampler steps: fast, and enough to mix the batch)."""
    from personalize.config import compose
    from personalize.models import resolve_pretrained

    model = compose("train", ["model=tiny"], output_dir="/unused").model
    spec = class_images.ClassImageSpec(resolve_pretrained(model), None, "a photo of dog", "", "dpm_multistep", 2, 7.5, 64, 0)
    return model, spec


def _ensure(tiny_spec, count: int, root, batch_size: int) -> list:
    from personalize.backbones import load_pipeline

    model, spec = tiny_spec
    return class_images.ensure_class_images(spec, count, root, lambda: load_pipeline(model), batch_size=batch_size)


def _stamps(paths) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in paths}


def test_a_top_up_or_a_resume_at_the_same_batch_size_is_bit_identical(tiny_spec, tmp_path, caplog):
    """Batches are aligned to the image index, so however the 7 images come about at batch size 3 they
    are made in the same batches [0,3) [3,6) [6,9) and are the same bytes as one uninterrupted run."""
    once = _ensure(tiny_spec, 7, tmp_path / "once", batch_size=3)

    # topped up 2 -> 5 -> 7: each count ends inside a batch, which the next call has to complete
    caplog.set_level(logging.INFO, logger="personalize.class_images")
    stamps: dict = {}
    for count, batches in ((2, 1), (5, 2), (7, 2)):
        caplog.clear()
        topped = _ensure(tiny_spec, count, tmp_path / "topped", batch_size=3)
        new = count - len(stamps)
        assert f"generating {new} of {count} class images" in caplog.text
        assert f"({batches} batch(es) of 3, aligned to the image index)" in caplog.text  # only the batches with holes
        assert sorted(p.name for p in topped[0].parent.glob("*.png")) == [p.name for p in topped]  # none beyond count
        assert {k: v for k, v in _stamps(topped).items() if k in stamps} == stamps  # what existed is not rewritten
        stamps = _stamps(topped)

    # a resume with holes in two batches (a kill mid-batch, a deleted file): batch [6,9) is complete, not redone
    holes = tiny_spec[1].folder(tmp_path / "holes")
    holes.mkdir(parents=True)
    for kept in (0, 1, 3, 6):
        shutil.copyfile(once[kept], holes / once[kept].name)
    caplog.clear()
    resumed = _ensure(tiny_spec, 7, tmp_path / "holes", batch_size=3)
    assert "generating 3 of 7 class images" in caplog.text and "(2 batch(es) of 3" in caplog.text

    reference = [p.read_bytes() for p in once]
    assert [p.read_bytes() for p in topped] == reference
    assert [p.read_bytes() for p in resumed] == reference


def _pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths])


# Another batch shape (or another CPU's kernels) changes the float sums in their last bits; through the
# VAE that moves a pixel by one level of 255 only where a value sat at a rounding boundary: measured on
# the tiny model, at most 1 level in about 1 value in 10,000. Allowed: 2 levels, and 1% of the values.
# A real change is far outside that: images of neighbouring seeds differ by most of the range.
MAX_LEVELS, MAX_SHARE = 2, 0.01


def _assert_close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = np.abs(a - b)
    assert diff.max() <= MAX_LEVELS and (diff > 0).mean() <= MAX_SHARE, (what, diff.max(), (diff > 0).mean())


def test_another_batch_size_or_another_cpu_gives_images_close_but_not_promised_equal(tiny_spec, tmp_path):
    by_one = _pixels(_ensure(tiny_spec, 4, tmp_path / "b1", batch_size=1))
    by_four = _pixels(_ensure(tiny_spec, 4, tmp_path / "b4", batch_size=4))
    _assert_close(by_one, by_four, "batch size 1 vs 4")

    # another CPU: the same generation with PyTorch's portable (non-SIMD) kernels, in a fresh process
    script = (
        "import sys\n"
        "from personalize.config import compose\n"
        "from personalize.backbones import load_pipeline\nfrom personalize.models import resolve_pretrained\n"
        "import personalize.class_images as ci\n"
        "model = compose('train', ['model=tiny'], output_dir='/unused').model\n"
        f"spec = ci.{tiny_spec[1]!r}\n"
        "ci.ensure_class_images(spec, 4, sys.argv[1], lambda: load_pipeline(model), batch_size=4)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "portable")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, ATEN_CPU_CAPABILITY="default"), cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    portable = _pixels(sorted(tiny_spec[1].folder(tmp_path / "portable").glob("*.png")))
    _assert_close(portable, by_four, "default kernels vs this CPU's")

    assert np.abs(by_four[0] - by_four[1]).max() > 64  # the tolerance is far below what another seed changes


def test_parallel_jobs_of_one_class_generate_once(tmp_path):
    """Two processes asking for the same class images at once: one generates, the other waits and reuses."""
    import subprocess
    import sys

    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from personalize.config import compose\n"
        "from personalize.backbones import load_pipeline\nfrom personalize.models import resolve_pretrained\n"
        "import personalize.class_images as ci\n"
        "model = compose('train', ['model=tiny'], output_dir='/unused').model\n"
        "spec = ci.ClassImageSpec(resolve_pretrained(model), None, 'a photo of dog', '', 'dpm_multistep', 4, 7.5, 64, 0)\n"
        f"ci.ensure_class_images(spec, 6, '{tmp_path}', lambda: load_pipeline(model), batch_size=2)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert sum("generating 6 of 6" in log for log in logs) == 1, logs
    assert sum("reusing 6 cached" in log for log in logs) == 1, logs
