"""SD-shaped models with random weights for the benchmark, built once and then loaded via `from_pretrained`.

Speed does not depend on the weight values, only on the shapes, so the benchmark needs no hub:

- `sd21`:  the exact architecture of `stabilityai/stable-diffusion-2-1-base` (UNet 865.9M parameters,
           VAE 83.7M, OpenCLIP-H text encoder 340.4M, 512 px) -- for a GPU.
- `bench`: the same layout scaled down so one training step takes about a second on one CPU core:
           UNet channels 320->64 (heads of 64 channels, as in SD 2; 35M parameters), VAE 128->32, text
           encoder 1024->256 wide and 5 deep, 256 px (32x32 latents). Per image, the VAE encoder costs 2.0x
           a UNet forward (1.39x in SD 2.1) and the text encoder 0.07x (0.056x): the naive path's overhead is
           somewhat larger here than at SD 2.1 shapes (`--sd21` measures those).
- `tiny`:  the test suite's tiny model (`personalize.tiny`), for `--quick` smoke runs only.

Each is written in the diffusers folder layout (a `model_index.json` pipeline folder with the SD 2.1-base
PNDM scheduler) so `personalize.backbones.load_components` loads it exactly as it loads a hub checkpoint.
The evaluation models (CLIP ViT-B/32, DINO ViT-S/16) get the same treatment for timing the metrics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, ViTConfig, ViTModel

from personalize.eval.standins import ensure_tiny_clip, ensure_tiny_dino
from personalize.io import build_atomically
from personalize.prompts import project_vocabulary
from personalize.tiny import TINY_RESOLUTION, ensure_tiny_sd, tokenizer_files
from personalize.tiny_flux import ensure_tiny_flux
from personalize.tiny_sdxl import ensure_tiny_sdxl
from personalize.tiny import build_tokenizer as tiny_tokenizer

CLIP_VOCAB_SIZE = 49408  # the real CLIP BPE vocabulary size: the embedding table has the real shape


@dataclass(frozen=True)
class Shape:
    """The architecture of an SD 2.x-style model (diffusers/transformers config values)."""

    name: str
    resolution: int
    unet_channels: tuple[int, ...]
    unet_heads: tuple[int, ...]  # diffusers' `attention_head_dim`, which SD 2 configs use as the number of heads
    vae_channels: tuple[int, ...]
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int = CLIP_VOCAB_SIZE
    weights_dtype: str = "float32"  # dtype the weights are saved in (values are random either way)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


SHAPES = {
    "sd21": Shape(
        name="sd21", resolution=512, unet_channels=(320, 640, 1280, 1280), unet_heads=(5, 10, 20, 20),
        vae_channels=(128, 256, 512, 512), text_hidden=1024, text_layers=23, text_heads=16, text_intermediate=4096,
        weights_dtype="float16",  # 2.6 GB on disk instead of 5.2; loading casts to the run's dtypes
    ),
    "bench": Shape(
        name="bench", resolution=256, unet_channels=(64, 128, 256, 256), unet_heads=(1, 2, 4, 4),
        vae_channels=(32, 64, 128, 128), text_hidden=256, text_layers=5, text_heads=4, text_intermediate=1024,
    ),
}


def build_tokenizer(out_dir: Path, vocab_size: int):
    """The tiny model's CLIP BPE tokenizer, its vocabulary padded to `vocab_size` entries.

    The padding entries are never produced by BPE (no merges lead to them); they only give the text
    encoder's token-embedding table its real size, which matters for memory and for textual inversion.
    """
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab, merges = tokenizer_files(project_vocabulary())
    specials = [bos, eos]  # last, as in the real vocabulary (49406, 49407)
    for token in specials:
        vocab.pop(token)
    filler = 0
    while len(vocab) + len(specials) < vocab_size:
        vocab.setdefault(f"\u2591{filler}</w>", len(vocab))
        filler += 1
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=bos, eos_token=eos, unk_token=eos,
                              pad_token=eos, model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def sd_configs(shape: Shape, vocab_size: int) -> dict[str, dict]:
    """Constructor kwargs of the UNet, VAE and text encoder (SD 2.1-base's config values, scaled by `shape`)."""
    return {
        "unet": dict(
            sample_size=shape.resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=shape.unet_channels, attention_head_dim=shape.unet_heads,
            cross_attention_dim=shape.text_hidden, use_linear_projection=True, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=shape.resolution, layers_per_block=2,
            block_out_channels=shape.vae_channels, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        "text_encoder": dict(
            vocab_size=vocab_size, hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
            num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads, max_position_embeddings=77,
            hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
        ),
    }


# SD 2.1-base's own scheduler config: PNDM (PLMS), the "default sampler" of the stock pipeline.
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon",
)
# Keys of the hub file that PNDM itself ignores but the DDPM training scheduler built from it reads.
SCHEDULER_EXTRA = dict(clip_sample=False)


def build_sd(shape: Shape, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir / "tokenizer", shape.vocab_size)
    configs = sd_configs(shape, len(tokenizer))
    dtype = getattr(torch, shape.weights_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **configs["text_encoder"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        vae = AutoencoderKL(**configs["vae"])
        unet = UNet2DConditionModel(**configs["unet"])
    if dtype != torch.float32:
        for module in (text_encoder, vae, unet):
            module.to(dtype)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    scheduler_file = out_dir / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps(dict(json.loads(scheduler_file.read_text()), **SCHEDULER_EXTRA), indent=2))
    (out_dir / "bench_shape.json").write_text(json.dumps(asdict(shape), indent=2) + "\n")


# The test suite's tiny models of the other families (`--backbone sdxl|flux`): their rows' step ÷ floor.
TINY_BACKBONES = {"tiny_sdxl": (ensure_tiny_sdxl, "tiny-sdxl-v1"), "tiny_flux": (ensure_tiny_flux, "tiny-flux-v1")}


def ensure_model(shape_name: str, cache_dir: Path) -> Path:
    """The pipeline folder of `shape_name` ("bench", "sd21", "tiny", "tiny_sdxl" or "tiny_flux"), built on first use."""
    if shape_name == "tiny":
        return ensure_tiny_sd(Path(cache_dir) / "models" / "tiny-sd-v1")
    if shape_name in TINY_BACKBONES:
        build, folder = TINY_BACKBONES[shape_name]
        return build(Path(cache_dir) / "models" / folder)
    shape = SHAPES[shape_name]
    path = Path(cache_dir) / "bench" / f"{shape.name}-{shape.key()}"
    return build_atomically(path, "model_index.json", lambda out: build_sd(shape, out))


def resolution_of(shape_name: str) -> int:
    if shape_name == "tiny" or shape_name in TINY_BACKBONES:
        return TINY_RESOLUTION  # the tiny SDXL and FLUX are made for the same 64 px
    return SHAPES[shape_name].resolution


# ------------------------------------------------------------------ evaluation models (real shapes)
def _build_clip_b32(out_dir: Path) -> None:
    """`openai/clip-vit-base-patch32`'s architecture with random weights (tokenizer at the root, like the hub)."""
    tokenizer = tiny_tokenizer(out_dir)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32),
        projection_dim=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(out_dir, safe_serialization=True)
    (Path(out_dir) / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "size": 224,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }, indent=2))


