"""What a model family is to the framework: the Backbone interface, its components and conditioning.

A Backbone owns everything that differs between model families (shared/DESIGN.md): which classes its
components are and how they load, how a prompt becomes the denoiser's conditioning, the training
objective (noise, target, loss weighting), the denoiser call, the stock pipeline used for sampling,
class images, evaluation and editing, the default LoRA targets, and which resolutions are valid.
The LightningModule, the Trainables, class images, evaluation and the report only talk to it through
these methods, so adding a family (SDXL: two text encoders, pooled embeddings and time ids; FLUX.1: T5 +
CLIP conditioning, a transformer denoiser, flow matching) is one subclass plus a model config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from personalize.backbones.objectives import LossSettings, NoiseSettings
from personalize.config import CONF_DIR
from personalize.errors import PersonalizeError
from personalize.methods.recipe import method_defaults
from personalize.models import load_pretrained, resolve_pretrained

if TYPE_CHECKING:  # the method's settings import the objectives of this package: types only
    from personalize.methods.settings import MethodSettings


class Conditioning(dict):
    """The denoiser's prompt conditioning: named tensors whose first dimension is the batch.

    SD 1.x/2.x has one (`encoder_hidden_states`); SDXL adds `text_embeds` and `time_ids`; FLUX has
    `encoder_hidden_states`, `pooled_projections` and `txt_ids`. The module only batches them.
    """

    def expand(self, rows: int) -> Conditioning:
        return Conditioning({k: v.expand(rows, *v.shape[1:]) for k, v in self.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        return Conditioning({k: torch.cat([p[k] for p in parts]) for k in parts[0]})

    def to(self, dtype: torch.dtype) -> Conditioning:
        return Conditioning({k: v.to(dtype) if v.is_floating_point() else v for k, v in self.items()})

    def __or__(self, other: dict) -> Conditioning:
        """Both sets of tensors (the prompt's and the image's), still a Conditioning."""
        return Conditioning({**self, **other})

    @property
    def rows(self) -> int:
        return len(next(iter(self.values())))


@dataclass(frozen=True)
class ImageInfo:
    """Where one training image came from, in pixels, (height, width) and (top, left) as SDXL's
    micro-conditioning reads them: the photo's size before any resize, and the top-left corner of the
    training square in the photo resized to the training resolution (personalize.data.crop_top_left)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)


@dataclass
class Components:
    """A model's loaded parts. `unet` is the denoiser (a transformer for flow models); `extra` holds what
    only some families have (SDXL's second tokenizer and text encoder); `folders` names the pipeline folder
    (and LoRA-file part) of a component whose pipeline calls it otherwise (FLUX: unet -> transformer)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any  # the training scheduler, configured like the model's own
    extra: dict[str, Any] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)
    # a new token's vectors in a textual-inversion file, one key per text encoder in text_encoders() order, as
    # the family's stock pipelines are given them (SDXL: clip_l, clip_g; FLUX: clip_l, t5); None: one encoder,
    # the classic {token: vectors} file of SD 1.x/2.x
    embedding_keys: ClassVar[tuple[str, ...] | None] = None
    # the text encoders `text_encoder_lora` adapts, as the family's LoRA script's --train_text_encoder does (SDXL:
    # both CLIPs; FLUX: CLIP, not T5)
    lora_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def part(self, name: str) -> Any:
        """A component by its name: one of the fields, or one of `extra`'s (text_encoder_2)."""
        return getattr(self, name) if name in self.__dataclass_fields__ else self.extra[name]

    def folder(self, name: str) -> str:
        """The stock pipeline's name of component `name`: its folder, and its part of a LoRA file."""
        return self.folders.get(name, name)

    def text_encoders(self) -> list[tuple[Any, torch.nn.Module]]:
        """(tokenizer, text encoder) pairs: where a new token must be added; a family with a second encoder
        (SDXL's OpenCLIP, FLUX's T5) keeps it in `extra` as `tokenizer_2` / `text_encoder_2`."""
        pairs = [(self.tokenizer, self.text_encoder)]
        if "text_encoder_2" in self.extra:
            pairs.append((self.extra["tokenizer_2"], self.extra["text_encoder_2"]))
        return pairs


