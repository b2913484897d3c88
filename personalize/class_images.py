"""Class images for DreamBooth's prior-preservation loss, generated once and shared through a cache.

The cache folder is named by a hash of everything that decides what the images look like (model,
revision and model.vae, prompt, negative prompt, sampler, steps, guidance, resolution, seed). Image i is drawn from
seed + i, so a request for 200 reuses the 100 a smaller run made and generates only the rest, and a run
killed half-way resumes where it stopped. Each image is written to a temporary name and renamed, so no
half-written PNG is trusted.

Batches are aligned to the image index. CPU and GPU kernels pick other algorithms for other batch
shapes, so an image's low bits depend on the batch it was made in, not only on its seed. Image i is
therefore always made in batch i // batch_size, together with the same neighbours: the whole batch
[k * batch_size, (k + 1) * batch_size) is generated even when some of its images exist or lie beyond
the requested count (the last batch of a count that is not a multiple of batch_size is padded to full
size), and only the missing images below the count are written; existing files are never rewritten.
So image i depends only on the spec and the batch size: a top-up (a larger count) or a resumed
generation redoes only the batches that hold missing images and is bit-identical, on the same machine,
to one uninterrupted generation of the larger count. The price is at most batch_size - 1 images
generated and thrown away per call.

The batch size is not part of the cache key, on purpose: it changes images only in their low bits
(measured on the tiny model: at most 1 of 255 levels in a handful of pixels, as another CPU does), and a
class's 200 images should not be made again because a job had room for a larger batch. So another
batch size, or another machine, gives images equal to these only within such a tolerance, and a folder
topped up at another batch size holds images of both; what is bit-identical is the same machine and the
same batch size (docs/troubleshooting.md, "What is bit-identical").
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
from personalize.models import make_sampler
from personalize.sample import seeded_images
from personalize.signals import raise_if_interrupted

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
    vae: str | None = None  # model.vae: another VAE decodes the images (SDXL's fp16-fix); None: the model's own

    def key(self) -> str:
        fields = asdict(self)
        if fields["vae"] is None:  # the key of a spec without model.vae stays what it was before the field existed
            del fields["vae"]
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def folder(self, cache_root: Path) -> Path:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:48]
        return Path(cache_root) / f"{slug}-{self.key()}"


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def missing_indices(folder: Path, count: int) -> list[int]:
    return [i for i in range(count) if not image_path(folder, i).exists()]


def batches_to_generate(todo: list[int], batch_size: int) -> list[range]:
    """The index-aligned batches [k * batch_size, (k + 1) * batch_size) that hold a missing image."""
    return [range(k * batch_size, (k + 1) * batch_size) for k in sorted({i // batch_size for i in todo})]


def ensure_class_images(spec: ClassImageSpec, count: int, cache_root: Path, make_pipeline, batch_size: int = 4,
                        device: str | torch.device = "cpu", generate: bool = True, wait_s: float = 3600.0) -> list[Path]:
    """Paths of `count` class images for `spec`, generating only those not cached yet.

    `make_pipeline()` returns the frozen base pipeline; it is called only if something must be generated.
    `generate=False` (ranks other than 0 of a multi-process run) waits up to `wait_s` for another process
    to write the missing images instead of generating them too.
    """
    if count <= 0:
        raise PersonalizeError(f"class_images.count is {count}: prior preservation needs at least 1 class image")
    if batch_size <= 0:
        raise PersonalizeError(f"class_images.batch_size is {batch_size}: generate at least 1 image per batch "
                               "(e.g. class_images.batch_size=4)")
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
            raise_if_interrupted("class-image generation")  # a signal: stop waiting for rank 0 too
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
                batches = batches_to_generate(todo, batch_size)
                log.info("generating %d of %d class images for '%s' into %s (%d batch(es) of %d, aligned to the "
                         "image index)", len(todo), count, spec.prompt, folder, len(batches), batch_size)
                _generate(make_pipeline(), spec, folder, todo, batches, device)
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
def _generate(pipe, spec: ClassImageSpec, folder: Path, todo: list[int], batches: list[range], device) -> None:
    """Generate each whole batch, write only its images in `todo` (missing and below the count).

    The whole batch, not just its missing images: the same batch shape as an uninterrupted generation
    is what makes the missing images bit-identical to the ones it would have made.
    """
    make_sampler(pipe, spec.sampler)
    pipe.to(device)
    wanted = set(todo)
    bar = tqdm(total=len(todo), desc="class images", unit="img")
    for batch in batches:
        raise_if_interrupted("class-image generation")  # a signal: stop between batches, keep what is written
        images = seeded_images(pipe, [spec.prompt] * len(batch), [spec.seed + i for i in batch], spec.steps,
                               spec.guidance_scale, spec.resolution, spec.negative_prompt)
        written = [i for i in batch if i in wanted]
        for i in written:  # existing images stay as they are, byte for byte and mtime
            atomic_save_image(images[i - batch.start], image_path(folder, i))
        bar.update(len(written))
    bar.close()
