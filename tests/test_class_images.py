"""The class-image cache: shared across subjects of a class and across methods, keyed by content."""

from __future__ import annotations


import personalize.class_images as class_images
from personalize.train import prepare_run


def _generated_counts(monkeypatch) -> list[int]:
    counts: list[int] = []
    original = class_images._generate

    def counting(pipe, spec, folder, indices, batch_size, device):
        counts.append(len(indices))
        return original(pipe, spec, folder, indices, batch_size, device)

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


def test_image_i_does_not_depend_on_the_batch(tmp_path):
    from personalize.config import compose
    from personalize.models import load_pipeline, resolve_pretrained

    model = compose("train", ["model=tiny"], output_dir="/unused").model
    spec = class_images.ClassImageSpec(resolve_pretrained(model), None, "a photo of dog", "", "dpm_multistep", 2, 7.5, 64, 0)
    one = class_images.ensure_class_images(spec, 3, tmp_path / "b1", lambda: load_pipeline(model), batch_size=1)
    three = class_images.ensure_class_images(spec, 3, tmp_path / "b3", lambda: load_pipeline(model), batch_size=3)
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in three]


def test_parallel_jobs_of_one_class_generate_once(tmp_path):
    """Two processes asking for the same class images at once: one generates, the other waits and reuses."""
    import subprocess
    import sys

    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from personalize.config import compose\n"
        "from personalize.models import load_pipeline, resolve_pretrained\n"
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
