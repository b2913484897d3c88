"""Subjects and their photos: find, validate, normalise and crop them for training.

Photos come as users have them: EXIF-rotated, grayscale, RGBA, palette, CMYK or 16-bit, some too small,
some not images at all. All are turned into RGB here, once, so the rest of the code sees one format;
what cannot be used is skipped with a warning or is a one-line error naming the file.

How a photo becomes a training image (`method.data`, `DataSettings`):
- `crop: center` (the default): the centre square, resized to the resolution (DreamBooth's preprocessing),
  done once; the module VAE-encodes these once and samples every step from the cached latents.
- `crop: random`: as diffusers' train_dreambooth `--random_crop` does it: the shorter side resized to the
  resolution, then a resolution x resolution window at a random offset along the longer side, drawn anew
  for each example of each step (`crop_square`). The module keeps the resized photos and VAE-encodes each
  step's crops (a VAE encode per step: the price of a fresh crop; square photos have only one crop).
- `interpolation`: the resize filter, one of PIL's (schema `INTERPOLATIONS`); bicubic by default.

A caption is a `.txt` beside a photo with the photo's name (dog/00.jpg -> dog/00.txt): that photo's
training prompt, a template that may name {identifier}, {class_noun} and {phrase} (`read_caption`).
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
from personalize.schema import CROPS, INTERPOLATIONS, PROMPT_FIELDS, Template

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
CAPTION_SUFFIX = ".txt"
ORIENTATION_TAG = 0x0112  # EXIF Orientation
KINDS = ("live", "object")
# method.data.interpolation names (the schema's, which lists the valid ones) -> PIL's resize filter
FILTERS = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}


@dataclass(frozen=True)
class DataSettings:
    """`method.data`: how photos become training images (see the module docstring)."""

    crop: str = "center"
    interpolation: str = "bicubic"

    @classmethod
    def from_cfg(cls, method_cfg) -> "DataSettings":
        data = (method_cfg.get("data") if method_cfg is not None else None) or {}
        return cls(crop=str(data.get("crop", cls.crop)), interpolation=str(data.get("interpolation", cls.interpolation)))

    def non_default(self) -> dict:
        """The settings that differ from the defaults (what checkpoint.json names)."""
        default = DataSettings()
        return {k: v for k, v in vars(self).items() if v != getattr(default, k)}


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
    captions = {caption_path(p) for p in images}  # read by load_subject_photos, not skipped
    for other in sorted(set(files) - set(images) - captions):
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


def _resize(img: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    """PIL's resize with the named filter; a photo 4x or more the target size is first box-reduced by
    PIL (reducing_gap=3: the same result to the eye, much faster on a 12-megapixel photo)."""
    reducing_gap = None if min(img.size) < 4 * min(size) else 3.0
    return img.resize(size, FILTERS[interpolation], reducing_gap=reducing_gap)


def center_crop_resize(img: Image.Image, resolution: int, interpolation: str = "bicubic") -> Image.Image:
    """Crop the centre square and resize it to `resolution` (the DreamBooth preprocessing)."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = _resize(img, (resolution, resolution), interpolation)
    return img


def resize_short_side(img: Image.Image, resolution: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is `resolution`, keeping the aspect ratio (the longer side rounded down,
    as torchvision's Resize(int) computes it, which diffusers' train_dreambooth applies before its crop)."""
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)
    size = (new_long, resolution) if width >= height else (resolution, new_long)
    return img if size == img.size else _resize(img, size, interpolation)


def crop_offsets(pixels: torch.Tensor, resolution: int) -> int:
    """How many crop offsets a resized photo [3, H, W] has along its longer side (1 for a square)."""
    return max(pixels.shape[-2:]) - resolution + 1


def crop_square(pixels: torch.Tensor, offset: int, resolution: int) -> torch.Tensor:
    """The resolution x resolution window of a resized photo [3, H, W] (shorter side = resolution) that
    starts `offset` pixels along its longer side (left for a landscape photo, top for a portrait one)."""
    height, width = pixels.shape[-2:]
    if not 0 <= offset < crop_offsets(pixels, resolution) or min(height, width) != resolution:
        raise ValueError(f"no crop at offset {offset} of a {width}x{height} photo at resolution {resolution}")
    if width >= height:
        return pixels[..., :, offset:offset + resolution]
    return pixels[..., offset:offset + resolution, :]


def upright_size(path: Path) -> tuple[int, int]:
    """(height, width) of a photo at full size as it stands upright (EXIF orientation applied), from its
    header alone: the "original size" of SDXL's micro-conditioning (open_rgb may decode a large JPEG at a
    reduced scale)."""
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8):  # EXIF orientations that turn by 90 degrees
            width, height = height, width
    return height, width


def crop_top_left(original_size: tuple[int, int], resolution: int, offset: int | None = None,
                  mirrored: bool = False) -> tuple[int, int]:
    """(top, left) of a training square in the photo resized so its shorter side is `resolution`, as diffusers'
    SDXL scripts compute it for their crop conditioning: the centre crop's, max(0, round((side - R) / 2)), when
    `offset` is None, else that of the random crop `offset` pixels along the longer side (crop_square). A
    mirrored row is a crop of the mirrored photo (the scripts flip, then crop): a random crop along the
    width starts from the other side."""
    height, width = original_size
    resized_long = int(resolution * max(height, width) / min(height, width))  # as resize_short_side rounds it
    slack = resized_long - resolution
    if offset is None:
        along = max(0, int(round(slack / 2.0)))
    else:
        along = slack - offset if mirrored and width >= height else offset
    return (0, along) if width >= height else (along, 0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1], the VAE's input range."""
    array = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float().div(127.5).sub(1.0)


