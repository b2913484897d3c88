"""`personalize-download model=<name>`: fetch a base model once, only what we load, and verify it.

A hub SD repository holds far more than a run reads: the single-file checkpoints (.ckpt and .safetensors
of several GB each, EMA and non-EMA), .bin duplicates of every weight, other precisions, a safety
checker. `download_patterns` names exactly the files `load_components` and `load_pipeline` read: the
pipeline index, the scheduler and tokenizer folders, and each network's config and safetensors weights of
the configured variant; which networks and tokenizers those are is the model family's (`Backbone.networks`,
`Backbone.tokenizers`: SDXL has a second of each). A `model.vae` on the Hub (SDXL's fp16-fix) is fetched
too, its config and full-precision weights. After the download the UNet is checked against
`model.unet_sha256` when the config has one. The model's evaluation models (CLIP, DINO) are fetched the same way unless `eval_models=false`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import snapshot_download
from omegaconf import DictConfig

from personalize.backbones import Backbone, backbone_for
from personalize.backbones.sd import StableDiffusion
from personalize.errors import PersonalizeError
from personalize.models import (
    _is_offline,
    hub_error,
    is_local_path,
    marker_path,
    resolve_pretrained,
    unet_weights_file,
    verify_unet,
    with_variant,
)

log = logging.getLogger(__name__)

# Files of the evaluation models (transformers' CLIP and ViT): configs, tokenizer and processor files.
_EVAL_PATTERNS = ["*.json", "*.txt"]


def _weights(folder: str, stem: str, variant: str | None) -> list[str]:
    """A network's config and its safetensors weights of `variant`, single or sharded in diffusers' naming:
    <stem>.safetensors.index[.variant].json and <stem>[.variant]-00001-of-00002.safetensors."""
    prefix = f"{folder}/" if folder else ""
    return [
        f"{prefix}config.json",
        f"{prefix}{with_variant(stem + '.safetensors', variant)}",
        f"{prefix}{with_variant(stem + '.safetensors.index.json', variant)}",
        f"{prefix}{stem}{'.' + variant if variant else ''}-[0-9]*-of-[0-9]*.safetensors",
    ]


def download_patterns(variant: str | None = None, networks: tuple[str, ...] | None = None,
                      backbone: type[Backbone] = StableDiffusion) -> list[str]:
    """The `allow_patterns` of a pipeline repository of `backbone`'s family: what we load and nothing else.

    Weights in safetensors only, of `variant` (None: the full-precision files), single or sharded; no
    safety checker or feature extractor (we load the pipeline without them), no root-level checkpoints.
    `networks` limits the weights to those folders (a variant fallback fetches only what lacks the variant).
    """
    patterns = ["model_index.json", "scheduler/scheduler_config.json", *(f"{t}/*" for t in backbone.tokenizers)]
    for folder, stem in backbone.networks.items():
        if networks is None or folder in networks:
            patterns += _weights(folder, stem, variant)
    return patterns


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], model_cfg=None) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
    except Exception as error:  # noqa: BLE001 - every hub failure becomes one line; anything else is a bug
        if isinstance(error, (OSError, ValueError)):
            raise hub_error(repo_id, error, model_cfg) from error
        raise


def download_base_model(model_cfg) -> Path:
    """Fetch the base model of `model_cfg` into the Hugging Face cache and verify its UNet; its folder."""
    source = str(model_cfg.pretrained)
    if model_cfg.get("tiny", False):
        path = Path(resolve_pretrained(model_cfg))
        print(f"model={model_cfg.name} is built locally (random weights), nothing to download: {path}")
        return path
    if is_local_path(source):
        path = Path(resolve_pretrained(model_cfg))  # checks the folder holds a pipeline
        print(f"model.pretrained={source} is a local folder, nothing to download{_checked(verify_unet(str(path), model_cfg))}")
        return path
    if _is_offline():
        raise PersonalizeError(
            f"personalize-download model={model_cfg.name} needs the Hugging Face Hub but HF_HUB_OFFLINE is set: unset "
            f"it, or run this on a machine with network and copy its Hugging Face cache (models--"
            f"{source.replace('/', '--')} under ~/.cache/huggingface/hub, or HF_HOME) here")
    revision, variant = model_cfg.get("revision"), model_cfg.get("variant")
    backbone = type(backbone_for(model_cfg))
    folder = _snapshot(source, revision, download_patterns(variant, backbone=backbone), model_cfg)
    without = tuple(n for n in backbone.networks if not any((folder / n).glob("*.safetensors")))
    if variant and without:  # diffusers loads the full-precision file of a network that lacks the variant
        log.info("no %s weights for %s: fetching their full-precision files", variant, ", ".join(without))
        folder = _snapshot(source, revision, download_patterns(None, without, backbone), model_cfg)
    unet = folder / unet_weights_file(source, model_cfg)
    if not unet.is_file() and not any((folder / "unet").glob("*.safetensors")):
        raise PersonalizeError(
            f"model.pretrained={source}: the repository has no {unet_weights_file(source, model_cfg)}"
            + (f" (model.variant={variant}: try model.variant=null)" if variant else
               ": it must be a diffusers pipeline with safetensors weights"))
    origin = f" (the copy of {model_cfg.original_id})" if model_cfg.get("original_id") else ""
    print(f"{source}{origin} is in {folder}{_checked(verify_unet(source, model_cfg))}")
    download_vae(model_cfg)
    return folder


def download_vae(model_cfg) -> Path | None:
    """`model.vae` on the Hub: the AutoencoderKL repository's config and full-precision safetensors weights
    (what the backbone loads in place of the pipeline's VAE); None when there is none or it is a folder."""
    vae = model_cfg.get("vae")
    if not vae or is_local_path(str(vae)):
        return None
    folder = _snapshot(str(vae), None, _weights("", "diffusion_pytorch_model", None))
    if not any(folder.glob("*.safetensors")):
        raise PersonalizeError(f"model.vae={vae}: the repository has no diffusion_pytorch_model.safetensors: it must "
                               "be a diffusers AutoencoderKL with safetensors weights (or model.vae=null for the pipeline's own)")
    print(f"model.vae={vae} is in {folder}")
    return folder


def _checked(result: tuple[Path, bool] | None) -> str:
    if result is None:
        return " (no model.unet_sha256: the UNet is not checked)"
    path, hashed = result
    return (f"; its UNet matches model.unet_sha256 ({'hashed now' if hashed else 'checked before'}: "
            f"{marker_path(path)})")


def download_eval_models(model_cfg) -> list[Path]:
    """Fetch the model's CLIP and DINO evaluation models (configs, tokenizer, safetensors weights)."""
    eval_models = model_cfg.get("eval_models") or {}
    if eval_models.get("tiny", False):
        print("the evaluation models of this model are tiny local stand-ins: nothing to download")
        return []
    folders = []
    for key in ("clip", "dino"):
        repo_id = eval_models.get(key)
        if not repo_id or is_local_path(str(repo_id)):
            continue
        folder = _snapshot(str(repo_id), None, _EVAL_PATTERNS + ["model.safetensors"])
        if not (folder / "model.safetensors").is_file():  # an older repo without safetensors: its .bin
            folder = _snapshot(str(repo_id), None, _EVAL_PATTERNS + ["pytorch_model.bin"])
        print(f"evaluation model {repo_id} (model.eval_models.{key}) is in {folder}")
        folders.append(folder)
    return folders


def download(cfg: DictConfig) -> Path:
    """The task of `personalize-download`."""
    folder = download_base_model(cfg.model)
    if cfg.get("eval_models", True):
        download_eval_models(cfg.model)
    return folder