class Backbone:
    """One model family (see the module docstring). Instances carry the model config."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # the stock diffusers pipeline that samples it
    default_lora_targets: ClassVar[tuple[str, ...]]  # denoiser modules LoRA adapts when method.lora.target_modules is null
    supports_editing: ClassVar[bool] = False  # prompt-to-prompt's attention control knows its attention layers
    supported_trainables: ClassVar[tuple[str, ...] | None] = None  # what a stage may train on it; None: every Trainable
    # the pipeline repository's folders a run reads (personalize-download fetches these and nothing else): each
    # network's folder -> the stem of its weight files, and the tokenizer folders
    networks: ClassVar[dict[str, str]]
    tokenizers: ClassVar[tuple[str, ...]]
    tokenizer_2_class: ClassVar[str] = "CLIPTokenizer"  # the transformers class of `tokenizer_2`, where it has one
    folders: ClassVar[dict[str, str]] = {}  # Components name -> the pipeline's, where they differ (Components.folders)
    components_class: ClassVar[type[Components]] = Components  # what load_components returns (its ClassVars)

    def __init__(self, model_cfg):
        self.model_cfg = model_cfg

    # -- loading
    def check_model(self, method: MethodSettings | None = None) -> None:
        """The model exists and suits the settings (resolution, prediction type, the method's objective
        options), from its config files alone: called before anything is written. Raises one
        PersonalizeError line."""
        raise NotImplementedError

    def check_trainables(self, method: MethodSettings) -> None:
        """Every stage trains only what this family supports (`supported_trainables`); else one line naming
        the methods of conf/method that do apply. Settings only: called before the model is looked at."""
        if self.supported_trainables is None:
            return
        supported = set(self.supported_trainables)
        for stage in method.stages:
            refused = [t for t in stage.train if t not in supported]
            if refused:
                applicable = ", ".join(methods_training_only(supported)) or "none"
                raise PersonalizeError(
                    f"method.stages.{stage.name}.train={list(stage.train)}: the {self.name} backbone "
                    f"(model.backbone={self.name}) cannot train {', '.join(refused)}: it trains "
                    f"{', '.join(self.supported_trainables)}; the methods that apply to it are {applicable}")

    def load_components(self, dtypes: dict[str, torch.dtype] | None = None) -> Components:
        raise NotImplementedError

    def load_tokenizers(self) -> dict[str, Any]:
        """Its tokenizers by folder name (`tokenizers`), in Components.text_encoders() order: a new token is
        checked against each before the model is loaded. Every family here has CLIP's first; a second one is
        the CLIPTokenizer of SDXL's OpenCLIP or FLUX's T5 (`tokenizer_2_class`)."""
        import transformers  # lazily: a config check that adds no token never pays for its import

        source = resolve_pretrained(self.model_cfg)
        classes = {"tokenizer": "CLIPTokenizer", "tokenizer_2": self.tokenizer_2_class}
        return {name: load_pretrained(getattr(transformers, classes[name]), source, name, self.model_cfg)
                for name in self.tokenizers}

    def load_pipeline(self, dtype: torch.dtype = torch.float32, **components):
        """The stock pipeline of the base model; `components` replace loaded ones (e.g. unet=)."""
        raise NotImplementedError

    def fill_method_defaults(self, method_cfg) -> None:
        """Write into the method's config what it leaves to the model family, so the run's config.yaml, its
        settings and its resume checks all hold what trains: `method.lora.target_modules: null` becomes
        `default_lora_targets` (diffusers' scripts differ per family: FLUX adapts both attention streams and
        the feed-forwards, SD and SDXL the attention projections)."""
        lora = method_cfg.get("lora")
        if lora is not None and lora.get("target_modules") is None:
            lora.target_modules = list(self.default_lora_targets)

    # -- training
    def objective(self, components: Components, noise: NoiseSettings = NoiseSettings(),
                  loss: LossSettings = LossSettings()):
        raise NotImplementedError

    def latent_distribution(self, vae, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training latents' distribution from the VAE's (mean, std): SD's latents are z * scaling_factor
        (FLUX shifts them first)."""
        scale = vae.config.scaling_factor
        return mean * scale, std * scale

    def encode_prompt(self, components: Components, prompts: list[str], device) -> Conditioning:
        raise NotImplementedError

    def image_conditioning(self, images: list[ImageInfo], device) -> Conditioning:
        """What the denoiser is told about each row's training image (its size and crop), merged into the
        prompt's conditioning; nothing by default (SD 1.x/2.x see only the pixels)."""
        return Conditioning()

    def denoise(self, components: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's prediction for noised latents, in float32."""
        raise NotImplementedError

    # -- editing (personalize.edit). Prompt-to-prompt and null-text inversion run a DDIM loop of their own on the
    #    stock pipeline's UNet (a joint [source, target] batch, per-step unconditional rows): they need, row by
    #    row, the conditioning that the pipeline's __call__ would build. Families with `supports_editing` implement
    #    these.
    def edit_tokenizers(self, pipe) -> list[Any]:
        """The pipeline's tokenizers whose token sequences make up the cross-attention keys. Prompt-to-prompt maps
        the first one's token positions; every other one must tokenize a prompt to the same positions."""
        raise NotImplementedError

    def edit_conditioning(self, pipe, prompts: list[str], height: int, width: int) -> Conditioning:
        """One row per prompt, as the stock pipeline conditions a `height` x `width` sample on it (its own prompt
        encoding, so textual-inversion tokens and LoRA text encoders apply)."""
        raise NotImplementedError

    def edit_unconditional(self, pipe, height: int, width: int) -> Conditioning:
        """One row: classifier-free guidance's unconditional conditioning of a `height` x `width` sample, as the
        stock pipeline builds it when no negative prompt is given."""
        raise NotImplementedError

    def null_text_keys(self) -> tuple[str, ...]:
        """The tensors of the unconditional conditioning that null-text inversion optimises: the text's (the
        per-token embeddings); what describes the image (a size) stays as the sample has it."""
        return ("encoder_hidden_states",)

    def denoiser_kwargs(self, conditioning: Conditioning) -> dict[str, Any]:
        """The keyword arguments of the pipeline's denoiser call for a Conditioning (latents and timestep aside)."""
        raise NotImplementedError


def methods_training_only(trainables: set[str]) -> list[str]:
    """The methods of conf/method whose every stage trains only `trainables`, as their files define them."""
    names = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml") if not p.stem.startswith("_"))
    trained = {name: [set(map(str, stage.get("train") or ()))
                      for stage in (method_defaults(name).get("stages") or {}).values()] for name in names}
    return [name for name in names if trained[name] and all(t and t <= trainables for t in trained[name])]
