"""What a stage can train: one class per kind of thing, owning everything about it.

A Trainable knows how its parameters come to be (a new token row, adapters, processors, or a whole
component's own weights), whether the prompt must be encoded with gradients while it trains, which
components it trains in place (those load in fp32 so the optimizer keeps fp32 master weights), how it
turns gradient checkpointing on, how it saves itself in the stock diffusers format and loads back into a
stock pipeline, and which settings its saved tensors depend on (a resume under other settings is
refused). Nothing outside this module knows a Trainable's name: a stage's `train: [token, unet]` is
looked up in `TRAINABLES`, and every other part of the framework asks the instances.

Adding a method that needs a new kind of trainable parameter is one class here plus a method YAML.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from personalize.rundir import CONFIG_FILE, CUSTOM_DIFFUSION_FILE, EMBEDS_FILE, LORA_FILE, load_run_config
from personalize.errors import PersonalizeError
from personalize.methods.token import NewTokenEmbedding, add_placeholder_token, expand_placeholder, token_names

log = logging.getLogger(__name__)

TRAINABLES: dict[str, type[Trainable]] = {}  # name -> class, in load order (a token before the UNet's adapters)


def register(cls: type[Trainable]) -> type[Trainable]:
    TRAINABLES[cls.name] = cls
    return cls


class Trainable:
    """One kind of trainable parameters on a model's components (see the module docstring)."""

    name: ClassVar[str]
    encodes_prompt: ClassVar[bool] = False  # True: while it trains, prompts are encoded with gradients every step
    trains_in_place: ClassVar[tuple[str, ...]] = ()  # components whose own weights it trains (kept in fp32)
    saved_untrained: ClassVar[bool] = False  # True: every checkpoint holds it, also before its stage begins

    def __init__(self, components: Any, method_cfg: Any, identifier: str):
        self.components = components
        self.method_cfg = method_cfg
        self.identifier = identifier

    @classmethod
    def attached(cls, method_cfg: Any, trained: set[str]) -> bool:
        """Whether a run with this method carries it (by default: when some stage trains it)."""
        return cls.name in trained

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @classmethod
    def owns(cls, param_name: str) -> bool:
        """Whether a component parameter (by its name in that component) is one of this kind's own."""
        return False

    def enable_gradient_checkpointing(self) -> None:
        pass

    def prompt_for_encoder(self, prompt: str) -> str:
        """How a training prompt must read for the text encoder while this is attached (a multi-vector
        token spells out its tokens); the stock pipeline rewrites its prompts the same way."""
        return prompt

    def save(self, folder: Path) -> str:
        """Write the trained state in diffusers' format into `folder`; the file or folder name written."""
        raise NotImplementedError

    @classmethod
    def load_into(cls, pipe, ckpt_dir: Path) -> None:
        """Apply what a checkpoint holds of this kind to a stock pipeline (no-op when it holds none).

        Called for every checkpoint in turn on one pipeline (evaluation), so it replaces what an earlier
        checkpoint loaded."""
        raise NotImplementedError

    @classmethod
    def structure(cls, method: dict) -> Any:
        """The settings its saved tensors depend on (their shapes, their meaning)."""
        return None


@register
class TextEncoder(Trainable):
    """The whole text encoder."""

    name = "text_encoder"
    encodes_prompt = True
    trains_in_place = ("text_encoder",)

    def parameters(self):
        return list(self.components.text_encoder.parameters())

    def enable_gradient_checkpointing(self):
        self.components.text_encoder.gradient_checkpointing_enable()

    def save(self, folder):
        text_encoder = self.components.text_encoder
        wrapped = text_encoder.get_input_embeddings()
        if isinstance(wrapped, NewTokenEmbedding):  # the stock class has a plain embedding table
            text_encoder.set_input_embeddings(wrapped.merged())
        try:
            text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        finally:
            text_encoder.set_input_embeddings(wrapped)
        return "text_encoder"

    @classmethod
    def load_into(cls, pipe, ckpt_dir):
        from transformers import CLIPTextModel

        _replace_component(pipe, ckpt_dir, "text_encoder", CLIPTextModel)


