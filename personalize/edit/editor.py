"""Edit a generated image or a real photo with prompt-to-prompt, e.g. to put a learned subject in it.

    result = edit_image(pipe, "a photo of a dog on the beach", "a photo of <rare> dog on the beach",
                        image=Image.open("beach.jpg"), blend_words=["dog", "<rare>"])
    save_side_by_side(result, "edit.png")

A photo is inverted with null-text inversion under the source prompt, then source and target are
sampled jointly from the inverted noise, the source branch's attention injected into the target's.
Settings are one flat dataclass (`EditSettings`) so a Hydra config group can fill it field for field.

One code path for every backbone with `supports_editing` (SD 1.x/2.x, SDXL): the pipeline's Backbone
supplies its conditioning (SDXL: the pooled embeddings and the time ids of the sampling size, for the
source, the target and the unconditional rows alike), its UNet call and its tokenizers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from personalize.backbones import Backbone
from personalize.edit.attention import (
    AttentionStore, EditController, LocalBlend, PromptTokens, Refine, Replace, Reweight, Window,
    prompt_tokens, shared_prompt_tokens, word_weights,
)
from personalize.edit.inversion import (
    Denoiser, NullTextInversion, ddim_sample, decode_latents, encode_image, encode_text, make_scheduler,
    native_size, null_text_inversion, pipeline_backbone, pipeline_tokenizers, preprocess, unconditional,
)

MODES = ("auto", "replace", "refine", "none")


@dataclass
class EditSettings:
    """How to edit. Fractions of the sampling steps for the windows; see attention.py for the controllers."""

    mode: str = "auto"  # auto: replace when the prompts have equally many words, else refine; none: no injection
    cross_steps: Window = 0.8  # inject the source's cross-attention during these steps
    self_steps: Window = 0.4  # inject the source's self-attention during these steps ...
    self_min_downsample: int = 4  # ... at layers this much coarser than the latent (16x16 at 64x64 latents)
    reweight: dict[str, float] | None = None  # {"word": factor} on the target prompt's words
    blend_words: list[str] | None = None  # local blend: edit only where these words attend (either prompt)
    blend_threshold: float = 0.3
    blend_start: float = 0.2  # fraction of the steps before the local blend starts
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None  # default: the UNet's native resolution
    width: int | None = None
    null_text_inner_steps: int = 10
    null_text_lr: float = 1e-2
    null_text_early_stop: float = 1e-5
    store_self: bool = False  # also record self-attention maps (large at full resolution)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


@dataclass
class EditResult:
    source: Image.Image  # the photo (cropped/resized as edited) or the generated source image
    reconstruction: Image.Image  # the source branch of the edit run: for a photo, its null-text reconstruction
    edited: Image.Image
    source_prompt: str
    target_prompt: str
    latents: torch.Tensor  # final [source, edited] latents
    attention: AttentionStore  # the controller, with the averaged cross-attention maps of both prompts
    blend_mask: torch.Tensor | None = None  # last local-blend mask, [2, 1, h, w] at latent resolution
    inversion: NullTextInversion | None = None
    settings: EditSettings = field(default_factory=EditSettings)


def _tokens(tokenizer, prompt: str, convert: Callable[[str], str] | None) -> PromptTokens:
    if isinstance(tokenizer, (list, tuple)):
        return shared_prompt_tokens(tokenizer, prompt)
    return prompt_tokens(tokenizer, prompt, convert)


def build_controller(tokenizer, source_prompt: str, target_prompt: str, settings: EditSettings,
                     convert: Callable[[str], str] | None = None) -> EditController:
    """The prompt-to-prompt controller that `settings` describe, for a [source, target] batch.

    `tokenizer` is one tokenizer (with `convert`), or the (tokenizer, convert) pairs of every tokenizer whose
    sequences make up the attention keys (`pipeline_tokenizers(pipe)`: both of SDXL's), checked to agree.
    """
    src = _tokens(tokenizer, source_prompt, convert)
    tgt = _tokens(tokenizer, target_prompt, convert)
    blend = None
    if settings.blend_words:
        blend = LocalBlend.from_words([src, tgt], list(settings.blend_words), settings.blend_threshold,
                                      settings.blend_start)
    common: dict[str, Any] = dict(cross_steps=settings.cross_steps, self_steps=settings.self_steps,
                                  self_min_downsample=settings.self_min_downsample, local_blend=blend,
                                  store_self=settings.store_self)
    mode = settings.mode
    if mode == "auto":
        mode = "replace" if len(src.words) == len(tgt.words) else "refine"
    if mode == "none":
        return EditController(**{**common, "cross_steps": 0.0, "self_steps": 0.0})
    base: EditController = (Replace if mode == "replace" else Refine)(src, [tgt], **common)
    if settings.reweight:
        # Same prompt: reweight the source's maps directly. Different prompts: map first, then reweight.
        weights = word_weights(tgt, dict(settings.reweight))
        return Reweight(weights, base=None if src.ids == tgt.ids else base, **common)
    return base


def _resolution(pipe, settings: EditSettings) -> tuple[int, int]:
    native_h, native_w = native_size(pipe)
    height, width = settings.height or native_h, settings.width or native_w
    factor = int(pipe.vae_scale_factor)
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    return height, width


def editing_backbone(pipe, backbone: Backbone | None = None) -> Backbone:
    """`backbone`, else the pipeline's; one that cannot be edited (FLUX.1: docs/editing.md) is a ValueError."""
    backbone = backbone or pipeline_backbone(pipe)
    if not backbone.supports_editing:
        raise ValueError(f"prompt-to-prompt editing does not support the {backbone.name} backbone "
                         f"({type(pipe).__name__}): docs/editing.md says why")
    return backbone


def invert_image(pipe, image: Image.Image, prompt: str, settings: EditSettings | None = None,
                 backbone: Backbone | None = None, **overrides: Any) -> NullTextInversion:
    """Null-text inversion of a photo under `prompt` (`.image` holds the photo as it was encoded).

    Do this once and pass the result to `edit_image(inversion=...)` to try several target prompts.
    """
    settings = dataclasses.replace(settings or EditSettings(), **overrides)
    backbone = editing_backbone(pipe, backbone)
    height, width = _resolution(pipe, settings)
    scheduler = make_scheduler(pipe.scheduler.config, settings.num_inference_steps)
    z0 = encode_image(pipe, image, height, width)
    cond = encode_text(pipe, [prompt], height, width, backbone)
    uncond = unconditional(pipe, height, width, backbone)
    inversion = null_text_inversion(
        Denoiser(pipe.unet, backbone), scheduler, z0, cond, uncond, settings.guidance_scale,
        settings.null_text_inner_steps, settings.null_text_lr, settings.null_text_early_stop,
    )
    inversion.prompt = prompt
    shown = preprocess(image, height, width)[0].permute(1, 2, 0)
    inversion.image = Image.fromarray(((shown + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    return inversion


def edit_image(pipe, source_prompt: str, target_prompt: str, image: Image.Image | None = None, seed: int = 0,
               settings: EditSettings | None = None,
               inversion: NullTextInversion | None = None, backbone: Backbone | None = None,
               **overrides: Any) -> EditResult:
    """Edit a real photo (`image`, or a precomputed `inversion` from `invert_image`) or, with neither,
    an image generated from `seed`, from `source_prompt` to `target_prompt`.

    Any `EditSettings` field may be given as a keyword (`num_inference_steps=20, blend_words=["dog"]`).
    Works with any StableDiffusionPipeline or StableDiffusionXLPipeline, including one with textual-inversion
    tokens loaded; `backbone` defaults to the pipeline's. With `mode="none"` and equal prompts both rows are
    the stock pipeline's DDIM sample from the same noise (its default size conditioning and unconditional row).
    """
    settings = dataclasses.replace(settings or EditSettings(), **overrides)
    backbone = editing_backbone(pipe, backbone)
    if image is not None and inversion is None:
        inversion = invert_image(pipe, image, source_prompt, settings, backbone)
    scheduler = make_scheduler(pipe.scheduler.config, settings.num_inference_steps)
    factor = int(pipe.vae_scale_factor)
    if inversion is not None:
        fitted = (inversion.num_inference_steps, inversion.guidance_scale)
        if fitted != (settings.num_inference_steps, settings.guidance_scale):
            raise ValueError(f"the inversion was fitted for num_inference_steps={fitted[0]}, "
                             f"guidance_scale={fitted[1]}; edit with the same")
        # the size the photo was inverted at: SDXL's time ids of the prompts must be the unconditional rows'
        height, width = (side * factor for side in inversion.latent.shape[-2:])
        start, uncond = inversion.latent, inversion.uncond
    else:
        height, width = _resolution(pipe, settings)
        shape = (1, int(pipe.unet.config.in_channels), height // factor, width // factor)
        generator = torch.Generator("cpu").manual_seed(seed)
        start = torch.randn(shape, generator=generator).to(pipe.device) * scheduler.init_noise_sigma
        uncond = unconditional(pipe, height, width, backbone)
    cond = encode_text(pipe, [source_prompt, target_prompt], height, width, backbone)
    controller = build_controller(pipeline_tokenizers(pipe, backbone), source_prompt, target_prompt, settings)
    latents = ddim_sample(Denoiser(pipe.unet, backbone), scheduler, start.expand(2, -1, -1, -1).clone(), cond,
                          uncond, settings.guidance_scale, controller)
    reconstruction, edited = decode_latents(pipe, latents)
    return EditResult(
        source=inversion.image if inversion is not None and inversion.image else reconstruction,
        reconstruction=reconstruction, edited=edited,
        source_prompt=source_prompt, target_prompt=target_prompt, latents=latents, attention=controller,
        blend_mask=controller.local_blend.last_mask if controller.local_blend else None,
        inversion=inversion, settings=settings,
    )


# --------------------------------------------------------------------------------------------------
# Pictures


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _captioned(tiles: Sequence[tuple[Image.Image, str]], min_side: int = 256) -> Image.Image:
    """Tiles side by side, each upscaled to at least `min_side` (tiny-model images are 64 px), caption below."""
    scaled = []
    for im, caption in tiles:
        scale = max(1, -(-min_side // min(im.size)))
        scaled.append((im.convert("RGB").resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST),
                       caption))
    font_size = max(10, min(im.width for im, _ in scaled) // 16)
    font = _font(font_size)
    pad = font_size + 8
    width = sum(im.width for im, _ in scaled)
    height = max(im.height for im, _ in scaled) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, caption in scaled:
        canvas.paste(im, (x, 0))
        text = caption
        while len(text) > 1 and draw.textlength(text, font=font) > im.width - 4:
            text = text[:-2] + "…"
        draw.text((x + 2, im.height + 4), text, fill="black", font=font)
        x += im.width
    return canvas


def save_side_by_side(result: EditResult, path: str | os.PathLike) -> Image.Image:
    """[source | reconstruction (photos only) | edited] with captions, saved as PNG."""
    tiles = [(result.source, f"source: {result.source_prompt}")]
    if result.inversion is not None:
        tiles.append((result.reconstruction, "null-text reconstruction"))
    tiles.append((result.edited, f"edited: {result.target_prompt}"))
    canvas = _captioned(tiles)
    canvas.save(path)
    return canvas


def word_attention_maps(store: AttentionStore, tokens: PromptTokens, prompt_index: int = 0,
                        size: tuple[int, int] | None = None) -> list[tuple[str, torch.Tensor]]:
    """(word, [h, w] map) per word: the cross-attention summed over the word's tokens, min-max scaled to
    [0, 1] per word (where the word attends, not how much: that is what one tile per word can show)."""
    maps = store.cross_maps(prompt_index, size)
    out = []
    for word, span in zip(tokens.words, tokens.spans):
        heat = maps[..., list(span)].sum(-1) if span else torch.zeros(maps.shape[:2])
        heat = heat - heat.min()
        out.append((word, heat / heat.max().clamp_min(1e-12)))
    return out


def _heat_to_rgb(heat: torch.Tensor) -> Image.Image:
    """A 'hot' colour map (black -> red -> yellow -> white), no matplotlib needed."""
    h = heat.float().clamp(0, 1)
    rgb = torch.stack([(3 * h).clamp(0, 1), (3 * h - 1).clamp(0, 1), (3 * h - 2).clamp(0, 1)], -1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).cpu().numpy())


def save_attention_maps(store: AttentionStore, tokenizer, prompt: str, path: str | os.PathLike,
                        prompt_index: int = 0, image: Image.Image | None = None,
                        convert: Callable[[str], str] | None = None, tile: int = 128) -> Image.Image:
    """One tile per word of `prompt` (row `prompt_index` of the sampled batch), optionally over `image`."""
    tokens = prompt_tokens(tokenizer, prompt, convert)
    tiles = []
    for word, heat in word_attention_maps(store, tokens, prompt_index):
        size = (max(1, round(tile * heat.shape[1] / heat.shape[0])), tile)  # keep the map's aspect ratio
        picture = _heat_to_rgb(heat).resize(size, Image.Resampling.BILINEAR)
        if image is not None:
            picture = Image.blend(image.convert("RGB").resize(size), picture, 0.6)
        tiles.append((picture, word))
    canvas = _captioned(tiles, min_side=tile)
    canvas.save(path)
    return canvas
