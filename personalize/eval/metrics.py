"""Evaluation metrics: CLIP-I, CLIP-T, DINO, CLIP score, FID and IS, as torchmetrics `Metric`s.

All of them accumulate over batches and sync under DDP (sum-reduced states), so an evaluation loop can
feed generated images in any batch split or order and get the same number.

Image preprocessing is done here in torch (resize the shorter side with antialiased bicubic, center
crop, normalise) rather than by the transformers image processors: in transformers 5 those want
torchvision, which we cannot require (the registry's build is CUDA-only). The frozen evaluation models
are loaded by hub id or local folder through `from_pretrained`, so the tiny stand-ins of
`personalize.eval.standins` go through the same code as `openai/clip-vit-base-patch32` and
`facebook/dino-vits16`.

The encoders are plain objects, not `nn.Module`s, and metrics keep them as plain attributes: a metric
that lives on a LightningModule would otherwise put the frozen CLIP/DINO weights into every checkpoint
(checkpoints hold only what trained). `build_metrics(..., device=...)` places the encoders.

FID and IS on Inception features see images resized by us, not by torchmetrics. torchmetrics 1.8 changed
its Inception input resize (TensorFlow-1 bilinear without antialiasing before, antialiased bilinear
since), which changes FID and IS of every image not already 299 pixels. We resize every image to
299x299 with TensorFlow 1.x's `resize_bilinear` (align_corners=False, no antialiasing): the resize inside
the original TF Inception graph of the FID and IS papers, which torch-fidelity and torchmetrics < 1.8
reproduce, so our numbers stay comparable with published ones. (clean-fid argues for PIL's antialiased
bicubic, which aliases less but gives other numbers than the published FIDs we compare with.) Any
torchmetrics resize to 299 is the identity on a 299 input, so the installed version no longer matters.
The one difference from feeding the TF graph: the 299 image is rounded to uint8 (torchmetrics'
Inception takes only uint8), at most half a grey level per pixel. CLIP/DINO features for FID are resized
by their encoder's own preprocessing. Each metric's `settings()` (implementation and version, features,
resize) goes into the metrics record: `metric_settings`.

Typical use, per subject::

    metrics = build_metrics(["clip_i", "clip_t", "dino", "fid"], clip_id, dino_id, "clip", device)
    set_references(metrics, reference_images)           # encoded once per subject
    for checkpoint in checkpoints:
        for images, prompts in generated_batches:
            update_metrics(metrics, images, prompts)        # prompts: protocol.clean_prompts
        scores = compute_metrics(metrics)                   # {"clip_i": ..., "fid": ...}
        reset_metrics(metrics)                              # references / FID real features survive
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.inception import InceptionScore

from personalize import instrument
from personalize.errors import PersonalizeError
from personalize.eval.standins import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from personalize.prompts import CLASS_NOUNS

try:  # only for type hints and isinstance; PIL comes with transformers/diffusers anyway
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None  # type: ignore[assignment]

ImageInput = Union[Tensor, Sequence[Any]]  # [N,3,H,W] uint8 / float in [0,1], or a sequence of PIL / [3,H,W]


# Identifiers the project's methods put in prompts; CLIP-T never shows them to the text encoder.
DEFAULT_IDENTIFIERS: tuple[str, ...] = ("<rare>", "<sks>", "sks")

METRIC_NAMES = ("clip_i", "clip_t", "dino", "clip_score", "fid", "is")
FID_FEATURES = ("inception", "clip", "dino")
FIDELITY_HINT = (
    "pip install 'personalize[fidelity]' (pulls torch-fidelity and torchvision), "
    "or set eval.fid_features=clip (or dino) to use an extractor that works offline"
)


# ----------------------------------------------------------------------------------------------------
# images -> preprocessed tensors


def _to_chw(image: Any) -> Tensor:
    """One image as a [3,H,W] tensor (uint8 or float, as given)."""
    if _PILImage is not None and isinstance(image, _PILImage.Image):
        import numpy as np

        image = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise TypeError(f"expected a PIL image or a [C,H,W] tensor, got {type(image).__name__}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        image = image[:3]  # drop alpha
    return image


def _to_float(images: Tensor) -> Tensor:
    """uint8 [0,255] -> float [0,1]; floats are taken to be in [0,1] already (what diffusers returns)."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def to_uint8(images: Tensor) -> Tensor:
    """float [0,1] -> uint8, the input the Inception extractor insists on; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


# The Inception network's input size, and how our images get there (the name goes into the records).
INCEPTION_SIZE = 299
INCEPTION_RESIZE = f"tf1-bilinear-{INCEPTION_SIZE}"
IS_SPLIT_SEED = 0  # IS shuffles its features into splits: with this seed (see IS.compute)


def _tf1_axis(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Along one axis of TF1 `resize_bilinear(align_corners=False)`: output pixel i reads input position
    i * n_in / n_out (no half-pixel offset), computed in float32 as TensorFlow does; returns the two
    neighbours (clamped at the border) and the weight of the second."""
    position = torch.arange(n_out, dtype=torch.float32, device=device) * torch.tensor(n_in / n_out, dtype=torch.float32)
    low = position.long()  # positions are >= 0, so truncation is floor
    high = (low + 1).clamp(max=n_in - 1)
    return low, high, position - low


