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

import importlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from personalize.rundir import CONFIG_FILE, CUSTOM_DIFFUSION_FILE, EMBEDS_FILE, LORA_FILE, load_run_config
from personalize.errors import PersonalizeError
from personalize.methods.token import (NewTokenEmbedding, add_placeholder_token, check_new_token, expand_placeholder,
                                      token_names)

if TYPE_CHECKING:  # the settings import this module (through stages' TRAINABLES): types only
    from personalize.methods.settings import LoraSettings, MethodSettings

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

    def __init__(self, components: Any, method: MethodSettings, identifier: str):
        self.components = components
        self.method = method
        self.identifier = identifier

    @classmethod
    def attached(cls, method: MethodSettings, trained: set[str]) -> bool:
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

    @classmethod
    def check_against(cls, method: MethodSettings, trained: set[str], skeleton, components_class=None) -> None:
        """Its settings that only the model's structure can judge (which modules adapters go on), checked on
        weightless copies of the components (`skeleton(name)`) before anything is written, in a run whose
        stages train `trained` on a family whose loaded parts are a `components_class`; one PersonalizeError
        line. Nothing by default."""


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


# A multi-encoder textual-inversion file's keys -> the pipeline's (tokenizer, text encoder) they belong to
TOKEN_FILE_ENCODERS = {"clip_l": ("tokenizer", "text_encoder"), "clip_g": ("tokenizer_2", "text_encoder_2"),
                       "t5": ("tokenizer_2", "text_encoder_2")}
TOKEN_METADATA_KEY = "token"  # the placeholder of a multi-encoder file (its keys name the encoders instead)


