"""Subjects and their photos: find, validate, normalise and crop them for training.

Photos come as users have them: EXIF-rotated, grayscale, RGBA, palette, CMYK or 16-bit, some too small,
some not images at all. All are turned into RGB squares here, once, so the rest of the code sees one
format; what cannot be used is skipped with a warning or is a one-line error naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps, UnidentifiedImageError

from personalize.config import derive_init_word
from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
KINDS = ("live", "object")


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str  # "dog", "stuffed animal"
    kind: str  # "live" or "object": picks the DreamBooth prompt list
    data_dir: Path
    init_word: str  # a one-token noun that initialises a noun placeholder (textual inversion)

    @classmethod
    def from_cfg(cls, cfg) -> "Subject":
        # subject=folder leaves these to the command line (`???`); OmegaConf would raise a multi-line
        # MissingMandatoryValue from wherever they are first read
        for key, value in (("data_dir", "<folder of 3-6 photos>"), ("class_noun", "<what the photos show, e.g. dog>")):
            if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key):
                raise PersonalizeError(
                    f"subject.{key} is not set: add subject.{key}={value} (in full: personalize subject=folder "
                    "subject.data_dir=<folder of 3-6 photos> subject.class_noun=<noun>)"
                )
        if not str(cfg.class_noun).strip():
            raise PersonalizeError(f"subject.class_noun is empty for subject '{cfg.name}': say what the photos show, e.g. subject.class_noun=dog")
        if cfg.kind not in KINDS:
            raise PersonalizeError(f"subject '{cfg.name}' has kind '{cfg.kind}': use one of {', '.join(KINDS)}")
        return cls(
            name=str(cfg.name), class_noun=str(cfg.class_noun), kind=str(cfg.kind),
            data_dir=Path(str(cfg.data_dir)).expanduser(),
            init_word=str(cfg.get("init_word") or derive_init_word(str(cfg.class_noun))),
        )


def check_init_word(subject: Subject, tokenizer) -> None:
    """The subject's init word (where a new noun token starts, textual inversion) must be one token of
    the model's tokenizer; else one line suggesting a word that is."""
    ids = tokenizer.encode(subject.init_word, add_special_tokens=False)
    if len(ids) == 1:
        return
    pieces = " ".join(tokenizer.convert_ids_to_tokens(ids))
    # Other words of the class noun first ("plushie toy" -> "toy"), then a general word for the kind
    fallback = ("animal", "pet", "dog", "person") if subject.kind == "live" else ("object", "toy", "thing", "bag")
    candidates = [*reversed(str(subject.class_noun).split()), *fallback]
    one_token = [w for w in candidates if w != subject.init_word and len(tokenizer.encode(w, add_special_tokens=False)) == 1]
    hint = f"e.g. subject.init_word={one_token[0]}" if one_token else "e.g. a more general word for the class"
    raise PersonalizeError(
        f"subject.init_word '{subject.init_word}' (from subject.class_noun '{subject.class_noun}') is {len(ids)} "
        f"tokens of the model's tokenizer ({pieces}), not one: set a one-token word close in meaning, {hint}"
    )


def list_images(folder: Path) -> list[Path]:
    """The image files of a subject folder, sorted; other files are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PersonalizeError(
            f"subject folder '{folder}' does not exist: set subject.data_dir to a folder of photos (the 30 "
            "DreamBooth subjects: `make data` fetches them into paths.dreambooth_dir, or set DREAMBOOTH_DIR)"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    for other in sorted(set(files) - set(images)):
        log.warning("skipping '%s': not an image file (supported: %s)", other, ", ".join(sorted(IMAGE_SUFFIXES)))
    if not images:
        skipped = f" ({len(files)} other files skipped)" if files else ""
        raise PersonalizeError(f"subject folder '{folder}' has no images{skipped}: put 3-6 photos of the subject there")
    return images


def open_rgb(path: Path, min_side: int | None = None) -> Image.Image:
    """Open any common photo as an upright 8-bit RGB image, or fail naming the file.

    `min_side`: the caller needs no more than this many pixels on the shorter side, so a huge JPEG is
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: fast, little memory, no aliasing) while
    keeping at least 2x that size for the final resize.
    """
    try:
        with Image.open(path) as img:
            if min_side and img.format == "JPEG":
                img.draft(img.mode, (2 * min_side, 2 * min_side))
            img.load()  # force decoding now so a truncated file fails here, not mid-training
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grayscale: scale to 8 bits by the value range instead of clipping at 255
                array = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
                img = Image.fromarray((array / peak * 255.0).round().astype(np.uint8))
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                # flatten transparency onto white: what a viewer shows, and no black halos
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB")
    except Image.DecompressionBombError as error:
        raise PersonalizeError(
            f"image '{path}' is too large to open safely ({error}): downscale it, e.g. to 4096 px on the long side"
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise PersonalizeError(
            f"cannot read image '{path}' ({error}): the file is corrupt or truncated; re-export it or remove it"
        ) from error


def center_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` and crop the centre square (the DreamBooth preprocessing)."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None if side < 4 * resolution else 3.0)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1], the VAE's input range."""
    array = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float().div(127.5).sub(1.0)


def load_subject_images(folder: Path, resolution: int) -> torch.Tensor:
    """All photos of a subject as a [N, 3, R, R] tensor in [-1, 1]."""
    tensors = []
    for path in list_images(folder):
        img = open_rgb(path, min_side=resolution)
        if min(img.size) < resolution:
            log.warning(
                "'%s' is %dx%d, smaller than the training resolution %d: it will be upscaled and look soft",
                path, *img.size, resolution,
            )
        tensors.append(to_tensor(center_crop_resize(img, resolution)))
    return torch.stack(tensors)
