"""Class images for DreamBooth's prior-preservation loss, generated once and shared through a cache.

The cache folder is named by a hash of everything that decides what the images look like (model and
revision, prompt, negative prompt, sampler, steps, guidance, resolution, seed). Image i is always drawn
from seed + i, so it does not depend on the batch size or on how many images were asked for: a request
for 200 reuses the 100 a smaller run made and generates only the rest, and a run killed half-way resumes
where it stopped. Each image is written to a temporary name and renamed, so no half-written PNG is trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from personalize.errors import PersonalizeError
from personalize.io import atomic_save_image, atomic_write_json, remove_stale_temps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassImageSpec:
    model: str  # resolved hub id or folder of the base model
    revision: str | None
    prompt: str
    negative_prompt: str
    sampler: str
    steps: int
    guidance_scale: float
    resolution: int
    seed: int

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def folder(self, cache_root: Path) -> Path:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:48]
        return Path(cache_root) / f"{slug}-{self.key()}"


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def missing_indices(folder: Path, count: int) -> list[int]:
    return [i for i in range(count) if not image_path(folder, i).exists()]


def ensure_class_images(spec: ClassImageSpec, count: int, cache_root: Path, make_pipeline, batch_size: int = 4,
                        device: str | torch.device = "cpu", generate: bool = True, wait_s: float = 3600.0) -> list[Path]:
    """Paths of `count` class images for `spec`, generating only those not cached yet.

    `make_pipeline()` returns the frozen base pipeline; it is called only if something must be generated.
    `generate=False` (ranks other than 0 of a multi-process run) waits up to `wait_s` for another process
    to write the missing images instead of generating them too.
    """
    if count <= 0:
        raise PersonalizeError(f"class_images.count is {count}: prior preservation needs at least 1 class image")
    folder = spec.folder(cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / "spec.json"
    if not spec_file.exists():
        atomic_write_json(spec_file, asdict(spec))
    remove_stale_temps(folder)  # half-written images of a killed run: never read, only disk
    todo = missing_indices(folder, count)
    if todo and not generate:
        deadline = time.monotonic() + wait_s
        while todo and time.monotonic() < deadline:
            time.sleep(2.0)
            todo = missing_indices(folder, count)
        if todo:
            raise PersonalizeError(
                f"waited {wait_s:.0f} s for rank 0 to generate {len(todo)} class images into {folder}: "
                "check rank 0's log, or generate them first with a single-process run"
            )
    if todo:
        with generation_lock(folder):
            todo = missing_indices(folder, count)  # a parallel job may have made them while we waited
            if todo:
                log.info("generating %d of %d class images for '%s' into %s", len(todo), count, spec.prompt, folder)
                _generate(make_pipeline(), spec, folder, todo, batch_size, device)
    if not todo:
        log.info("reusing %d cached class images for '%s' from %s", count, spec.prompt, folder)
    return [image_path(folder, i) for i in range(count)]


@contextlib.contextmanager
def generation_lock(folder: Path):
    """One generating process per cache folder: parallel sweep jobs of one class wait, then reuse."""
    with open(folder / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another job is generating the class images in %s: waiting for it", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@torch.no_grad()
def _generate(pipe, spec: ClassImageSpec, folder: Path, indices: list[int], batch_size: int, device) -> None:
    from personalize.models import make_sampler
    from personalize.sample import seeded_images

    make_sampler(pipe, spec.sampler)
    pipe.to(device)
    bar = tqdm(total=len(indices), desc="class images", unit="img")
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        # image i comes from seed + i: the same whatever the batch it lands in
        images = seeded_images(pipe, [spec.prompt] * len(chunk), [spec.seed + i for i in chunk], spec.steps,
                               spec.guidance_scale, spec.resolution, spec.negative_prompt)
        for i, image in zip(chunk, images):
            atomic_save_image(image, image_path(folder, i))
        bar.update(len(chunk))
    bar.close()