@register
class Token(Trainable):
    """A new placeholder token's embedding rows (their own fp32 parameter; every other row stays bit-identical),
    in every text encoder of the model (SDXL: both CLIPs; FLUX: CLIP and T5), each row initialised from the
    initializer word in that encoder's own vocabulary.

    `method.new_token.num_vectors: n` (default 1) makes it n tokens, `<id>`, `<id>_1` ... `<id>_{n-1}`
    (stock diffusers' names for the rows of an [n, dim] embedding), each initialised from the initializer
    word and all trained; prompts name `<id>` alone and reach the text encoders spelled out as the n tokens.
    Saved in the format the family's stock pipeline is given:
    - one encoder (SD 1.x/2.x): `{<id>: tensor[dim]}` for one vector and `{<id>: tensor[n, dim]}` for several,
      which stock `load_textual_inversion(dir)` loads as the same n tokens;
    - several (`Components.embedding_keys`): `{clip_l: tensor[n, dim_1], clip_g | t5: tensor[n, dim_2]}` with the
      token in the file's metadata (`token`), which loads with one stock `load_textual_inversion(vectors, token=,
      tokenizer=, text_encoder=)` per encoder (`load_into`; the key names which encoder, TOKEN_FILE_ENCODERS)."""

    name = "token"
    encodes_prompt = True
    saved_untrained = True  # prompts name the placeholder: a checkpoint without it could not be sampled

    def __init__(self, components, method, identifier):
        super().__init__(components, method, identifier)
        self.num_vectors = method.num_vectors
        initializer = method.new_token.initializer
        pairs = components.text_encoders()
        names = [None] if len(pairs) == 1 else ["tokenizer", "tokenizer_2"]
        for (tokenizer, _), name in zip(pairs, names):  # every vocabulary checked before any is changed
            check_new_token(tokenizer, identifier, initializer, self.num_vectors, name)
        self.embeddings = [add_placeholder_token(tokenizer, encoder, identifier, initializer, self.num_vectors, name)
                           for (tokenizer, encoder), name in zip(pairs, names)]
        for embedding in self.embeddings:
            embedding.base.requires_grad_(False)

    @property
    def embedding(self) -> NewTokenEmbedding:
        """The first (CLIP ViT-L) encoder's."""
        return self.embeddings[0]

    @classmethod
    def attached(cls, method, trained):
        if cls.name in trained and method.new_token is None:
            raise PersonalizeError("a stage trains 'token' but method.new_token is not set: give the placeholder's initializer")
        return method.new_token is not None  # a token trained in stage 1 is still there in stage 2

    def parameters(self):
        return [embedding.new_rows for embedding in self.embeddings]

    @classmethod
    def owns(cls, param_name):
        return param_name.endswith("new_rows")

    def prompt_for_encoder(self, prompt):
        return expand_placeholder(prompt, self.identifier, self.num_vectors)

    def enable_gradient_checkpointing(self):
        for _, encoder in self.components.text_encoders():
            encoder.gradient_checkpointing_enable()

    def save(self, folder):
        from safetensors.torch import save_file

        rows = [embedding.new_rows.detach().float().cpu().contiguous() for embedding in self.embeddings]
        keys = self.components.embedding_keys
        if keys is None:
            saved = rows[0][0] if self.num_vectors == 1 else rows[0]  # one vector: [dim], as textual inversion has always saved it
            save_file({self.identifier: saved.contiguous()}, folder / EMBEDS_FILE)
        else:
            save_file(dict(zip(keys, rows)), folder / EMBEDS_FILE, metadata={TOKEN_METADATA_KEY: self.identifier})
        return EMBEDS_FILE

    @classmethod
    def load_into(cls, pipe, ckpt_dir):
        from safetensors import safe_open

        path = ckpt_dir / EMBEDS_FILE
        if not path.exists():
            return
        with safe_open(path, "pt") as f:
            embeds = {key: f.get_tensor(key) for key in f.keys()}
            token = (f.metadata() or {}).get(TOKEN_METADATA_KEY)
        if token is None:  # one encoder's file: {token: vectors}
            ((token, vectors),) = embeds.items()
            if token not in pipe.tokenizer.get_vocab():
                pipe.load_textual_inversion(str(ckpt_dir), weight_name=EMBEDS_FILE)  # the stock path
            else:
                _write_token_rows(pipe.tokenizer, pipe.text_encoder, token, vectors)
            return
        unknown = set(embeds) - set(TOKEN_FILE_ENCODERS)
        if unknown:
            raise PersonalizeError(f"{path} has vectors for '{sorted(unknown)[0]}', not for one of the text encoders "
                                   f"{', '.join(TOKEN_FILE_ENCODERS)}: load it on the model family it was trained on")
        for key, vectors in embeds.items():
            tokenizer, encoder = (getattr(pipe, name) for name in TOKEN_FILE_ENCODERS[key])
            if token not in tokenizer.get_vocab():  # the stock loader, once per encoder
                pipe.load_textual_inversion(vectors, token=token, tokenizer=tokenizer, text_encoder=encoder)
            else:
                _write_token_rows(tokenizer, encoder, token, vectors)


def _write_token_rows(tokenizer, text_encoder, token: str, vectors: torch.Tensor) -> None:
    """A later checkpoint of the same run, whose tokens the pipeline has already: only their rows change."""
    vocab = tokenizer.get_vocab()
    table = text_encoder.get_input_embeddings().weight
    rows = vectors.reshape(-1, vectors.shape[-1])
    with torch.no_grad():
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
        name = self.components.folder("unet")  # FLUX's pipeline calls its denoiser `transformer`
        self.components.unet.save_pretrained(folder / name, safe_serialization=True)
        return name

    @classmethod
    def load_into(cls, pipe, ckpt_dir):
        for name in ("unet", "transformer"):  # whichever the pipeline has: the same class as its own
            if getattr(pipe, name, None) is not None:
                _replace_component(pipe, ckpt_dir, name, type(getattr(pipe, name)))


