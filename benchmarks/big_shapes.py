"""SDXL base 1.0 and FLUX.1-dev at their real shapes: parameter, optimizer-state and activation memory.

A full-size training step of either takes minutes on this CPU, so the CPU benchmark measures what it
can honestly and estimates the rest, with its arithmetic written out (docs/benchmark.md, "SDXL and
FLUX.1 at their real shapes"):

- parameters: every component built on the meta device from the published config.json values below
  (nothing is allocated), counted to the parameter;
- what a method trains, from the same meta models: the LoRA adapters PEFT puts on the family's default
  targets (`Backbone.default_lora_targets`, the method's rank), or the whole denoiser;
- optimizer state: 8-bit AdamW's (bitsandbytes) and torch AdamW's bytes per tensor, from the rule each
  implements (`adam_state_bytes`; a test checks it against a real bitsandbytes step on LoRA-shaped tensors);
- activations: one training step (denoiser forward + loss + backward into the adapters, bf16 autocast,
  gradient checkpointing) traced with torch's MemTracker, which counts every tensor's storage from its
  allocation to its release. On fake tensors (FakeTensorMode: shapes and dtypes, no data, no arithmetic)
  the trace runs at the full depth and 1024 px in seconds. That the fake trace counts what a real step
  allocates is measured: at reduced depth and resolution the same trace on real tensors, computed on
  this CPU, gives the same peak (`validate_fake_trace`). The extrapolation rule is therefore "trace the
  full shape"; the rule of thumb it replaces (activations ~ depth x tokens, from a reduced-size
  measurement) is checked against it in the docs.

No weights are downloaded: the configs are written out here from the published config.json files of
stabilityai/stable-diffusion-xl-base-1.0 and black-forest-labs/FLUX.1-dev.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

GB = 1e9  # decimal gigabytes: the targets (24 GB, 40 GB) and GPU spec sheets use them

# ------------------------------------------------------------------ the published configs
CLIP_L = dict(  # openai/clip-vit-large-patch14's text tower: SDXL's text_encoder and FLUX.1's text_encoder
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SDXL_BASE = {
    "unet": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
        act_fn="silu",
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=1024, scaling_factor=0.13025, force_upcast=True, act_fn="silu",
    ),
    "text_encoder": CLIP_L,
    "text_encoder_2": dict(  # laion's OpenCLIP ViT-bigG/14 text tower, with its projection (CLIPTextModelWithProjection)
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
    ),
}
FLUX_DEV = {
    "unet": dict(  # transformer/config.json (the `unet` slot of Components)
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        act_fn="silu",
    ),
    "text_encoder": CLIP_L,
    "text_encoder_2": dict(  # google/t5-v1_1-xxl's encoder (T5EncoderModel)
        vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        tie_word_embeddings=False, layer_norm_epsilon=1e-6, dense_act_fn="gelu_new", is_gated_act=True,
    ),
}
FAMILIES = {"sdxl": SDXL_BASE, "flux": FLUX_DEV}
HUB_IDS = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "flux": "black-forest-labs/FLUX.1-dev"}
# The published totals (the models' cards and the count of their safetensors): what the tests hold us to.
PUBLISHED = {
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "flux": {"unet": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656},
}
SEQUENCE = {"sdxl": 77, "flux": 512}  # text tokens a prompt is padded to (CLIP's 77; FLUX's T5 max_sequence_length)


def build(family: str, component: str, config: dict | None = None) -> torch.nn.Module:
    """One component of `family` in its class, from `config` (default: the published one), on the current
    default device (use `with torch.device("meta")` to allocate nothing)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    config = dict(FAMILIES[family][component] if config is None else config)
    if component == "unet":
        return (UNet2DConditionModel if family == "sdxl" else FluxTransformer2DModel)(**config)
    if component == "vae":
        return AutoencoderKL(**config)
    if component == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**config))
    if family == "sdxl":
        return CLIPTextModelWithProjection(CLIPTextConfig(**config))
    return T5EncoderModel(T5Config(**config))


def parameter_counts(family: str) -> dict[str, int]:
    """Parameters per component of the real shapes, counted on the meta device."""
    counts = {}
    for component in FAMILIES[family]:
        with torch.device("meta"):
            model = build(family, component)
        counts[component] = sum(p.numel() for p in model.parameters())
    return counts


def default_lora_targets(family: str) -> tuple[str, ...]:
    from personalize.backbones.flux import Flux
    from personalize.backbones.sdxl import StableDiffusionXL

    return (StableDiffusionXL if family == "sdxl" else Flux).default_lora_targets