def _build_dino_s16(out_dir: Path) -> None:
    """`facebook/dino-vits16`'s architecture with random weights."""
    config = ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                       image_size=224, patch_size=16, qkv_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTModel(config, add_pooling_layer=False).save_pretrained(out_dir, safe_serialization=True)


def ensure_eval_models(cache_dir: Path, tiny: bool = False) -> tuple[Path, Path]:
    """(CLIP folder, DINO folder): real-shaped random models, or the test suite's tiny stand-ins."""
    if tiny:
        return (ensure_tiny_clip(Path(cache_dir) / "models" / "tiny-clip"),
                ensure_tiny_dino(Path(cache_dir) / "models" / "tiny-dino"))
    root = Path(cache_dir) / "bench"
    return (build_atomically(root / "clip-vit-b32-random", "config.json", _build_clip_b32),
            build_atomically(root / "dino-vits16-random", "config.json", _build_dino_s16))


def parameter_counts(shape_name: str) -> dict[str, float]:
    """Millions of parameters per component, counted on the meta device (nothing is allocated)."""
    shape = SHAPES[shape_name]
    configs = sd_configs(shape, shape.vocab_size)
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }
    return {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}


if __name__ == "__main__":  # print the shapes' sizes: python -m benchmarks.models
    for name in SHAPES:
        print(name, {k: round(v, 1) for k, v in parameter_counts(name).items()})