class LoraAdapters(Trainable):
    """PEFT LoRA (or DoRA) adapters on one frozen component: the base of `lora` (the UNet) and
    `text_encoder_lora`.

    Both read `method.lora`: rank, alpha (the update is scaled by alpha / rank), dropout, use_dora (DoRA,
    PEFT's `use_dora`: each adapted weight's magnitude and direction train apart), rank_pattern and
    alpha_pattern (PEFT's rank and alpha per module, {module name or regex: value}, matched as PEFT matches
    them, against the end of a module's name), and each its own list of target modules. Both write the
    one file that stock `load_lora_weights` reads, `pytorch_lora_weights.safetensors`, each its own part
    (`unet.` / `text_encoder.` keys) with its adapter config in the header (`lora_adapter_metadata`: the
    loader needs its alpha and patterns, else it assumes alpha = rank everywhere: another model).
    """

    component: ClassVar[str]  # the component it adapts, and the name of its part of the LoRA file
    adapter: ClassVar[str]  # the PEFT adapter's name on that component (in its parameters' names)
    targets_key: ClassVar[str]  # the method.lora setting listing its target modules
    example_targets: ClassVar[tuple[str, ...]] = ()  # for messages

    def __init__(self, components, method, identifier):
        super().__init__(components, method, identifier)
        for part in self.adapted(type(components)):
            model = components.part(part)
            self.inject_checked(model, self.settings(method), part)
            for name, param in model.named_parameters():
                if self.owns(name):
                    param.data = param.data.float()  # adapters train in fp32 even on a bf16 base

    @classmethod
    def adapted(cls, components_class) -> tuple[str, ...]:
        """The components it puts adapters on, each its own part of the LoRA file: its `component`."""
        return (cls.component,)

    # ---------------------------------------------------------------- the adapter
    @classmethod
    def targets(cls, lora: LoraSettings) -> tuple[str, ...]:
        """Its target modules (the `method.lora` setting `targets_key` names)."""
        raise NotImplementedError

    @classmethod
    def settings(cls, method: MethodSettings) -> LoraSettings:
        """`method.lora`; one line where the method has none."""
        if method.lora is None:
            raise PersonalizeError(f"a stage trains '{cls.name}' but method.lora is not set: give its rank, alpha "
                                   f"and {cls.targets_key} (conf/method/_common.yaml has them)")
        return method.lora

    @classmethod
    def targeted(cls, model, lora: LoraSettings) -> list[str]:
        """The modules of `model` its targets name (PEFT's rule: the whole name, or its end after a dot)."""
        targets = cls.targets(lora)
        return [name for name, _ in model.named_modules() if any(name == t or name.endswith(f".{t}") for t in targets)]

    @classmethod
    def lora_config(cls, lora: LoraSettings, targeted: list[str]):
        """PEFT's LoraConfig of `method.lora` for this component, whose targets select the modules `targeted`.

        rank_pattern / alpha_pattern serve both LoRA trainables: each component's config keeps the keys that
        match one of its modules (a key matching none of any is refused at config time, check_against)."""
        from peft import LoraConfig

        mine = {key: {k: v for k, v in patterns.items() if any(_pattern_matches(k, n) for n in targeted)}
                for key, patterns in (("rank_pattern", lora.rank_pattern), ("alpha_pattern", lora.alpha_pattern))}
        return LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            use_dora=lora.use_dora, init_lora_weights="gaussian",
            target_modules=list(cls.targets(lora)),
            rank_pattern={k: int(v) for k, v in mine["rank_pattern"].items()},
            alpha_pattern={k: float(v) for k, v in mine["alpha_pattern"].items()},
        )

    @classmethod
    def inject(cls, model, config) -> None:
        """Put the adapter of `config` on the component (PEFT)."""
        raise NotImplementedError

    @classmethod
    def inject_checked(cls, model, lora: LoraSettings, part: str | None = None) -> None:
        """`inject` on component `part` (default: `component`); a target that names no module, or a module PEFT
        cannot adapt, is one line."""
        key, component = f"method.lora.{cls.targets_key}", part or cls.component
        targeted = cls.targeted(model, lora)
        for target in sorted(set(cls.targets(lora))):
            if not any(name == target or name.endswith(f".{target}") for name in targeted):
                raise PersonalizeError(
                    f"{key} has '{target}', which names no module of the {component}: name Linear or Conv2d "
                    f"modules (whole names or their ends), e.g. {', '.join(cls.example_targets)}")
        config = cls.lora_config(lora, targeted)
        try:
            cls.inject(model, config)
        except ValueError as error:  # PEFT's: a module it has no LoRA layer for (a norm, an activation)
            raise PersonalizeError(
                f"{key}={sorted(config.target_modules)}: PEFT cannot adapt these on the {component} "
                f"({str(error).splitlines()[0]}): name Linear or Conv2d modules, e.g. {', '.join(cls.example_targets)}"
            ) from None

    @classmethod
    def check_against(cls, method, trained, skeleton, components_class=None) -> None:
        from personalize.backbones.base import Components  # lazily: the backbones import the methods package

        components_class = components_class or Components
        lora = cls.settings(method)
        for part in cls.adapted(components_class):
            cls.inject_checked(skeleton(part), lora, part)
        adapters = [c for c in TRAINABLES.values() if issubclass(c, LoraAdapters) and c.attached(method, trained)]
        if cls is not adapters[0]:
            return  # the patterns are checked once, against the modules of every LoRA trainable of the run
        targeted = [name for c in adapters for part in c.adapted(components_class)
                    for name in c.targeted(skeleton(part), lora)]
        for setting, patterns in (("rank_pattern", lora.rank_pattern), ("alpha_pattern", lora.alpha_pattern)):
            for pattern, value in patterns.items():
                if not any(_pattern_matches(pattern, name) for name in targeted):
                    where = ", ".join(f"method.lora.{c.targets_key} on the {c.component}" for c in adapters)
                    raise PersonalizeError(
                        f"method.lora.{setting}.{pattern}={value} matches none of the modules LoRA adapts ({where}; "
                        f"e.g. {targeted[0]}): use the end of such a name, or a regex that matches one")

    # ---------------------------------------------------------------- what trains
    def parameters(self):
        return [p for part in self.adapted(type(self.components))
                for n, p in self.components.part(part).named_parameters() if self.owns(n)]

    @classmethod
    def owns(cls, param_name):
        # lora_A / lora_B (and DoRA's lora_magnitude_vector) of its adapter: `...to_q.lora_A.<adapter>.weight`
        return "lora_" in param_name and f".{cls.adapter}." in param_name

    # ---------------------------------------------------------------- its part of the checkpoint
    def file_layers(self, part: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors on component `part` under the keys of its part of the LoRA file, in fp32.

        PEFT's own names (`<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`), which stock
        `load_lora_weights` reads for every kind of target. diffusers' `convert_state_dict_to_diffusers`
        renames only the attention projections' keys (to `lora.down` / `lora.up`), and diffusers 0.42 drops
        the attention adapters of a file that mixes both forms when `proj_in` / `proj_out` are targets too."""
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(self.components.part(part), adapter_name=self.adapter)
        return {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}

    def save(self, folder):
        for part in self.adapted(type(self.components)):
            config = self.components.part(part).peft_config[self.adapter]
            # its part under the stock pipeline's name of the component (FLUX: `transformer.`, which its loader reads)
            add_to_lora_file(folder, self.components.folder(part), self.file_layers(part), config.to_dict())
        return LORA_FILE

    @classmethod
    def structure(cls, method):
        lora = method.get("lora") or {}
        return {"rank": lora.get("rank"), "alpha": lora.get("alpha"), "use_dora": bool(lora.get("use_dora", False)),
                "target_modules": lora.get(cls.targets_key), "rank_pattern": dict(lora.get("rank_pattern") or {}),
                "alpha_pattern": dict(lora.get("alpha_pattern") or {})}


@register
class Lora(LoraAdapters):
    """LoRA on the denoiser, SD's UNet or FLUX's transformer (`method.lora.target_modules`; by default the
    family's, as diffusers' examples: `Backbone.default_lora_targets`, which prepare_run fills in). Loading a
    checkpoint loads its whole LoRA file: the text encoder's part too."""

    name = "lora"
    component = "unet"
    adapter = "default"  # PEFT's default name, kept: earlier runs' resume states hold `lora_A.default` keys
    targets_key = "target_modules"
    example_targets = ("to_q", "ff.net.2", "conv1")

    @classmethod
    def targets(cls, lora):
        return lora.target_modules

    @classmethod
    def inject(cls, model, config):
        model.add_adapter(config, adapter_name=cls.adapter)

    def enable_gradient_checkpointing(self):
        self.components.unet.enable_gradient_checkpointing()

    @classmethod
    def load_into(cls, pipe, ckpt_dir):
        if getattr(pipe, "_personalize_lora", False):  # an earlier checkpoint's adapters (both parts)
            pipe.unload_lora_weights()
            pipe._personalize_lora = False
        if (ckpt_dir / LORA_FILE).exists():
            cls.warn_if_scale_unknown(ckpt_dir)
            # both parts, with the rank, alpha, patterns and DoRA of the file's metadata
            pipe.load_lora_weights(str(ckpt_dir), weight_name=LORA_FILE)
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


@register
class TextEncoderLora(LoraAdapters):
    """LoRA on the text encoder (`method.lora.text_encoder_target_modules`; by default its attention
    projections q_proj, k_proj, v_proj, out_proj, as diffusers' examples), in the `text_encoder.` part of
    the LoRA file with its own adapter metadata; its own lr through the stage's `trainable_lr`. On the encoders
    the family's LoRA script adapts (`Components.lora_text_encoders`): SDXL's two CLIPs, each its own part
    (`text_encoder.`, `text_encoder_2.`), FLUX's CLIP but not T5.

    Not with the whole `text_encoder` in one run (that saves the encoder whole, adapters and all). Stock
    `load_lora_weights` loads it through transformers' `load_adapter`, which matches a DoRA magnitude vector
    only as `...lora_magnitude_vector.weight` (PEFT's state dict names it without `.weight`, and under that
    name diffusers 0.42 re-initialises it on load): its part writes the name that loads."""

    name = "text_encoder_lora"
    component = "text_encoder"
    adapter = "text_encoder_lora"
    targets_key = "text_encoder_target_modules"
    example_targets = ("q_proj", "out_proj", "fc1")
    encodes_prompt = True

    @classmethod
    def targets(cls, lora):
        return lora.text_encoder_target_modules

    @classmethod
    def attached(cls, method, trained):
        if cls.name in trained and TextEncoder.name in trained:
            raise PersonalizeError(
                f"the stages train both '{TextEncoder.name}' and '{cls.name}': train the whole text encoder or "
                "LoRA on it, not both")
        return cls.name in trained

    @classmethod
    def adapted(cls, components_class):
        return components_class.lora_text_encoders  # SDXL: both CLIPs, as its LoRA script; FLUX: CLIP, not T5

    @classmethod
    def inject(cls, model, config):
        # PEFT itself: transformers 5's own `add_adapter` asks for PEFT >= 0.22, newer than PyPI's 0.21.2
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name=cls.adapter)

    def enable_gradient_checkpointing(self):
        # non-reentrant: the frozen embeddings give the checkpointed layers no input that requires grad
        for part in self.adapted(type(self.components)):
            self.components.part(part).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def file_layers(self, part):
        return {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v
                for k, v in super().file_layers(part).items()}

    @classmethod
    def load_into(cls, pipe, ckpt_dir):
        pass  # its part of the LoRA file loads with the UNet's, in Lora.load_into's one load_lora_weights


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

    def __init__(self, components, method, identifier):
        super().__init__(components, method, identifier)
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


