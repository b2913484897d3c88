"""Model families (Backbones): `model.backbone` names one; see base.py for the interface.

`load_components` and `load_pipeline` are the entry points the rest of the framework calls: they pick
the model config's backbone and let it load.
"""

from __future__ import annotations

import torch

from personalize import instrument
from personalize.backbones.base import Backbone, Components, Conditioning, ImageInfo
from personalize.backbones.flux import Flux
from personalize.backbones.sd import StableDiffusion
from personalize.backbones.sdxl import StableDiffusionXL
from personalize.errors import PersonalizeError

BACKBONES: dict[str, type[Backbone]] = {cls.name: cls for cls in (StableDiffusion, StableDiffusionXL, Flux)}
DEFAULT_BACKBONE = "sd"


def backbone_for(model_cfg) -> Backbone:
    """The Backbone of a model config (`model.backbone`, default sd); an unknown name is one line."""
    name = (model_cfg.get("backbone") if model_cfg is not None else None) or DEFAULT_BACKBONE
    if name not in BACKBONES:
        raise PersonalizeError(f"model.backbone={name}: not a model family this framework trains: "
                               f"choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](model_cfg)


def load_components(model_cfg, dtypes: dict[str, torch.dtype] | None = None) -> Components:
    return backbone_for(model_cfg).load_components(dtypes)


@instrument.timed("load_pipeline")  # the benchmark times pipeline loads through this span
def load_pipeline(model_cfg, dtype: torch.dtype = torch.float32, **components):
    return backbone_for(model_cfg).load_pipeline(dtype, **components)


__all__ = ["BACKBONES", "Backbone", "Components", "Conditioning", "ImageInfo", "backbone_for", "load_components",
           "load_pipeline"]