@register
class Token(Trainable):
    """A new placeholder token's embedding rows (their own fp32 parameter; every other row stays bit-identical).

    `method.new_token.num_vectors: n` (default 1) makes it n tokens, `<id>`, `<id>_1` ... `<id>_{n-1}`
    (stock diffusers' names for the rows of an [n, dim] embedding), each initialised from the initializer
    word and all trained; prompts name `<id>` alone and reach the text encoder spelled out as the n tokens.
    Saved as `{<id>: tensor[dim]}` for one vector and `{<id>: tensor[n, dim]}` for several, which stock
    `load_textual_inversion` loads as the same n tokens."""

    name = "token"
    encodes_prompt = True
    saved_untrained = True  # prompts name the placeholder: a checkpoint without it could not be sampled

    def __init__(self, components, method_cfg, identifier):
        super().__init__(components, method_cfg, identifier)
        self.num_vectors = self.vectors(method_cfg)
        self.embedding = add_placeholder_token(components.tokenizer, components.text_encoder, identifier,
                                               str(method_cfg.new_token.initializer), self.num_vectors)
        self.embedding.base.requires_grad_(False)

    @staticmethod
    def vectors(method_cfg) -> int:
        """method.new_token.num_vectors (1 where the method sets no new token or no count)."""
        return int((method_cfg.get("new_token") or {}).get("num_vectors", 1) or 1)

    @classmethod
    def attached(cls, method_cfg, trained):
        if cls.name in trained and not method_cfg.get("new_token"):
            raise PersonalizeError("a stage trains 'token' but method.new_token is not set: give the placeholder's initializer")
        return bool(method_cfg.get("new_token"))  # a token trained in stage 1 is still there in stage 2

    def parameters(self):
        return [self.embedding.new_rows]

    @classmethod
    def owns(cls, param_name):
        return param_name.endswith("new_rows")

    def prompt_for_encoder(self, prompt):
        return expand_placeholder(prompt, self.identifier, self.num_vectors)

    def enable_gradient_checkpointing(self):
        self.components.text_encoder.gradient_checkpointing_enable()

    def save(self, folder):
        from safetensors.torch import save_file

        rows = self.embedding.new_rows.detach().float().cpu()
        saved = rows[0] if self.num_vectors == 1 else rows  # one vector: [dim], as textual inversion has always saved it
        save_file({self.identifier: saved.contiguous()}, folder / EMBEDS_FILE)
        return EMBEDS_FILE

    @classmethod
    def load_into(cls, pipe, ckpt_dir):
        from safetensors.torch import load_file

        if not (ckpt_dir / EMBEDS_FILE).exists():
            return
        embeds = load_file(ckpt_dir / EMBEDS_FILE)
        vocab = pipe.tokenizer.get_vocab()
        if not any(token in vocab for token in embeds):
            pipe.load_textual_inversion(str(ckpt_dir), weight_name=EMBEDS_FILE)  # the stock path
        else:  # a later checkpoint of the same run: the tokens exist, so only their rows change
            table = pipe.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                for token, vectors in embeds.items():
                    rows = vectors.reshape(-1, vectors.shape[-1])
                    for name, row in zip(token_names(token, len(rows)), rows):
                        table[vocab[name]] = row.to(table.dtype)


@register
class Unet(Trainable):
    """The denoiser's own weights (not the adapters or processors other trainables put on it)."""

    name = "unet"
    trains_in_place = ("unet",)

    def parameters(self):
        return [p for n, p in self.components.unet.named_parameters() if not _claimed_on_unet(n)]

    def enable_gradient_checkpointing(self):
        self.components.unet.enable_gradient_checkpointing()

    def save(self, folder):
        self.components.unet.save_pretrained(folder / "unet", safe_serialization=True)
        return "unet"

    @classmethod
    def load_into(cls, pipe, ckpt_dir):
        from diffusers import UNet2DConditionModel

        _replace_component(pipe, ckpt_dir, "unet", UNet2DConditionModel)


