"""Prompt-to-prompt editing with null-text inversion: put a personalized subject into an existing picture.

`edit_image` is the entry point; `attention` holds the processors and controllers, `inversion` the
DDIM loop and null-text inversion.
"""

from personalize.edit.attention import (
    AttentionStore, AttnMeta, ControlledAttnProcessor, EditController, LocalBlend, PromptTokens, Refine, Replace,
    Reweight, controlled_attention, prompt_tokens, refine_mapping, replace_mapping, shared_prompt_tokens, word_weights,
)
from personalize.edit.editor import (
    EditResult, EditSettings, build_controller, edit_image, invert_image, save_attention_maps, save_side_by_side,
    word_attention_maps,
)
from personalize.edit.inversion import (
    Denoiser, NullTextInversion, as_conditioning, ddim_invert, ddim_sample, decode_latents, encode_image, encode_text,
    make_scheduler, null_text_inversion, pipeline_backbone, pipeline_tokenizers, unconditional,
)

__all__ = [
    "AttentionStore", "AttnMeta", "ControlledAttnProcessor", "EditController", "LocalBlend", "PromptTokens",
    "Refine", "Replace", "Reweight", "controlled_attention", "prompt_tokens", "refine_mapping", "replace_mapping",
    "shared_prompt_tokens", "word_weights", "EditResult", "EditSettings", "build_controller", "edit_image",
    "invert_image", "save_attention_maps", "save_side_by_side", "word_attention_maps", "Denoiser",
    "NullTextInversion", "as_conditioning", "ddim_invert", "ddim_sample", "decode_latents", "encode_image",
    "encode_text", "make_scheduler", "null_text_inversion", "pipeline_backbone", "pipeline_tokenizers",
    "unconditional",
]