def caption_path(image: Path) -> Path:
    """Where a photo's caption is: dog/00.jpg -> dog/00.txt."""
    return Path(image).with_suffix(CAPTION_SUFFIX)


CAPTION = Template(PROMPT_FIELDS)  # a caption is checked as the method's prompt templates are


def read_caption(image: Path) -> str | None:
    """The caption template of a photo (surrounding whitespace stripped), or None where it has none; one
    line naming the file when it cannot be a prompt."""
    path = caption_path(image)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise PersonalizeError(f"cannot read caption '{path}' ({error}): save it as UTF-8 text, or delete it to "
                               "train that photo on the method's prompt") from error
    if not text:
        raise PersonalizeError(f"caption '{path}' is empty: write the photo's prompt in it, or delete it to train "
                               "that photo on the method's prompt")
    problem = CAPTION.problem(text)
    if problem:
        raise PersonalizeError(f"caption '{path}' ({text!r}) {problem}: use {CAPTION.accepts()} "
                               "(write {{ or }} for a literal brace)")
    return text


@dataclass(frozen=True)
class SubjectPhotos:
    """A subject's photos, ready for training (see the module docstring)."""

    paths: list[Path]
    images: torch.Tensor  # [N, 3, R, R] in [-1, 1]: the centre crops
    captions: list[str | None]  # each photo's caption template; None: it has none
    uncropped: list[torch.Tensor] | None = None  # crop=random: each photo [3, H, W], shorter side = R
    sizes: tuple[tuple[int, int], ...] = ()  # each photo's (height, width) upright at full size (upright_size)

    def captions_by_name(self, identifier: str, class_noun: str, phrase: str) -> dict[str, str | None]:
        """{photo file name: its caption with {identifier}, {class_noun}, {phrase} filled, or None}, in photo
        order. A caption that does not name the identifier teaches the subject nothing: said once, here."""
        filled = {}
        for path, caption in zip(self.paths, self.captions):
            text = None if caption is None else caption.format(identifier=identifier, class_noun=class_noun, phrase=phrase)
            if text is not None and identifier not in text:
                log.warning("caption '%s' (%r) does not name the subject: write {phrase} or {identifier} in it, "
                            "else that photo trains the model on the caption alone", caption_path(path), text)
            filled[path.name] = text
        return filled


def load_subject_photos(folder: Path, resolution: int, settings: DataSettings = DataSettings()) -> SubjectPhotos:
    """All photos of a subject, their captions, and (crop=random) the photos resized for random crops."""
    paths = list_images(folder)
    if settings.crop not in CROPS or settings.interpolation not in INTERPOLATIONS:  # config checks catch it first
        raise PersonalizeError(f"method.data={vars(settings)}: use crop one of {', '.join(CROPS)} and "
                               f"interpolation one of {', '.join(INTERPOLATIONS)}")
    images, uncropped = [], []
    for path in paths:
        img = open_rgb(path, min_side=resolution)
        if min(img.size) < resolution:
            log.warning(
                "'%s' is %dx%d, smaller than the training resolution %d: it will be upscaled and look soft",
                path, *img.size, resolution,
            )
        images.append(to_tensor(center_crop_resize(img, resolution, settings.interpolation)))
        if settings.crop == "random":
            uncropped.append(to_tensor(resize_short_side(img, resolution, settings.interpolation)))
    captions = [read_caption(p) for p in paths]
    return SubjectPhotos(paths, torch.stack(images), captions, uncropped if settings.crop == "random" else None,
                         sizes=tuple(upright_size(p) for p in paths))


def load_subject_images(folder: Path, resolution: int) -> torch.Tensor:
    """All photos of a subject as a [N, 3, R, R] tensor in [-1, 1] (centre crops, bicubic)."""
    return load_subject_photos(folder, resolution).images
