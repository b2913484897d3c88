"""A few LoRA training steps of SDXL and FLUX.1 at their real shapes on one GPU: step time and peak memory.

    python -m benchmarks.gpu_backbones --wheels wheels/ --out outputs/bench/gpu_backbones.json   # on a GPU
    python -m benchmarks.gpu_backbones --tiny                                                     # CPU smoke path

The models are built in memory with random weights from the published configs (benchmarks/big_shapes.py:
SDXL base 1.0's UNet, VAE and two CLIP encoders; FLUX.1-dev's 12B transformer, VAE, CLIP and T5-XXL),
directly on the device in bf16: nothing is written to disk and no hub is asked. Each family is trained by
the project's own module (`personalize.methods.module.Personalizer`, the `lora` method of conf/method
with the family's default LoRA targets) under a Lightning Trainer with the low-memory preset
(conf/hardware/low_memory.yaml: bf16 autocast, frozen parts in bf16, gradient checkpointing, 8-bit AdamW)
at 1024 px and the method's batch size. It records, per family:

- `as_today`: the peak CUDA memory (allocated and reserved) of the first steps, every component on the GPU
  as the module keeps them now;
- `text_encoders_off`: the peak of the following steps after the text encoders were moved to the CPU (the
  prompt's embedding is cached after the first step, so nothing uses them): what the proposed change of
  the module (docs/benchmark.md) saves, measured;
- the step times (wall clock between step ends, the GPU synchronised), after the warm-up.

`--tiny` runs the same code on small models of the same classes on CPU (bf16 autocast, checkpointing,
8-bit AdamW where bitsandbytes is installed): the test suite runs it so the script is not dead code.

The GPU machine of this project has torch, lightning, peft and transformers but not diffusers, hydra-core,
omegaconf or bitsandbytes: `--wheels DIR` installs those from wheel files in DIR first (pip, no index).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

NEEDED = {"diffusers": "diffusers", "hydra": "hydra-core", "omegaconf": "omegaconf", "bitsandbytes": "bitsandbytes"}


def install_wheels(folder: str | None) -> None:
    """pip-install from `folder` (no index) whichever of NEEDED is not importable; without a folder, say
    what is missing in one line."""
    missing = [pkg for module, pkg in NEEDED.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return
    if folder is None:
        raise SystemExit(f"gpu_backbones: {', '.join(missing)} not installed: pass --wheels DIR with their wheel files")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", folder, *missing], check=True)
    importlib.invalidate_caches()


# Small models of the same classes, for --tiny (CPU): widths and depths cut, everything else as published.
def tiny_configs(family: str) -> dict[str, dict]:
    from benchmarks.big_shapes import FAMILIES

    real = FAMILIES[family]
    text = dict(real["text_encoder"], hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=32)
    vae = dict(real["vae"], block_out_channels=(32, 32, 32, 32), sample_size=64)
    if family == "sdxl":
        return {"unet": dict(real["unet"], block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
                             transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64, addition_time_embed_dim=8,
                             projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=8),
                "vae": vae, "text_encoder": text,
                "text_encoder_2": dict(real["text_encoder_2"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, projection_dim=32)}
    return {"unet": dict(real["unet"], num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
            "vae": vae, "text_encoder": text,
            "text_encoder_2": dict(real["text_encoder_2"], d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2)}


def build_components(family: str, tiny: bool, device, frozen_dtype, work: Path):
    """The family's Components, built on `device` in `frozen_dtype` (random weights), with tokenizers of the
    project vocabulary (the text encoders' tables keep their real sizes) and the family's training scheduler."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from benchmarks.big_shapes import build, default_dtype
    from benchmarks.models import build_tokenizer
    from personalize.backbones.flux import FluxComponents
    from personalize.backbones.sdxl import SDXLComponents
    from personalize.tiny_flux import build_t5_tokenizer

    configs = tiny_configs(family) if tiny else None
    parts = {}
    with torch.random.fork_rng(devices=[]), torch.device(device), default_dtype(frozen_dtype):
        torch.manual_seed(0)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            parts[name] = build(family, name, None if configs is None else configs[name]).eval()
    tokenizer = build_tokenizer(work / "tokenizer", parts["text_encoder"].config.vocab_size)
    if family == "sdxl":
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
        return SDXLComponents(tokenizer, parts["text_encoder"], parts["vae"], parts["unet"], scheduler,
                              extra={"tokenizer_2": tokenizer, "text_encoder_2": parts["text_encoder_2"]})
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxComponents(tokenizer, parts["text_encoder"], parts["vae"], parts["unet"], scheduler,
                          extra={"tokenizer_2": build_t5_tokenizer(work / "tokenizer_2"),
                                 "text_encoder_2": parts["text_encoder_2"]},
                          folders={"unet": "transformer"})


def settings(family: str, tiny: bool, steps: int):
    """(model config, method settings, hardware settings) of a `lora` run with hardware=low_memory (on CPU
    for --tiny: the cpu preset with low_memory's switches and bf16)."""
    from omegaconf import OmegaConf

    from personalize.backbones import backbone_for
    from personalize.config import compose
    from personalize.devices import HardwareSettings
    from personalize.methods.settings import MethodSettings

    model = {"sdxl": "tiny_sdxl" if tiny else "sdxl", "flux": "tiny_flux" if tiny else "flux_dev"}[family]
    cfg = compose("train", ["method=lora", f"model={model}", "hardware=cpu" if tiny else "hardware=low_memory",
                            "subject=sample_dog", "logger=none", "eval=none"], output_dir=tempfile.mkdtemp())
    cfg.method.stages.lora.steps = steps
    cfg.method.stages.lora.checkpoint_every = 0  # nothing is saved: the steps are what is measured
    backbone = backbone_for(cfg.model)
    OmegaConf.update(cfg, "method.lora.target_modules", list(backbone.default_lora_targets))
    hardware = HardwareSettings.from_cfg(cfg.hardware)
    if tiny:  # low_memory's switches on CPU (its accelerator is the GPU)
        low = HardwareSettings.from_cfg(compose("train", ["hardware=low_memory"], output_dir=tempfile.mkdtemp()).hardware)
        hardware = dataclasses.replace(hardware, precision="bf16-mixed", frozen_dtype="bfloat16",
                                       gradient_checkpointing=low.gradient_checkpointing, optimizer=low.optimizer)
    return cfg, MethodSettings.from_cfg(cfg.method), hardware, backbone


def run_family(family: str, tiny: bool, warmup: int, steps: int) -> dict:
    from benchmarks.measure import Clock
    from personalize.devices import resolve_hardware
    from personalize.methods.module import Personalizer

    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    total = 1 + warmup + steps  # step 1 caches the prompt; then the warm-up and timed steps, encoders off
    cfg, method, hardware, backbone = settings(family, tiny, total)
    accelerator, precision, frozen = resolve_hardware(dataclasses.replace(hardware, accelerator="gpu" if cuda else "cpu"))
    resolution = int(cfg.model.resolution)
    work = Path(tempfile.mkdtemp(prefix=f"gpu-{family}-"))
    clock = Clock(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = clock()
    L.seed_everything(0, verbose=False)
    components = build_components(family, tiny, device, frozen, work)
    build_s = clock() - start
    # as many random photos as the subject has (their latents are cached before the first step, as in a run)
    count = sum(1 for p in Path(str(cfg.subject.data_dir)).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = torch.rand(count, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = {"identifier": "sks", "phrase": "sks dog", "instance": "a photo of sks dog", "class": "a photo of dog",
               "captions": {}}
    module = Personalizer(components, method, prompts, photos, hardware=hardware, seed=0, backbone=backbone)
    timer = StepTimer(clock, offload_after=1, device=device)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=module.total_steps(),
                        callbacks=[timer], use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        default_root_dir=str(work))
    trainer.fit(module)
    times = timer.ends[1 + warmup:]
    step_s = [b - a for a, b in zip(times, times[1:])] if len(times) > 1 else []
    out = {"family": family, "tiny": tiny, "device": str(device), "precision": precision, "frozen_dtype": str(frozen),
           "resolution": resolution, "batch_size": method.batch_size, "optimizer": type(module.optimizers().optimizer).__name__
           if hasattr(module.optimizers(), "optimizer") else type(module.optimizers()).__name__,
           "gradient_checkpointing": hardware.gradient_checkpointing, "build_s": build_s,
           "parameters": {name: sum(p.numel() for p in part.parameters()) for name, part in
                          (("unet", components.unet), ("vae", components.vae), ("text_encoder", components.text_encoder),
                           ("text_encoder_2", components.extra["text_encoder_2"]))},
           "lora_parameters": sum(p.numel() for p in module.trainables["lora"].parameters()),
           "step_s": step_s, "step_s_median": sorted(step_s)[len(step_s) // 2] if step_s else None,
           "memory_gb": timer.memory,
           "loss_finite": timer.loss_finite}
    return out


class StepTimer(L.Callback):
    """Step-end timestamps and peak CUDA memory by phase: `latent_caching` (the module's on_fit_start: the VAE
    encodes the photos), `as_today` (up to step `offload_after`, every component on the device), then the
    text encoders go to the CPU and `text_encoders_off` is the peak of the remaining steps."""

    def __init__(self, clock, offload_after: int, device):
        self.clock, self.offload_after, self.device = clock, offload_after, device
        self.ends, self.memory, self.loss_finite = [], {}, True

    def on_train_start(self, trainer, module):
        self.memory["latent_caching"] = _peak(self.device)
        _reset_peak(self.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ends.append(self.clock())
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.loss_finite = self.loss_finite and bool(torch.isfinite(loss.detach()).all())
        if len(self.ends) == self.offload_after:
            self.memory["as_today"] = _peak(self.device)
            for encoder in (module.text_encoder, module.extra_components["text_encoder_2"]):
                encoder.to("cpu")  # the prompt's embedding is cached (the stage trains nothing of the text side)
            _reset_peak(self.device)

    def on_train_end(self, trainer, module):
        self.memory["text_encoders_off"] = _peak(self.device)


def _peak(device) -> dict | None:
    if torch.device(device).type != "cuda":
        return None
    return {"allocated_gb": torch.cuda.max_memory_allocated() / 1e9, "reserved_gb": torch.cuda.max_memory_reserved() / 1e9}


def _reset_peak(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_backbones", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small models of the same classes, on CPU (the tests' path)")
    p.add_argument("--families", default="sdxl,flux")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--wheels", default=None, help="folder of wheel files for what the machine lacks (diffusers, ...)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    install_wheels(args.wheels)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in ("sdxl", "flux")]
    if unknown:
        p.error(f"--families has {unknown[0]!r}: choose from sdxl, flux")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_backbones: no CUDA GPU is visible: the real shapes need one (or use --tiny on CPU)")
    results = {}
    for family in families:
        start = time.perf_counter()
        results[family] = run_family(family, args.tiny, args.warmup, args.steps)
        results[family]["wall_s"] = time.perf_counter() - start
        r = results[family]
        print(f"{family}: {r['step_s_median']} s/step (median of {len(r['step_s'])}), peak memory {r['memory_gb']}, "
              f"{r['wall_s']:.0f} s", flush=True)
        _reset_peak("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