def resize_bilinear_tf1(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """[..., H, W] float -> [..., h, w] with TensorFlow 1.x's bilinear resize: no antialiasing, no
    half-pixel centers (the resize of the TF Inception graph that published FID and IS numbers went
    through). Each output is lerp(lerp(top-left, top-right), lerp(bottom-left, bottom-right)) in TF's
    order, so the result matches TF1 (and torch-fidelity's port of it) up to float rounding. A same-size
    resize is the identity."""
    if not images.is_floating_point():
        raise TypeError(f"resize_bilinear_tf1 takes float images, got {images.dtype}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    rows_lo, rows_hi, dy = _tf1_axis(images.shape[-2], out_h, images.device)
    cols_lo, cols_hi, dx = _tf1_axis(images.shape[-1], out_w, images.device)
    left, right = images[..., cols_lo], images[..., cols_hi]
    across = left + (right - left) * dx.to(images.dtype)  # every input row, resampled along x
    top, bottom = across[..., rows_lo, :], across[..., rows_hi, :]
    return top + (bottom - top) * dy.to(images.dtype)[:, None]


def inception_input(images: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """[n,3,H,W] uint8 / float [0,1] -> [n,3,size,size] uint8: quantised first (what a saved PNG holds),
    TF1-bilinear resized in float, rounded back to uint8, the dtype torchmetrics' Inception requires."""
    images = to_uint8(images)
    if tuple(images.shape[-2:]) == (size, size):
        return images
    resized = resize_bilinear_tf1(images.float(), size)
    return resized.round().clamp(0, 255).to(torch.uint8)  # a convex combination: the clamp is only a guard


def num_images(images: ImageInput) -> int:
    return images.shape[0] if isinstance(images, Tensor) else len(images)


def image_batches(images: ImageInput, batch_size: int) -> Iterator[Tensor]:
    """Chunks of at most `batch_size` images as [n,3,H,W] tensors with one size per chunk.

    A sequence of differently sized images (reference photos usually are) is cut into runs of equal size,
    so each chunk can be resized as one tensor.
    """
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise TypeError(f"expected images as [N,C,H,W], got shape {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size, :3]
        return
    run: list[Tensor] = []
    for image in images:
        chw = _to_chw(image)
        if run and (chw.shape != run[0].shape or chw.dtype != run[0].dtype or len(run) == batch_size):
            yield torch.stack(run)
            run = []
        run.append(chw)
    if run:
        yield torch.stack(run)


def resize_center_crop(images: Tensor, resize_size: int, crop_size: int) -> Tensor:
    """Resize the shorter side to `resize_size` (bicubic, antialiased), then center-crop `crop_size`.

    The arithmetic follows the transformers image processors (shortest_edge resize, then crop), so on
    real models we see the same pixels the reference implementations saw, up to PIL-vs-torch resampling.
    """
    images = _to_float(images)
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = resize_size, int(resize_size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        images = images.clamp(0, 1)  # bicubic overshoots; PIL on uint8 clamps the same way
    top, left = max(new_h - crop_size, 0) // 2, max(new_w - crop_size, 0) // 2
    return images[..., top:top + crop_size, left:left + crop_size]


def _normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


# ----------------------------------------------------------------------------------------------------
# frozen encoders


def _load(cls: Any, name: str | os.PathLike, **kwargs: Any) -> Any:
    """`cls.from_pretrained(name)` through the project's loader: the local cache first (no network when
    cached), one line naming the model and how to fetch it when it is not there."""
    from personalize.models import load_pretrained

    return load_pretrained(cls, str(name), **kwargs)


def _preprocessor_config(name: str | os.PathLike) -> dict[str, Any]:
    """The repo's preprocessor_config.json as a dict, or {} when there is none or it cannot be fetched."""
    path = Path(name) / "preprocessor_config.json"
    try:
        if Path(name).is_dir():
            return json.loads(path.read_text()) if path.exists() else {}
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(name), "preprocessor_config.json")).read_text())
    except Exception:  # noqa: BLE001 - the config only refines defaults read from the model config
        return {}


def _size(value: Any, key: str) -> int | None:
    """Sizes appear as ints (old hub configs) or dicts ({"shortest_edge": n} / {"height": n, ...})."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return value.get(key) or value.get("height")
    return None


class ImageEncoder:
    """A frozen image model that maps images to L2-normalised features (shared machinery)."""

    kind: str  # "clip" / "dino": how records name the features
    name_or_path: str
    feature_dim: int
    resize_size: int
    crop_size: int
    mean: Sequence[float]
    std: Sequence[float]

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32) -> None:
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.dtype = dtype
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "ImageEncoder":
        self.model.to(device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """[n,3,H,W] uint8/float -> normalised [n,3,crop,crop] in the model's dtype on its device."""
        images = images.to(self.device)
        images = resize_center_crop(images, self.resize_size, self.crop_size)
        return _normalize(images, self.mean, self.std).to(self.dtype)

    def _forward(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """The features and the image resize, as the metrics records name them."""
        return {"features": f"{self.kind}:{self.name_or_path}",
                "resize": f"shortest-edge-{self.resize_size}-bicubic-antialias-center-crop-{self.crop_size}"}

    @torch.no_grad()
    def encode_images(self, images: ImageInput) -> Tensor:
        """[N, feature_dim] float32 unit vectors, on the encoder's device."""
        with instrument.span(f"metrics.encode.{self.kind}"):  # each encoder's share of the metric time
            feats = [self._forward(self.preprocess(batch)) for batch in image_batches(images, self.batch_size)]
        if not feats:
            return torch.zeros(0, self.feature_dim, device=self.device)
        return F.normalize(torch.cat(feats).float(), dim=-1)


class ClipEncoder(ImageEncoder):
    """CLIP image and text features (`openai/clip-vit-base-patch32` or a local folder with the same layout).

    Preprocessing comes from the repo's preprocessor_config.json (size, crop, mean/std), falling back to
    the vision config's image_size and the OpenAI CLIP statistics.
    """

    kind = "clip"

    def __init__(self, name_or_path: str | os.PathLike = "openai/clip-vit-base-patch32",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 32) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.name_or_path = str(name_or_path)
        super().__init__(_load(CLIPModel, name_or_path), device, dtype, batch_size)
        self.tokenizer = _load(AutoTokenizer, name_or_path)
        config = self.model.config
        pre = _preprocessor_config(name_or_path)
        image_size = config.vision_config.image_size
        self.resize_size = _size(pre.get("size"), "shortest_edge") or image_size
        self.crop_size = _size(pre.get("crop_size"), "height") or image_size
        self.mean = tuple(pre.get("image_mean", CLIP_MEAN))
        self.std = tuple(pre.get("image_std", CLIP_STD))
        self.feature_dim = config.projection_dim
        self.max_length = config.text_config.max_position_embeddings

    def _forward(self, pixel_values: Tensor) -> Tensor:
        # vision_model + visual_projection == get_image_features; spelled out because transformers 5
        # returns a ModelOutput from get_image_features where 4.x returned the tensor.
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return self.model.visual_projection(pooled)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """[len(texts), feature_dim] float32 unit vectors; the text is encoded exactly as given."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


class DinoEncoder(ImageEncoder):
    """DINO CLS features (`facebook/dino-vits16` or a local folder), with the DreamBooth protocol's preprocessing.

    Resize the shorter side to 256, center crop 224, ImageNet mean/std. The crop defaults to the model's
    image_size and the resize to crop * 256/224, which gives 256/224 for the real model and keeps the
    same ratio for a stand-in with a smaller image_size; both can be given explicitly.
    """

    kind = "dino"

    def __init__(self, name_or_path: str | os.PathLike = "facebook/dino-vits16", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, resize_size: int | None = None,
                 crop_size: int | None = None) -> None:
        from transformers import ViTModel

        self.name_or_path = str(name_or_path)
        # The CLS token of the last hidden state is the DINO feature; the pooler is not part of DINO.
        super().__init__(_load(ViTModel, name_or_path, add_pooling_layer=False), device, dtype, batch_size)
        config = self.model.config
        self.crop_size = crop_size or config.image_size
        self.resize_size = resize_size or round(self.crop_size * 256 / 224)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.feature_dim = config.hidden_size

    def _forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


# ----------------------------------------------------------------------------------------------------
# prompt cleaning


def strip_identifier(prompt: str, identifier: str | Sequence[str] = DEFAULT_IDENTIFIERS) -> str:
    """The prompt without the subject identifier(s), e.g. "a <rare> dog in the snow" -> "a dog in the snow".

    Only whole words are removed ("sks" goes, "tasks" stays), then runs of spaces collapse to one.
    """
    identifiers = [identifier] if isinstance(identifier, str) else list(identifier)
    for ident in sorted(filter(None, identifiers), key=len, reverse=True):  # "<sks>" before "sks"
        prompt = re.sub(rf"(?<![\w<>]){re.escape(ident)}(?![\w<>])", " ", prompt)
    return re.sub(r"\s+", " ", prompt).strip()


# ----------------------------------------------------------------------------------------------------
# metrics


class MeanPairwiseCosine(Metric):
    """Mean cosine over all generated x reference pairs (CLIP-I with a ClipEncoder, DINO with a DinoEncoder).

    mean_ij <g_i, r_j> = <sum_i g_i, sum_j r_j> / (n_gen * n_ref) for unit vectors, so the state is two
    sums and two counts: O(dim) memory, exact, and sum-reducible under DDP.

    The reference side is set once per subject (`set_reference_images` / `set_reference_features`) and
    survives `reset()`, so evaluating the next checkpoint does not re-encode the references. It is not a
    synced state: every rank sets the same references.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, encoder: ImageEncoder, reference_features: Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = encoder
        self.add_state("gen_sum", torch.zeros(encoder.feature_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_gen", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # Plain attributes, not buffers: .half() on a LightningModule must not round them.
        self._ref_sum: Tensor | None = None
        self._n_ref = 0
        if reference_features is not None:
            self.set_reference_features(reference_features)

    def set_reference_features(self, features: Tensor) -> None:
        """Reference features [n_ref, dim] from this metric's encoder (re-normalised here)."""
        if features.dim() != 2 or features.shape[1] != self.encoder.feature_dim or features.shape[0] == 0:
            raise ValueError(f"expected reference features [n>0, {self.encoder.feature_dim}], got {tuple(features.shape)}")
        self._ref_sum = F.normalize(features.double(), dim=-1).sum(0).cpu()
        self._n_ref = features.shape[0]

    def set_reference_images(self, images: ImageInput) -> Tensor:
        """Encode the reference images once; returns their features so a caller can cache them."""
        features = self.encoder.encode_images(images)
        self.set_reference_features(features)
        return features

    def update(self, images: ImageInput | None = None, *, features: Tensor | None = None) -> None:
        """Add generated images (or their features, already encoded by this metric's encoder)."""
        if features is None:
            if images is None:
                raise ValueError("give images or features")
            features = self.encoder.encode_images(images)
        features = F.normalize(features.to(self.gen_sum.device, torch.float64), dim=-1)
        self.gen_sum += features.sum(0)
        self.n_gen += features.shape[0]

    def compute(self) -> Tensor:
        if self._ref_sum is None:
            raise PersonalizeError(f"{type(self).__name__} has no reference images: call set_references() first")
        if self.n_gen == 0:
            raise PersonalizeError(f"{type(self).__name__} got no generated images before compute()")
        value = self.gen_sum @ self._ref_sum.to(self.gen_sum.device) / (self.n_gen * self._n_ref)
        return value.float()

    def settings(self) -> dict[str, Any]:
        return {"impl": f"personalize {type(self).__name__}", **self.encoder.describe()}


class CLIPImageSimilarity(MeanPairwiseCosine):
    """CLIP-I: mean CLIP image-feature cosine between generated and reference images."""


class DINOSimilarity(MeanPairwiseCosine):
    """DINO: mean DINO CLS-feature cosine between generated and reference images."""


class CLIPTextSimilarity(Metric):
    """CLIP-T: mean cosine between each image's CLIP feature and its prompt's, identifier removed.

    Pass the protocol's clean prompts ("a dog in the snow"); raw prompts are cleaned with
    `strip_identifier`, which handles "{identifier} {class}" phrases ("a sks dog" -> "a dog").
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, encoder: ClipEncoder, identifiers: Sequence[str] = DEFAULT_IDENTIFIERS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = encoder
        self.identifiers = tuple(identifiers)
        self.add_state("cos_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: ImageInput | None, prompts: str | Sequence[str], *,
               features: Tensor | None = None) -> None:
        if features is None:
            if images is None:
                raise ValueError("give images or features")
            features = self.encoder.encode_images(images)
        prompts = [prompts] * features.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} images but {len(prompts)} prompts")
        clean = [strip_identifier(p, self.identifiers) for p in prompts]
        unique = list(dict.fromkeys(clean))  # a protocol repeats each prompt per image: encode it once
        text = self.encoder.encode_text(unique)
        text = text[[unique.index(c) for c in clean]].to(self.cos_sum.device, torch.float64)
        image = F.normalize(features.to(self.cos_sum.device, torch.float64), dim=-1)
        self.cos_sum += (image * text).sum()
        self.n += len(clean)

    def compute(self) -> Tensor:
        if self.n == 0:
            raise PersonalizeError(f"{type(self).__name__} got no images before compute()")
        return (self.cos_sum / self.n).float()

    def settings(self) -> dict[str, Any]:
        return {"impl": f"personalize {type(self).__name__}", **self.encoder.describe(),
                "identifiers_removed": list(self.identifiers)}


class ClipScore(CLIPTextSimilarity):
    """CLIP score as in Jindal et al.'s table: 100 * max(mean image-text cosine, 0).

    Same formula as torchmetrics' `CLIPScore` (which clamps the mean, not each pair). We do not use
    that class itself: it only accepts hub ids containing "openai" (or a callable returning model and
    processor), and preprocesses through `CLIPProcessor`, which in transformers 5 needs torchvision or
    falls back to a PIL path. Here the same `ClipEncoder` as CLIP-I/CLIP-T does the work, with torch
    preprocessing; the tests check the two agree on images already at the model's size.
    Identifiers are stripped as for CLIP-T (they mean nothing to a stock CLIP text encoder).
    """

    def compute(self) -> Tensor:
        return 100 * torch.clamp(super().compute(), min=0)


class FeatureExtractor(nn.Module):
    """Wraps an encoder as the `feature=` module of torchmetrics FID: images -> [N, num_features].

    Features are the encoder's unit vectors (as clean-fid does for its CLIP features). Returned on the
    input's device, where the FID update adds them to its states.
    """

    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder  # plain attribute: no frozen weights in the metric's state_dict
        self.num_features = encoder.feature_dim

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.encode_images(images).to(images.device)

    def describe(self) -> dict[str, str]:
        return self.encoder.describe()


class ClipZeroShotLogits(nn.Module):
    """CLIP zero-shot logits over class labels: the classifier Inception Score needs, from CLIP.

    IS is exp(E[KL(p(y|x) || p(y))]) over a classifier's labels; with CLIP and the project's class
    nouns it is bounded by their number (15), so it is comparable only with itself, not with
    Inception IS numbers from papers.
    """

    def __init__(self, encoder: ClipEncoder, labels: Sequence[str] = CLASS_NOUNS,
                 template: str = "a photo of a {}") -> None:
        super().__init__()
        self.encoder = encoder
        self.labels = [template.format(label) for label in labels]
        self._text: Tensor | None = None

    def forward(self, images: Tensor) -> Tensor:
        if self._text is None or self._text.device != self.encoder.device:
            self._text = self.encoder.encode_text(self.labels)
        logits = self.encoder.logit_scale * self.encoder.encode_images(images) @ self._text.T
        return logits.to(images.device)

    def describe(self) -> dict[str, str]:
        described = self.encoder.describe()
        return {**described, "features": f"{described['features']} zero-shot logits over {len(self.labels)} labels"}


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _feature_settings(feature: Any, resize_to: int | None) -> dict[str, Any]:
    """How images become features for FID/IS: the extractor, and the resize applied before it."""
    if isinstance(feature, NoTrainInceptionV3):
        described = {"features": f"inception-v3-compat:{','.join(feature.features_list)}",
                     "extractor": f"torch-fidelity {_version('torch-fidelity')}"}
    elif hasattr(feature, "describe"):
        described = dict(feature.describe())
    else:
        described = {"features": type(feature).__name__}
    if resize_to is not None:
        described["resize"] = f"tf1-bilinear-{resize_to}"
    elif isinstance(feature, NoTrainInceptionV3):
        described["resize"] = f"torchmetrics {torchmetrics.__version__} internal"  # version-dependent: say so
    return described


def _resize_to(feature: Any, resize_to: int | None | str) -> int | None:
    """The size we resize to before the metric sees the images. "auto": 299 for Inception (an int/str
    feature, or torchmetrics' Inception module itself), none for another feature module, which resizes
    itself (our CLIP/DINO extractors do, in their preprocessing)."""
    if resize_to == "auto":
        return INCEPTION_SIZE if isinstance(feature, (int, str, NoTrainInceptionV3)) else None
    if resize_to is not None and (not isinstance(resize_to, int) or isinstance(resize_to, bool) or resize_to < 1):
        raise ValueError(f"FID/IS resize_to must be a positive size, 'auto' or None, got {resize_to!r}")
    return resize_to


class FID(FrechetInceptionDistance):
    """torchmetrics FID that also takes lists / PIL images and float [0,1] images.

    With Inception features every image is resized by us to 299x299 (TF1 bilinear, `inception_input`)
    before torchmetrics sees it, so torchmetrics' own resize (which changed in 1.8) is the identity.
    `resize_to`: "auto" (that, for Inception; none for a feature module), a size, or None.

    Real (reference) features survive `reset()` (reset_real_features=False): set them once per subject
    with `set_real_images`, then evaluate checkpoint after checkpoint.
    """

    def __init__(self, feature: int | nn.Module = 2048, resize_to: int | None | str = "auto", **kwargs: Any) -> None:
        super().__init__(feature=feature, reset_real_features=False, **kwargs)
        self.resize_to = _resize_to(feature, resize_to)

    def update(self, imgs: ImageInput, real: bool) -> None:  # type: ignore[override]
        # uint8 for every extractor: Inception requires it and our encoders accept it.
        for batch in image_batches(imgs, 64):
            batch = to_uint8(batch).to(self.device)
            super().update(inception_input(batch, self.resize_to) if self.resize_to else batch, real)

    def settings(self) -> dict[str, Any]:
        return {"impl": f"torchmetrics {torchmetrics.__version__} FrechetInceptionDistance",
                **_feature_settings(self.inception, self.resize_to)}

    def reset_real(self) -> None:
        self.real_features_sum.zero_()
        self.real_features_cov_sum.zero_()
        self.real_features_num_samples.zero_()

    def set_real_images(self, images: ImageInput) -> None:
        """Replace the real side. Under DDP only rank 0 adds them, so the synced sums count each image once."""
        self.reset_real()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_rank() == 0:
            self.update(images, real=True)


class IS(InceptionScore):
    """torchmetrics Inception Score that also takes lists / PIL images and float [0,1] images.

    Inception inputs are resized by us to 299x299 as for FID (`resize_to` as there).
    """

    def __init__(self, feature: str | int | nn.Module = "logits_unbiased", splits: int = 10,
                 resize_to: int | None | str = "auto", **kwargs: Any) -> None:
        super().__init__(feature=feature, splits=splits, **kwargs)
        self.resize_to = _resize_to(feature, resize_to)

    def update(self, imgs: ImageInput) -> None:  # type: ignore[override]
        for batch in image_batches(imgs, 64):
            batch = to_uint8(batch).to(self.device)
            super().update(inception_input(batch, self.resize_to) if self.resize_to else batch)

    def compute(self) -> tuple[Tensor, Tensor]:
        # torchmetrics shuffles the features into splits with the global RNG: fix it, so the same images
        # give the same score whatever ran before (a resumed evaluation, another checkpoint first).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(IS_SPLIT_SEED)
            return super().compute()

    def settings(self) -> dict[str, Any]:
        return {"impl": f"torchmetrics {torchmetrics.__version__} InceptionScore",
                **_feature_settings(self.inception, self.resize_to), "splits": self.splits,
                "split_seed": IS_SPLIT_SEED}


# ----------------------------------------------------------------------------------------------------
# factory and helpers


def _has_torch_fidelity() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def _require_torch_fidelity(what: str) -> None:
    if not _has_torch_fidelity():
        raise PersonalizeError(f"{what} with the Inception feature extractor needs torch-fidelity: {FIDELITY_HINT}")




# The five entry points below are spans (personalize.instrument): the benchmark's metric share is made of them.
@instrument.timed("metrics.build")
def build_metrics(
    names: Sequence[str],
    clip_model: str | os.PathLike | ClipEncoder | None = "openai/clip-vit-base-patch32",
    dino_model: str | os.PathLike | DinoEncoder | None = "facebook/dino-vits16",
    fid_features: str = "inception",
    device: str | torch.device = "cpu",
    identifiers: Sequence[str] = DEFAULT_IDENTIFIERS,
    is_splits: int = 10,
) -> dict[str, Metric]:
    """name -> Metric for `names` among clip_i, clip_t, dino, clip_score, fid, is.

    clip_model / dino_model: hub id, local folder, or an already loaded encoder (to share across
    subjects). Each is loaded at most once and only when a metric needs it.
    fid_features: "inception" (torchmetrics default, needs torch-fidelity), "clip" or "dino" for FID;
    IS uses Inception or CLIP zero-shot logits ("dino" has no classifier, so IS refuses it).
    """
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise PersonalizeError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    if fid_features not in FID_FEATURES:
        raise PersonalizeError(f"unknown fid_features '{fid_features}'; choose from {list(FID_FEATURES)}")

    encoders: dict[str, ImageEncoder] = {}

    def clip() -> ClipEncoder:
        if "clip" not in encoders:
            if clip_model is None:
                raise PersonalizeError("these metrics need a CLIP model: set the eval CLIP model id or path")
            encoders["clip"] = clip_model.to(device) if isinstance(clip_model, ClipEncoder) \
                else ClipEncoder(clip_model, device=device)
        return encoders["clip"]  # type: ignore[return-value]

    def dino() -> DinoEncoder:
        if "dino" not in encoders:
            if dino_model is None:
                raise PersonalizeError("these metrics need a DINO model: set the eval DINO model id or path")
            encoders["dino"] = dino_model.to(device) if isinstance(dino_model, DinoEncoder) \
                else DinoEncoder(dino_model, device=device)
        return encoders["dino"]  # type: ignore[return-value]

    metrics: dict[str, Metric] = {}
    for name in names:
        if name == "clip_i":
            metrics[name] = CLIPImageSimilarity(clip())
        elif name == "dino":
            metrics[name] = DINOSimilarity(dino())
        elif name == "clip_t":
            metrics[name] = CLIPTextSimilarity(clip(), identifiers)
        elif name == "clip_score":
            metrics[name] = ClipScore(clip(), identifiers)
        elif name == "fid":
            if fid_features == "inception":
                _require_torch_fidelity("FID")
                metrics[name] = FID(2048)
            else:
                metrics[name] = FID(FeatureExtractor(clip() if fid_features == "clip" else dino()))
        elif name == "is":
            if fid_features == "inception":
                _require_torch_fidelity("IS")
                metrics[name] = IS(splits=is_splits)
            elif fid_features == "clip":
                metrics[name] = IS(feature=ClipZeroShotLogits(clip()), splits=is_splits)
            else:
                raise PersonalizeError("IS needs class logits, which DINO has not: set eval.fid_features=clip or inception")
    return {name: metric.to(device) for name, metric in metrics.items()}


@instrument.timed("metrics.references")
def set_references(metrics: Mapping[str, Metric], images: ImageInput) -> None:
    """Give every metric that compares against references the subject's reference images (once per subject)."""
    images = list(images) if not isinstance(images, Tensor) else images  # iterated more than once
    done: dict[int, Tensor] = {}  # encoder id -> features: CLIP-I and a second CLIP metric share one encode
    for metric in metrics.values():
        if isinstance(metric, MeanPairwiseCosine):
            key = id(metric.encoder)
            if key not in done:
                done[key] = metric.encoder.encode_images(images)
            metric.set_reference_features(done[key])
        elif isinstance(metric, FID):
            metric.set_real_images(images)


@instrument.timed("metrics.update")
def update_metrics(metrics: Mapping[str, Metric], images: ImageInput,
                   prompts: str | Sequence[str] | None = None) -> None:
    """Feed one batch of generated images (and their prompts, for CLIP-T / CLIP score) to every metric.

    Each encoder runs once per batch however many metrics share it.
    """
    images = list(images) if not isinstance(images, Tensor) else images
    features: dict[int, Tensor] = {}

    def encode(encoder: ImageEncoder) -> Tensor:
        if id(encoder) not in features:
            features[id(encoder)] = encoder.encode_images(images)
        return features[id(encoder)]

    for name, metric in metrics.items():
        if isinstance(metric, MeanPairwiseCosine):
            metric.update(features=encode(metric.encoder))
        elif isinstance(metric, CLIPTextSimilarity):
            if prompts is None:
                raise PersonalizeError(f"metric '{name}' needs the prompts of the images")
            metric.update(None, prompts, features=encode(metric.encoder))
        elif isinstance(metric, FID):
            metric.update(images, real=False)
        else:
            metric.update(images)


@instrument.timed("metrics.compute")
def compute_metrics(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """name -> float; IS gives "is" (mean over splits) and "is_std"."""
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        value = metric.compute()
        if isinstance(value, tuple):
            out[name], out[f"{name}_std"] = float(value[0]), float(value[1])
        else:
            out[name] = float(value)
    return out


def metric_settings(metrics: Mapping[str, Metric]) -> dict[str, dict[str, Any]]:
    """name -> how that metric was computed (implementation and version, features, resize, ...): what a
    metrics record carries so that its numbers can be compared with others (or told apart)."""
    return {name: metric.settings() for name, metric in metrics.items()}


@instrument.timed("metrics.reset")
def reset_metrics(metrics: Mapping[str, Metric]) -> None:
    """Clear the generated side for the next checkpoint; references and FID real features stay."""
    for metric in metrics.values():
        metric.reset()
