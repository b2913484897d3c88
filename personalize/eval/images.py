"""The evaluation's images on disk: the subject's reference photos, the images of one pair (kept only
while the settings that made them hold), and the grid of a pair that goes to W&B. Where each file lives
is the run dir's layout (`personalize.rundir`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig
from PIL import Image

from personalize.data import Subject, center_crop_resize, list_images, open_rgb
from personalize.io import atomic_write_json
from personalize.rundir import SPEC_FILE, parse_image_name


def reference_images(run_cfg: DictConfig) -> list:
    """The subject's photos as the training saw them (upright RGB, center square at the model's resolution)."""
    subject = Subject.from_cfg(run_cfg.subject)
    resolution = int(run_cfg.model.resolution)
    return [center_crop_resize(open_rgb(p), resolution) for p in list_images(subject.data_dir)]


def open_image(path: Path):
    with Image.open(path) as image:
        return image.convert("RGB")


def prepare_image_dir(out: Path, generation: Mapping[str, Any], prompts: Sequence[str]) -> None:
    """Keep the images in `out` only if they came from the same generation settings and prompts
    (recorded in its spec.json); otherwise delete them, so that they are generated again."""
    wanted = {**generation, "prompts": list(prompts)}
    spec_file = out / SPEC_FILE
    if spec_file.exists():
        try:
            same = json.loads(spec_file.read_text()) == wanted
        except json.JSONDecodeError:
            same = False
        if same:
            return
        for stale in out.iterdir():
            if parse_image_name(stale.name) is not None:
                stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec_file, wanted)


def make_grid(images: Sequence, max_tile: int = 256):
    """A near-square grid of PIL images (tiles downscaled to at most `max_tile` px)."""
    tile = min(max_tile, max(max(im.size) for im in images))
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * tile, rows * tile), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((tile, tile)) if image.size != (tile, tile) else image, ((i % cols) * tile, (i // cols) * tile))
    return grid


def grid_samples(samples: Sequence, size: int) -> list:
    """The first image of each prompt (several-prompt protocols), else the first images of the prompt."""
    firsts = [s for s in samples if s.image_index == 0]
    return (firsts if len(firsts) > 1 else list(samples))[:size]