@register
class Lora(Trainable):
    """PEFT LoRA adapters on the UNet (method.lora: rank, alpha, dropout, target modules)."""

    name = "lora"
    ADAPTER = "default"  # the one PEFT adapter on the UNet; its config is saved with the weights

    def __init__(self, components, method_cfg, identifier):
        super().__init__(components, method_cfg, identifier)
        from peft import LoraConfig

        cfg = method_cfg.lora
        unet = components.unet
        unet.add_adapter(LoraConfig(
            r=int(cfg.rank), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.get("dropout", 0.0)),
            init_lora_weights="gaussian", target_modules=list(cfg.target_modules),
        ), adapter_name=self.ADAPTER)
        for name, param in unet.named_parameters():
            if self.owns(name):
                param.data = param.data.float()  # LoRA weights train in fp32 even on a bf16 base

    def parameters(self):
        return [p for n, p in self.components.unet.named_parameters() if self.owns(n)]

    @classmethod
    def owns(cls, param_name):
        return "lora_" in param_name

    def enable_gradient_checkpointing(self):
        self.components.unet.enable_gradient_checkpointing()

    def save(self, folder):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = self.components.unet
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=self.ADAPTER))
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        # The adapter's LoraConfig goes into the file's header (`lora_adapter_metadata`), which
        # load_lora_weights reads back: without it the loader assumes alpha = rank, another model.
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, unet_lora_adapter_metadata=unet.peft_config[self.ADAPTER].to_dict(),
            safe_serialization=True,
        )
        return LORA_FILE

    @classmethod
    def load_into(cls, pipe, ckpt_dir):
        if getattr(pipe, "_personalize_lora", False):  # an earlier checkpoint's adapters
            pipe.unload_lora_weights()
            pipe._personalize_lora = False
        if (ckpt_dir / LORA_FILE).exists():
            cls.warn_if_scale_unknown(ckpt_dir)
            pipe.load_lora_weights(str(ckpt_dir), weight_name=LORA_FILE)  # rank and alpha from the file's metadata
            pipe._personalize_lora = True

    @staticmethod
    def warn_if_scale_unknown(ckpt_dir: Path) -> None:
        """A LoRA file without adapter metadata (written before alpha was saved) loads with alpha = rank; say so
        unless the run's config shows that is what trained, so an old checkpoint of an alpha != rank run is not
        silently evaluated as another model."""
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
        from safetensors import safe_open

        with safe_open(ckpt_dir / LORA_FILE, "pt") as f:
            if LORA_ADAPTER_METADATA_KEY in (f.metadata() or {}):
                return
        run_dir = ckpt_dir.parent.parent  # <run>/checkpoints/step-NNNNNN
        lora = load_run_config(run_dir).method.get("lora") if (run_dir / CONFIG_FILE).exists() else None
        if lora is not None and float(lora.alpha) == float(lora.rank):
            return
        if lora is not None:
            why = f"its run trained method.lora.alpha={lora.alpha} with rank={lora.rank}: this is not the trained model"
        else:
            why = f"no {CONFIG_FILE} beside it tells the trained alpha: the model is the trained one only if alpha was = rank"
        log.warning("%s has no LoRA adapter metadata (written before alpha was saved), so it loads with alpha = rank; %s",
                    ckpt_dir / LORA_FILE, why)

    @classmethod
    def structure(cls, method):
        return method.get("lora")