def add_lora(model: torch.nn.Module, targets, rank: int) -> list[torch.nn.Parameter]:
    """PEFT LoRA of `rank` on `targets` (PEFT's rule: a module whose name is a target or ends with
    ".target"), adapters in fp32 as the run keeps them on a half-precision base; returns the adapters."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
    for module_name, module in list(model.named_modules()):
        # the adapters (`<target>.lora_A.default`, PEFT's Linear layers) in fp32: new Parameters rather than
        # .to(), which cannot swap a fake tensor's storage
        if ".lora_A." not in module_name + "." and ".lora_B." not in module_name + ".":
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype != torch.float32:
                setattr(module, name, torch.nn.Parameter(param.detach().float(), requires_grad=param.requires_grad))
    return [p for n, p in model.named_parameters() if "lora_" in n]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules in `dtype` (no fp32 copy first: half the peak while a 12B model is made)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def lora_shapes(family: str, rank: int) -> list[tuple[int, ...]]:
    """The shapes of the LoRA tensors a run puts on the real denoiser (meta device)."""
    with torch.device("meta"):
        model = build(family, "unet")
        add_lora(model, default_lora_targets(family), rank)
    return [tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n]


# ------------------------------------------------------------------ optimizer state
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes: a tensor with fewer elements keeps 32-bit Adam states
BNB_BLOCKSIZE = 256  # bitsandbytes' blockwise quantisation of 8-bit optimizer states: one fp32 absmax per block


def adam_state_bytes(numel: int, optimizer: str) -> int:
    """Optimizer-state bytes of one tensor of `numel` fp32 elements (exp_avg and exp_avg_sq, plus the step).

    adamw (torch): two fp32 states, 8 bytes per element (the step counter: one 4-byte scalar tensor).
    adamw8bit (bitsandbytes AdamW8bit): two uint8 states and one fp32 absmax per 256-element block of
    each, plus the 256-entry fp32 quantisation maps of each state; a tensor under 4096 elements keeps
    32-bit states (8 bytes per element) - LoRA's rank-4 down-projections of 320 channels are such."""
    if optimizer == "adamw":
        return 8 * numel + 4
    if optimizer != "adamw8bit":
        raise ValueError(f"optimizer {optimizer!r}: adamw or adamw8bit")
    if numel < BNB_MIN_8BIT_SIZE:
        return 8 * numel
    blocks = math.ceil(numel / BNB_BLOCKSIZE)
    return 2 * (numel + 4 * blocks + 4 * 256)


# ------------------------------------------------------------------ one traced training step
def reduced_config(family: str, depth: int) -> dict:
    """The denoiser's published config with its transformer depth cut to `depth` (full width kept):
    SDXL: `depth` transformer layers in each cross-attention block instead of (1, 2, 10); FLUX: `depth`
    double-stream and 2 x `depth` single-stream blocks instead of 19 and 38."""
    config = dict(FAMILIES[family]["unet"])
    if family == "sdxl":
        config["transformer_layers_per_block"] = tuple(min(depth, d) for d in config["transformer_layers_per_block"])
    else:
        config.update(num_layers=depth, num_single_layers=2 * depth)
    return config


@dataclass(frozen=True)
class StepTrace:
    """Bytes of one traced LoRA training step, by MemTracker's categories, at the step's peak."""

    family: str
    resolution: int
    batch: int
    depth: int | None  # None: the published depth
    fake: bool
    peak_bytes: int  # everything live at the peak
    parameter_bytes: int  # the denoiser's frozen bf16 weights and its fp32 adapters, as traced
    gradient_bytes: int
    activation_bytes: int  # activations and temporaries live at the peak (MemTracker's ACT + TEMP)
    lora_parameters: int


def _denoise(family: str, model, noisy, timesteps, conditioning):
    """The backbone's own denoiser call (personalize.backbones), on a model built here."""
    from personalize.backbones.flux import Flux
    from personalize.backbones.sdxl import StableDiffusionXL

    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=FAMILIES[family]["vae"]["block_out_channels"]))
    components = SimpleNamespace(unet=model, vae=vae)
    backbone = StableDiffusionXL.__new__(StableDiffusionXL) if family == "sdxl" else Flux.__new__(Flux)
    return backbone.denoise(components, noisy, timesteps, conditioning)