# ---------------------------------------------------------------- LoRA: settings and the one file
def _pattern_matches(pattern: str, name: str) -> bool:
    """Whether a rank_pattern / alpha_pattern key applies to module `name`, by PEFT's own rule."""
    from peft.utils.other import get_pattern_key

    return get_pattern_key([pattern], name) == pattern


def add_to_lora_file(folder: Path, component: str, layers: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write one component's part of the checkpoint's LoRA file (its layers and adapter metadata), keeping the
    part another LoRA trainable already wrote into `folder`: the trainables save in either order, and the
    file holds both, through diffusers' own writer."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = folder / LORA_FILE
    parts = read_lora_parts(path) if path.exists() else {}
    parts[component] = (layers, metadata)
    # the writer whose parts these are: SD's takes unet/text_encoder, SDXL's also text_encoder_2, FLUX's
    # transformer/text_encoder
    writer = (FluxPipeline if "transformer" in parts else
              StableDiffusionXLPipeline if "text_encoder_2" in parts else StableDiffusionPipeline)
    writer.save_lora_weights(
        folder, safe_serialization=True, **{f"{name}_lora_layers": part[0] for name, part in parts.items()},
        **{f"{name}_lora_adapter_metadata": part[1] for name, part in parts.items()})


def read_lora_parts(path: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """A LoRA file as {component: (its tensors, its adapter metadata)}, both without the `component.` prefix."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    parts: dict[str, tuple[dict, dict]] = {}
    with safe_open(path, "pt") as f:
        for key in f.keys():
            component, _, rest = key.partition(".")
            parts.setdefault(component, ({}, {}))[0][rest] = f.get_tensor(key)
        header = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
    for key, value in header.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, ({}, {}))[1][rest] = value
    return parts


# ---------------------------------------------------------------- checks against the model's structure
class _ConfigFile:
    """A `load_pretrained` loader that reads a config file alone (bytes, not weights)."""

    def __init__(self, read):
        self.read = read

    def from_pretrained(self, source, **kwargs):
        kwargs.pop("variant", None)  # names a weights file; a config is shared by every variant
        return self.read(source, **kwargs)


def component_skeleton(model_cfg, component: str) -> nn.Module:
    """A model's component built from its config file on the meta device: its modules' names, types and
    shapes, no weights. Its class is the one the model's model_index.json names (diffusers or transformers)."""
    from diffusers import DiffusionPipeline

    from personalize.backbones import backbone_for
    from personalize.models import load_pretrained, resolve_pretrained

    source = resolve_pretrained(model_cfg)
    component = backbone_for(model_cfg).folders.get(component, component)  # FLUX's unet is transformer/
    library, class_name = load_pretrained(_ConfigFile(DiffusionPipeline.load_config), source, None, model_cfg)[component]
    model_class = getattr(importlib.import_module(library), class_name)
    if library == "transformers":
        config = load_pretrained(_ConfigFile(model_class.config_class.from_pretrained), source, component, model_cfg)
        with torch.device("meta"):
            return model_class(config)
    config = load_pretrained(_ConfigFile(model_class.load_config), source, component, model_cfg)
    with torch.device("meta"):
        return model_class.from_config(config)


def check_against_model(method: MethodSettings, model_cfg) -> None:
    """What the method's trainables need of the model (Trainable.check_against), on weightless copies of its
    components: called with the config checks, before anything is written."""
    from personalize.backbones import backbone_for

    trained, components_class = method.trained, backbone_for(model_cfg).components_class
    for cls in TRAINABLES.values():
        if cls.attached(method, trained):
            cls.check_against(method, trained, lambda component: component_skeleton(model_cfg, component), components_class)


def _replace_component(pipe, ckpt_dir: Path, name: str, model_class) -> None:
    """A fine-tuned component saved whole (`<ckpt>/<name>/`) replaces the pipeline's, in its dtype and device."""
    if (ckpt_dir / name).is_dir():
        current = getattr(pipe, name)
        setattr(pipe, name, model_class.from_pretrained(ckpt_dir / name, dtype=current.dtype).to(current.device))

def _claimed_on_unet(param_name: str) -> bool:
    """Whether a UNet parameter belongs to an adapter/processor trainable rather than to the UNet itself."""
    return any(cls.owns(param_name) for cls in TRAINABLES.values() if cls is not Unet)


def check_names(stage: str, names: tuple[str, ...]) -> None:
    unknown = set(names) - set(TRAINABLES)
    if not names or unknown:
        raise PersonalizeError(
            f"method.stages.{stage}.train={list(names)}: each stage trains one or more of {', '.join(TRAINABLES)}"
        )


def attach(components, method: MethodSettings, identifier: str, trained: set[str]) -> dict[str, Trainable]:
    """The trainables a run carries, created on its components, in load order."""
    return {name: cls(components, method, identifier)
            for name, cls in TRAINABLES.items() if cls.attached(method, trained)}


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