@register
class CustomDiffusion(Trainable):
    """Custom Diffusion (Kumari et al., CVPR 2023): new key/value projections of every cross-attention.

    Trained as diffusers' recipe does: each cross-attention gets a `CustomDiffusionAttnProcessor2_0`
    whose `to_k_custom_diffusion`/`to_v_custom_diffusion` start as copies of the layer's `to_k`/`to_v`
    (the layer's own weights are never written); the processor detaches the first (start) token's key
    and value, as the paper does. Self-attention keeps its projections (a processor that trains nothing).
    Saved with `unet.save_attn_procs` as `pytorch_custom_diffusion_weights.safetensors` (diffusers' keys:
    `<layer>.processor.to_k_custom_diffusion.weight`). Loading builds the same processors from those
    weights with diffusers' public classes: stock `unet.load_attn_procs(dir, weight_name=...)` of diffusers
    0.42 reads the file but sets the processors only when given its private `_pipeline` argument, and then
    refuses a safetensors file, which cannot hold the empty entries of the self-attention layers (upstream
    issue #9320); the unet is left unchanged without an error.
    """

    name = "custom_diffusion"

    def __init__(self, components, method_cfg, identifier):
        super().__init__(components, method_cfg, identifier)
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

        unet = components.unet
        modules = dict(unet.named_modules())
        processors = {}
        for name in unet.attn_processors:
            layer = modules[name.removesuffix(".processor")]
            if name.endswith("attn2.processor"):  # cross-attention: the text features' keys and values train
                processor = CustomDiffusionAttnProcessor2_0(
                    train_kv=True, train_q_out=False, hidden_size=layer.to_k.out_features,
                    cross_attention_dim=layer.to_k.in_features,
                ).to(unet.device)
                with torch.no_grad():
                    processor.to_k_custom_diffusion.weight.copy_(layer.to_k.weight)
                    processor.to_v_custom_diffusion.weight.copy_(layer.to_v.weight)
            else:
                processor = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
            processors[name] = processor
        unet.set_attn_processor(processors)

    def parameters(self):
        return [p for n, p in self.components.unet.named_parameters() if self.owns(n)]

    @classmethod
    def owns(cls, param_name):
        return "custom_diffusion" in param_name

    def enable_gradient_checkpointing(self):
        self.components.unet.enable_gradient_checkpointing()

    def save(self, folder):
        self.components.unet.save_attn_procs(folder, weight_name=CUSTOM_DIFFUSION_FILE, safe_serialization=True)
        return CUSTOM_DIFFUSION_FILE

    @classmethod
    def load_into(cls, pipe, ckpt_dir):
        if (ckpt_dir / CUSTOM_DIFFUSION_FILE).exists():  # replaces an earlier checkpoint's processors
            pipe.unet.set_attn_processor(cls.processors_from_file(pipe.unet, ckpt_dir / CUSTOM_DIFFUSION_FILE))

    @staticmethod
    def processors_from_file(unet, path: Path) -> dict:
        """Every attention processor of `unet`, the cross-attentions' replaced by the file's trained ones."""
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
        from safetensors.torch import load_file

        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in load_file(path).items():  # <layer>.processor.to_k_custom_diffusion.weight
            layer, _, param = key.rpartition(".processor.")
            grouped.setdefault(f"{layer}.processor", {})[param] = value
        processors = dict(unet.attn_processors)
        for name, weights in grouped.items():
            if name not in processors:
                raise PersonalizeError(f"{path} has Custom Diffusion weights for '{name}', which this UNet does not have: "
                                       "load it on the base model it was trained on (checkpoint.json names it)")
            k = weights["to_k_custom_diffusion.weight"]
            processor = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=k.shape[0],
                                                        cross_attention_dim=k.shape[1])
            processor.load_state_dict(weights)
            processors[name] = processor.to(unet.device, unet.dtype)
        return processors



def _replace_component(pipe, ckpt_dir: Path, name: str, model_class) -> None:
    """A fine-tuned component saved whole (`<ckpt>/<name>/`) replaces the pipeline's, in its dtype and device."""
    if (ckpt_dir / name).is_dir():
        current = getattr(pipe, name)
        setattr(pipe, name, model_class.from_pretrained(ckpt_dir / name, dtype=pipe.unet.dtype).to(current.device))

def _claimed_on_unet(param_name: str) -> bool:
    """Whether a UNet parameter belongs to an adapter/processor trainable rather than to the UNet itself."""
    return any(cls.owns(param_name) for cls in TRAINABLES.values() if cls is not Unet)


def check_names(stage: str, names: tuple[str, ...]) -> None:
    unknown = set(names) - set(TRAINABLES)
    if not names or unknown:
        raise PersonalizeError(
            f"method.stages.{stage}.train={list(names)}: each stage trains one or more of {', '.join(TRAINABLES)}"
        )


def attach(components, method_cfg, identifier: str, trained: set[str]) -> dict[str, Trainable]:
    """The trainables a run carries, created on its components, in load order."""
    return {name: cls(components, method_cfg, identifier)
            for name, cls in TRAINABLES.items() if cls.attached(method_cfg, trained)}


def component_dtypes(trained: set[str], frozen: torch.dtype, components=("vae", "text_encoder", "unet")) -> dict[str, torch.dtype]:
    """What never trains is stored in the compute dtype: half the memory and no casts inside the step.

    What trains in place stays fp32 (master weights); autocast runs its math in bf16/fp16. Trainables
    with parameters of their own (token rows, adapters) keep those in fp32 on a half-precision base."""
    in_place = {c for name in trained for c in TRAINABLES[name].trains_in_place}
    return {c: torch.float32 if c in in_place else frozen for c in components}


def encodes_prompt(names) -> bool:
    """Whether training these needs the prompt encoded with gradients (else embeddings are computed once)."""
    return any(TRAINABLES[n].encodes_prompt for n in names)


def structure(method: dict) -> dict:
    """What a resume state's tensors depend on, per trainable the method's stages train."""
    trained = {t for s in (method.get("stages") or {}).values() for t in s.get("train", [])}
    return {name: cls.structure(method) for name, cls in TRAINABLES.items() if name in trained and cls.structure(method) is not None}