def step_inputs(family: str, resolution: int, batch: int, generator: torch.Generator | None = None,
                config: dict | None = None) -> tuple:
    """(noisy latents, timesteps, conditioning, target) of one step, as the module hands them to the
    denoiser: fp32 latents, cached prompt embeddings in bf16 (the frozen encoders' dtype)."""
    from personalize.backbones.base import Conditioning

    g = generator or torch.Generator().manual_seed(0)
    channels = FAMILIES[family]["vae"]["latent_channels"]
    side = resolution // 8
    noisy = torch.randn(batch, channels, side, side, generator=g)
    target = torch.randn(batch, channels, side, side, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    seq, bf16 = SEQUENCE[family], torch.bfloat16
    config = config or FAMILIES[family]["unet"]
    if family == "sdxl":
        # the pooled width: what the added embedding takes beside the 6 time ids' sinusoids
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        conditioning = Conditioning(
            encoder_hidden_states=torch.randn(batch, seq, config["cross_attention_dim"], generator=g).to(bf16),
            text_embeds=torch.randn(batch, pooled, generator=g).to(bf16),
            time_ids=torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32))
    else:
        conditioning = Conditioning(
            encoder_hidden_states=torch.randn(batch, seq, config["joint_attention_dim"], generator=g).to(bf16),
            pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g).to(bf16),
            txt_ids=torch.zeros(batch, seq, 3, dtype=bf16))
    return noisy, timesteps, conditioning, target


def trace_lora_step(family: str, resolution: int = 1024, batch: int = 1, rank: int = 4, depth: int | None = None,
                    fake: bool = True, checkpointing: bool = True, unet_config: dict | None = None) -> StepTrace:
    """MemTracker's account of one LoRA step of the low-memory preset: frozen weights in bf16, fp32 adapters,
    bf16 autocast, gradient checkpointing; prompt embeddings cached (the text encoders are not in it).

    `fake`: on FakeTensorMode tensors (no data: seconds at any size); else real tensors, computed here.
    The model's weights are counted from the start; the inputs are made outside the trace. `unet_config`:
    another denoiser config of the family's class (the tests' small one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = unet_config or (FAMILIES[family]["unet"] if depth is None else reduced_config(family, depth))
    inputs = step_inputs(family, resolution, batch, config=config)
    with torch.random.fork_rng(devices=[]), (torch.device("meta") if fake else contextlib.nullcontext()):
        torch.manual_seed(0)
        with default_dtype(torch.bfloat16):
            model = build(family, "unet", config)
        model.requires_grad_(False)
        add_lora(model, default_lora_targets(family), rank)
    mode = FakeTensorMode(allow_non_fake_inputs=False) if fake else contextlib.nullcontext()
    with mode:
        if fake:  # the meta model's tensors become fake ones of the same shapes and dtypes
            _materialize(model)
            inputs = tuple(_to_fake(mode, x) for x in inputs)
        noisy, timesteps, conditioning, target = inputs
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in adapters:
            p.requires_grad_(True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        params = [*model.parameters(), *model.buffers()]
        with LiveBytes(params) as tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = _denoise(family, model, noisy, timesteps, conditioning)
                loss = F.mse_loss(pred.float(), target)
            loss.backward()
        gradients = sum(_nbytes(p.grad) for p in adapters if p.grad is not None)
    return StepTrace(
        family=family, resolution=resolution, batch=batch, depth=depth, fake=fake, peak_bytes=tracker.peak,
        parameter_bytes=tracker.start, gradient_bytes=gradients,
        activation_bytes=tracker.peak - tracker.start - gradients, lora_parameters=sum(p.numel() for p in adapters))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


class LiveBytes(TorchDispatchMode):
    """The bytes of every tensor storage alive, from its allocation to its release, and their peak: an
    allocator's view of a computation, on any tensors, fake ones included (no caching or rounding).

    Every output of every op is seen (forward and backward run on this thread for CPU tensors); storages
    are told apart by identity and released through a weak reference, so views and in-place ops add
    nothing. `tensors`: what is alive when it starts (the model's weights), counted in `start`."""

    def __init__(self, tensors=()):
        super().__init__()
        self._alive = WeakIdKeyDictionary()
        self.now = self.peak = 0
        for tensor in tensors:
            self._see(tensor)
        self.start = self.now

    def _see(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._alive:
            return
        size = storage.nbytes()
        self._alive[storage] = weakref.ref(storage, lambda _, size=size: self._release(size))
        self.now += size
        self.peak = max(self.peak, self.now)

    def _release(self, size: int) -> None:
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self._see(value)
        return out


def _materialize(model: torch.nn.Module) -> None:
    """Replace a meta model's parameters and buffers by fresh tensors of the current mode (fake ones), by
    assignment: Module.to() would swap storages, which a fake tensor's cannot be."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                              requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)


def _to_fake(mode, value):
    if isinstance(value, dict):
        return type(value)({k: mode.from_tensor(v) for k, v in value.items()})
    return mode.from_tensor(value)


# ------------------------------------------------------------------ the estimate
TARGETS_GB = {"sdxl": 24.0, "flux": 40.0}  # issue 13: SDXL LoRA in 24 GB, FLUX.1 LoRA in 40 GB, at 1024 px


def estimate_lora(family: str, trace: StepTrace, rank: int = 4, optimizer: str = "adamw8bit") -> dict:
    """Peak GPU memory of a LoRA run of hardware=low_memory at the traced step's resolution and batch, as a
    sum of named parts (bytes), with and without the text encoders on the GPU during training.

    - the step (traced): the denoiser's bf16 weights and fp32 adapters, the step's activations and
      temporaries at its peak, the adapters' fp32 gradients;
    - the optimizer state of the adapters (`adam_state_bytes`, per LoRA tensor);
    - the frozen VAE and text encoders in bf16 (2 bytes per parameter, meta-device counts): the module keeps
      them on the device for the whole run today (the VAE encodes the photos once, the encoders each
      distinct prompt once per stage).
    Not in it: the CUDA context (~0.5 GB, outside torch's allocator) and the allocator's fragmentation
    (reserved - allocated), which the GPU script measures."""
    counts = parameter_counts(family)
    state = sum(adam_state_bytes(math.prod(shape), optimizer) for shape in lora_shapes(family, rank))
    parts = {
        "denoiser weights (bf16) + adapters (fp32)": trace.parameter_bytes,
        "activations and temporaries at the step's peak": trace.activation_bytes,
        "adapter gradients (fp32)": trace.gradient_bytes,
        f"optimizer state ({optimizer})": state,
        "VAE (bf16)": 2 * counts["vae"],
    }
    encoders = {name: 2 * counts[name] for name in ("text_encoder", "text_encoder_2")}
    without = sum(parts.values())
    return {"family": family, "hub_id": HUB_IDS[family], "resolution": trace.resolution, "batch": trace.batch,
            "rank": rank, "optimizer": optimizer, "lora_parameters": trace.lora_parameters, "parts": parts,
            "text_encoders": encoders, "total_bytes": without + sum(encoders.values()),
            "total_without_text_encoders_bytes": without, "target_gb": TARGETS_GB[family]}


def method_memory(family: str, rank: int = 4) -> dict:
    """What each kind of method trains on the real shapes, and its fp32 weights, gradients and optimizer
    state (bytes): LoRA on the denoiser, or the whole denoiser (DreamBooth, fine-tuning), with torch
    AdamW and 8-bit AdamW. Parameters only: the activations are the traced step's."""
    lora = [math.prod(shape) for shape in lora_shapes(family, rank)]
    with torch.device("meta"):
        denoiser = [p.numel() for p in build(family, "unet").parameters()]
    out = {}
    for name, tensors in (("lora", lora), ("denoiser (dreambooth, finetune)", denoiser)):
        n = sum(tensors)
        out[name] = {"parameters": n, "weights_fp32": 4 * n, "gradients_fp32": 4 * n,
                     **{f"state_{opt}": sum(adam_state_bytes(t, opt) for t in tensors) for opt in ("adamw", "adamw8bit")}}
    return out


def format_estimate(est: dict) -> str:
    gb = lambda b: f"{b / GB:7.2f} GB"  # noqa: E731
    lines = [f"{est['family']} ({est['hub_id']}) LoRA rank {est['rank']}, {est['resolution']} px, batch {est['batch']}, "
             f"hardware=low_memory ({est['optimizer']}), {est['lora_parameters']:,} adapter parameters"]
    lines += [f"  {gb(v)}  {k}" for k, v in est["parts"].items()]
    lines.append(f"  {gb(est['total_without_text_encoders_bytes'])}  = with the text encoders off the GPU")
    lines += [f"  {gb(v)}  {k} (bf16)" for k, v in est["text_encoders"].items()]
    lines.append(f"  {gb(est['total_bytes'])}  = as the module runs today (target {est['target_gb']:.0f} GB)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    import argparse
    import json
    import time

    p = argparse.ArgumentParser(prog="python -m benchmarks.big_shapes",
                                description="Parameter, optimizer-state and traced activation memory of SDXL and "
                                            "FLUX.1-dev LoRA at their real shapes (CPU, fake tensors; docs/benchmark.md)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=None, help="photos per step (default: conf/method/lora.yaml's batch_size)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: conf/method/_common.yaml's)")
    p.add_argument("--families", default="sdxl,flux")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    from benchmarks.catalog import composed_method

    lora = composed_method("lora")
    batch, rank = args.batch or int(lora["batch_size"]), args.rank or int(lora["lora"]["rank"])
    result = {}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        if family not in FAMILIES:
            p.error(f"--families has {family!r}: choose from {', '.join(FAMILIES)}")
        start = time.perf_counter()
        trace = trace_lora_step(family, args.resolution, batch, rank)
        est = estimate_lora(family, trace, rank)
        result[family] = {"estimate": est, "parameters": parameter_counts(family), "methods": method_memory(family, rank),
                          "trace_s": time.perf_counter() - start}
        print(format_estimate(est), flush=True)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
