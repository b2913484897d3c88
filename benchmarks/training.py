"""Training-step figures of one method: ours ÷ floor, naive ÷ ours, peak memory, fixed costs.

Ours is the real thing: `prepare_run` builds the run from the composed `train` config and
`personalize.train.fit` itself trains it (its Trainer, callbacks, precision, logger, progress bar), with
one callback of ours put first. That callback timestamps every step end; right after a timed step it
runs one *floor* step (and every `naive_every` steps one *naive* step, alternating their order), so they
are measured interleaved under the same machine load. Ours is the time from the end of the previous side
step to the end of this step: the Lightning loop, the data loader, the logging and the callbacks are in it.
A method with a prior loss finds its class images already in the run's (temporary) class-image cache:
placeholders, since their content does not change a step's cost (`placeholder_class_images`).

The floor has the trainable set of the stage and nothing else: fixed noised latents, timesteps, targets
and prompt embeddings already on the device; one step is `zero_grad`, UNet forward, MSE, backward and
an optimizer step of the stage's algorithm in its fastest standard implementation (torch AdamW with
`fused=True` where the stage uses torch AdamW; the stage's own optimizer otherwise, e.g. 8-bit AdamW).
No gradient clipping, no logging, no data. It processes the rows one optimizer step of ours does: with
`gradient_accumulation_steps` k, k micro-batches of `batch_size` rows (and as many class rows), each a
forward and a backward, then one optimizer step (a floor of one micro-batch would make the ratio read
~k). What the step cannot do without is in the floor too: when the text side trains (the new token,
the text encoder or its LoRA), the text-encoder forward of each distinct prompt, once per step, because
the gradient must reach it through that forward; with random crops (`method.data.crop=random`), the VAE
encode of the step's photos, because a fresh crop has no cached latents. Same precision (autocast)
context as ours.

The naive path is what the diffusers training examples do every step: tokenize the batch's prompts,
VAE-encode the batch's pixels and run the text encoder on every example, then noise, UNet, loss (with
the prior term), backward, gradient clipping and the stage's own optimizer (as configured); with
accumulation, k such micro-batches (VAE and text encoder on each) before the one optimizer step.

At the end of each stage the parts of the difference are timed alone (`components`): the stage's own
optimizer step, the floor's, and the gradient clipping the method asks for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from benchmarks.measure import Clock, peak_memory, reset_peak_memory, rss_mb, timed
from personalize.backbones import Conditioning, ImageInfo
from personalize.backbones.objectives import Draw
from personalize.class_images import image_path
from personalize.config import compose
from personalize.data import DataSettings, Subject, load_subject_images
from personalize.io import atomic_save_image
from personalize.methods.stages import parse_stages, stage_at
from personalize.methods.trainables import encodes_prompt
from personalize.train import class_image_spec, fit, prepare_run

log = logging.getLogger(__name__)

@dataclass
class Plan:
    warmup: int = 2  # steps of each path not timed at the start of each stage
    steps: int = 8  # timed steps of each path per stage
    class_images: int = 8  # placeholder class images (their content does not change the step time)
    save_reps: int = 2  # timed checkpoint saves per stage
    naive_every: int = 1  # one naive step after every n-th timed step (it is slower and only informative)
    progress_bar: bool | None = None  # None: as the config says (the real default: on)


# ------------------------------------------------------------------ the floor and the naive step
class _Path:
    """State shared by the floor and the naive step of one stage: its optimizer and precision."""

    def __init__(self, module, stage, trainer):
        self.module, self.stage = module, stage
        self.device = module.device
        # A fresh optimizer of the same kind, over the same parameters, as the stage's own.
        self.optimizer = module.configure_optimizers()[module.stages.index(stage)]
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        # what the stage trains needs gradients: already so in the stage being trained, and set here for a
        # module no Trainer runs (the plain method's, whose floor is a variant's yardstick)
        for param in self.params:
            param.requires_grad_(True)
        self.context = trainer.precision_plugin.forward_context
        self.scaler = torch.amp.GradScaler("cuda") if str(trainer.precision) in ("16-mixed", "16") else None
        self.text_trains = encodes_prompt(stage.train)  # the prompt is encoded with gradients
        self.prior = stage.prior_loss_weight > 0
        self.batch = module.batch_size  # instance rows per micro-batch (and as many class rows with a prior)
        self.accumulation = module.accumulation  # micro-batches per optimizer step

    def _encode(self, prompts: list[str]) -> Conditioning:
        """The backbone's prompt conditioning (SD: one encoder; SDXL: both and the pooled output; FLUX: CLIP
        pooled + T5), with each row's image conditioning (SDXL's time ids of a photo at the resolution)."""
        m = self.module
        size = (int(m._images["instance"].shape[-1]),) * 2
        cond = m.backbone.encode_prompt(m.components, prompts, self.device)
        return cond | m.backbone.image_conditioning([ImageInfo(size)] * len(prompts), self.device)

    def _denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        m = self.module
        return m.backbone.denoise(m.components, noisy, timesteps, cond)

    def _backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """One micro-batch's backward; its loss is weighted by its share of the step's rows."""
        if self.accumulation > 1:
            loss = loss / self.accumulation
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(retain_graph=retain_graph)

    def _step(self, clip: float = 0.0) -> None:
        """The optimizer step after the step's last backward (with the clipping the method asks for)."""
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.optimizer.step()


def fastest_equivalent(optimizer):
    """The same update in its fastest standard implementation: torch AdamW -> AdamW(fused=True), with the
    same parameter groups (a trainable's own lr stays its own)."""
    if type(optimizer) is not torch.optim.AdamW or optimizer.defaults.get("fused"):
        return optimizer
    keys = ("params", "lr", "betas", "eps", "weight_decay")
    try:
        return torch.optim.AdamW([{k: group[k] for k in keys} for group in optimizer.param_groups], fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return optimizer


class FloorStep(_Path):
    """UNet forward + backward + optimizer step on cached latents and embeddings (see the module doc)."""

    def __init__(self, module, stage, trainer, latent_shape: tuple[int, int, int], crop_size: int | None = None):
        """`crop_size`: the resolution, where the method takes random crops (`method.data.crop=random`)."""
        super().__init__(module, stage, trainer)
        self.optimizer = fastest_equivalent(self.optimizer)
        n = self.batch * (2 if self.prior else 1)  # UNet rows of one micro-batch
        g = torch.Generator().manual_seed(0)
        shape = (self.accumulation, n, *latent_shape)  # [micro-batch, row, ...]: the rows of one optimizer step
        self.noisy = torch.randn(*shape, generator=g).to(self.device)
        self.target = torch.randn(*shape, generator=g).to(self.device)
        # timesteps of the objective's own schedule (DDPM: integers in [0, 1000); flow matching: its table)
        draw = module.objective.draw((shape[0] * shape[1], *latent_shape),
                                     lambda s: torch.randn(*s, generator=g),
                                     lambda lo, hi, n: torch.randint(lo, hi, (n,), generator=g))
        self.timesteps = draw.timesteps.view(shape[:2]).to(self.device)
        # random crops: the step's photos as pixels, VAE-encoded every step (their latents replace the
        # instance rows' fixed ones, so the encode is used, as ours uses it)
        self.crops = None
        if crop_size:
            pixels = torch.rand(self.accumulation * self.batch, 3, crop_size, crop_size, generator=g) * 2 - 1
            self.crops = pixels.to(self.device)
        self.prompts = [module.instance_prompt] + ([module.class_prompt] if self.prior else [])
        self.embeds = None
        if not self.text_trains:
            with torch.no_grad(), self.context():
                self.embeds = self._rows()

    def _rows(self) -> Conditioning:
        """One micro-batch's conditioning, [instance]*B (+ [class]*B), from one encode per distinct prompt."""
        cond = self._encode(self.prompts)
        return Conditioning({k: v.repeat_interleave(self.batch, dim=0) for k, v in cond.items()})

    def _noisy(self) -> torch.Tensor:
        """The step's noised inputs [micro-batch, row, ...]; with random crops the instance rows come from
        this step's VAE encode (as ours: one encode of all the step's photos, then noised)."""
        if self.crops is None:
            return self.noisy
        m = self.module
        with torch.no_grad():
            dist = m.vae.encode(self.crops.to(m.vae.dtype)).latent_dist
            latents, _ = m.backbone.latent_distribution(m.vae, dist.mean.float(), dist.std.float())
        rows = self.target[:, :self.batch].flatten(0, 1)  # the instance rows' noise, one row per photo
        instance = m.objective.noisy(latents, Draw(rows, self.timesteps[:, :self.batch].flatten()))
        instance = instance.view(self.accumulation, self.batch, *instance.shape[1:])
        return torch.cat([instance, self.noisy[:, self.batch:]], dim=1)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.context():
            noisy = self._noisy()
            # one text-encoder forward per step, its graph kept for every micro-batch's backward (as ours)
            embeds = self._rows() if self.text_trains else self.embeds
            for i in range(self.accumulation):
                pred = self._denoise(noisy[i], self.timesteps[i], embeds)
                loss = F.mse_loss(pred, self.target[i])
                last = i == self.accumulation - 1
                self._backward(loss, retain_graph=self.text_trains and not last)
        self._step()


class NaiveStep(_Path):
    """What the diffusers training examples do each step: VAE and text encoder on every example."""

    def __init__(self, module, stage, trainer, instance_pixels: torch.Tensor, class_pixels: torch.Tensor | None,
                 max_grad_norm: float):
        super().__init__(module, stage, trainer)
        self.instance_pixels, self.class_pixels = instance_pixels, class_pixels
        self.max_grad_norm = max_grad_norm
        self.rng = np.random.default_rng(0)

    def _micro_batch(self) -> None:
        """Forward and backward of one micro-batch, the data loader's work and both encoders included."""
        m, b = self.module, self.batch
        # the data loader's work: pick the examples, tokenize their prompts, move pixels to the device
        pixels = self.instance_pixels[self.rng.integers(len(self.instance_pixels), size=b)]
        prompts = [m.instance_prompt] * b
        if self.prior:
            pixels = torch.cat([pixels, self.class_pixels[self.rng.integers(len(self.class_pixels), size=b)]])
            prompts += [m.class_prompt] * b
        pixels = pixels.to(self.device, m.vae.dtype)

        with self.context():
            with torch.no_grad():
                dist = m.vae.encode(pixels).latent_dist
                mean, std = m.backbone.latent_distribution(m.vae, dist.mean.float(), dist.std.float())
                latents = mean + std * torch.randn_like(mean)  # latent_dist.sample(), shifted and scaled
            with contextlib.nullcontext() if self.text_trains else torch.no_grad():
                embeds = self._encode(prompts)  # every example's prompt, tokenized and encoded
            draw = m.objective.draw(tuple(latents.shape), lambda s: torch.randn(*s, device=self.device),
                                    lambda lo, hi, n: torch.randint(lo, hi, (n,), device=self.device))
            pred = self._denoise(m.objective.noisy(latents, draw), draw.timesteps, embeds)
            target = m.objective.target(latents, draw)
            loss = F.mse_loss(pred[:b], target[:b])
            if self.prior:
                loss = loss + self.stage.prior_loss_weight * F.mse_loss(pred[b:], target[b:])
        self._backward(loss)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.accumulation):  # accelerate's accumulate(): step after the k-th micro-batch
            self._micro_batch()
        self._step(clip=self.max_grad_norm)


def components(floor: FloorStep, naive: NaiveStep, clock: Clock, reps: int = 3) -> dict:
    """Seconds of the parts that differ between ours and the floor, each timed alone (median of `reps`).

    Run right after a floor step, so the gradients are there (both paths train the same tensors): the
    stage's own optimizer step (the naive path's), the floor's, and the clipping of the method's config.
    """
    out = {"optimizer_own_s": statistics.median(timed(naive.optimizer.step, clock, reps)),
           "optimizer_floor_s": statistics.median(timed(floor.optimizer.step, clock, reps)),
           "optimizer_own": type(naive.optimizer).__name__ + _impl(naive.optimizer),
           "optimizer_floor": type(floor.optimizer).__name__ + _impl(floor.optimizer)}
    if naive.max_grad_norm:
        out["clip_s"] = statistics.median(
            timed(lambda: torch.nn.utils.clip_grad_norm_(naive.params, naive.max_grad_norm), clock, reps))
    return out


def _impl(optimizer) -> str:
    d = optimizer.defaults
    if d.get("fused"):
        return " (fused)"
    if d.get("foreach") or (d.get("foreach") is None and optimizer.param_groups[0]["params"][0].is_cuda):
        return " (foreach)"
    return " (for-loop)" if "foreach" in d else ""


# ------------------------------------------------------------------ the callback that interleaves
class SyncCounter:
    """Host-device synchronisations inside our step (CUDA only), from torch's sync debug mode.

    Counted over a step's whole cycle but for the benchmark's own work (`.item()`, `float(tensor)`, a
    device-to-host copy... in the step, the other callbacks, Lightning's logger connector and progress
    bar, the loop): each one stalls the CPU until the GPU has caught up, so launches cannot run ahead.
    """

    def __init__(self):
        self._catcher = None
        self._seen = None

    def start(self) -> None:
        try:
            self._catcher = warnings.catch_warnings(record=True)
            self._seen = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        except Exception:  # noqa: BLE001 - a diagnostic must never break the measurement
            self._catcher = None

    def stop(self) -> int | None:
        if self._catcher is None:
            return None
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        self._catcher = None
        return sum("synchroniz" in str(w.message) for w in self._seen)


class InterleavedTimer(L.Callback):
    """Times each of our steps and, after each timed one, a floor step (and every `naive_every`-th time a
    naive step; the order of the two alternates).

    Per stage: `warmup` steps of ours untimed; then `warmup` floor and naive steps untimed; then for each
    further step of ours its side steps. The peak memory of a stage is read before its floor and naive
    steps first run, so it is what our training alone needs.
    """

    def __init__(self, plan: Plan, make_floor, make_naive, clock: Clock, device, make_yardstick=None):
        """`make_yardstick`: for an option variant, builds the plain method's floor (`plain_floor_maker`),
        timed after each step like the others (record `plain_floor`)."""
        self.plan, self.make_floor, self.make_naive, self.clock, self.device = plan, make_floor, make_naive, clock, device
        self.make_yardstick = make_yardstick
        self.stages: dict[str, dict] = {}
        self._resume = None  # when our loop got control back after the last side work
        self._batch_start = None
        self._stage = None
        self._paths = None
        self.syncs = SyncCounter() if torch.device(device).type == "cuda" else None
        self._pending = None  # (stage record, syncs counted so far) of the step whose cycle is still counted

    def on_train_start(self, trainer, module) -> None:
        self._resume = self.clock()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.syncs is not None and self._pending is not None:  # the rest of the previous step's cycle
            rec, counted = self._pending
            rest = self.syncs.stop()
            if counted is not None and rest is not None:
                rec.setdefault("syncs", []).append(counted + rest)
            self._pending = None
        stage = stage_at(module.stages, trainer.global_step)
        if stage is not self._stage:
            if self._stage is not None:  # a later stage: measure its memory from here
                self._paths = None
                reset_peak_memory(self.device)
                self._resume = self.clock()
            self._stage = stage
            self.stages[stage.name] = {"train": list(stage.train), "prior": stage.prior_loss_weight > 0,
                                       "rss_at_start_mb": rss_mb(), "ours": [], "ours_in_step": [],
                                       "ours_loop": [], "floor": [], "naive": [], "naive_j": []}
            if self.make_yardstick is not None:
                self.stages[stage.name]["plain_floor"] = []
        self._batch_start = self.clock()
        if self.syncs is not None and trainer.global_step - stage.start >= self.plan.warmup:
            self.syncs.start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        syncs = self.syncs.stop() if self.syncs is not None else None
        end = self.clock()
        stage = self._stage
        k = trainer.global_step - 1 - stage.start  # index of this step within its stage
        rec = self.stages[stage.name]
        if k >= self.plan.warmup:
            rec["ours"].append(end - self._resume)
            rec["ours_in_step"].append(end - self._batch_start)
            rec["ours_loop"].append(self._batch_start - self._resume)
        if self._paths is None and k >= self.plan.warmup - 1:  # ours is warm: memory, then the side paths
            rec.update(peak_memory(self.device))
            floor, naive = self.make_floor(module, stage, trainer), self.make_naive(module, stage, trainer)
            yardstick = self.make_yardstick(module, stage, trainer) if self.make_yardstick is not None else None
            self._paths = (floor, naive, yardstick)
            for _ in range(max(self.plan.warmup, 1)):  # the first step allocates the optimizer state
                for step in filter(None, self._paths):
                    step()
        if k >= self.plan.warmup:
            floor, naive, yardstick = self._paths
            j = k - self.plan.warmup  # index of this timed step
            sides = [("floor", floor)] + ([("plain_floor", yardstick)] if yardstick is not None else [])
            if j % self.plan.naive_every == 0:
                sides.append(("naive", naive))
                rec["naive_j"].append(j)
            turn = (j // self.plan.naive_every) % len(sides)  # which side goes first rotates
            sides = sides[turn:] + sides[:turn]
            for name, step in sides:
                start = self.clock()
                step()
                rec[name].append(self.clock() - start)
            if k == stage.steps - 1:  # the stage's last step: time the parts of the difference alone
                rec["components"] = components(floor, naive, self.clock)
        self._resume = self.clock()
        if syncs is not None:  # count on through the other callbacks, the logger connector and the loop
            self._pending = (rec, syncs)
            self.syncs.start()

    def on_train_end(self, trainer, module) -> None:
        if self.syncs is not None and self._pending is not None:
            self.syncs.stop()
            self._pending = None


# ------------------------------------------------------------------ one method, end to end
def placeholder_class_images(cfg) -> list[Path]:
    """Fill the run's class-image cache with random-noise pictures, where the cache would be read.

    A training step costs the same whatever the class images show, and generating real ones is timed
    apart (item 3): so `prepare_run` finds all `class_images.count` images cached and never loads the
    pipeline that would make them. Nothing is written for a method without a prior loss.
    """
    if not any(stage.prior_loss_weight > 0 for stage in parse_stages(cfg.method.stages)):
        return []
    spec = class_image_spec(cfg, Subject.from_cfg(cfg.subject))
    folder = spec.folder(Path(cfg.paths.class_image_dir))
    size = int(cfg.model.resolution)
    paths = []
    for i in range(int(cfg.class_images.count)):
        pixels = np.random.default_rng(spec.seed + i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        atomic_save_image(Image.fromarray(pixels), image_path(folder, i))
        paths.append(image_path(folder, i))
    return paths


def compose_method(method: str, model_dir: Path, resolution: int, hardware: str, work_dir: Path, plan: Plan,
                   overrides: list[str] = (), evaluation: list[str] | None = None):
    """The `train` config of `method` on the bench model, with each stage shortened to the plan.

    `evaluation`: overrides of conf/eval (None: eval=none). Also returns the method's stages and class
    image count as configured, for the end-to-end figure.
    """
    eval_overrides = ["eval=none"] if evaluation is None else ["eval=default", *evaluation]
    cfg = compose("train", [
        f"method={method}", "subject=sample_dog", f"model={model_config_of(model_dir)}",
        f"model.name=bench-{Path(model_dir).name}",
        f"model.pretrained={model_dir}", f"model.resolution={resolution}",
        "model.unet_sha256=null",  # random weights of SD 2.1's shapes, not the official file the hash names
        f"hardware={hardware}", "logger=none",
        *eval_overrides, f"paths.class_image_dir={work_dir / 'class_images'}", f"paths.log_dir={work_dir / 'logs'}",
        *overrides,
    ], output_dir=work_dir / "run")
    configured = {"stages": OmegaConf.to_container(cfg.method.stages, resolve=True),
                  "class_images": int(cfg.class_images.count)}
    cfg.class_images.count = plan.class_images
    for name in cfg.method.stages:
        cfg.method.stages[name].steps = plan.warmup + plan.steps
        cfg.method.stages[name].checkpoint_every = 0  # only the run's last step saves (timed apart, see TailClock)
    if plan.progress_bar is not None:
        cfg.trainer.progress_bar = plan.progress_bar
    return cfg, configured


# The model config of each pipeline class: its family's (model.backbone), with model.pretrained set to the folder
MODEL_CONFIGS = {"StableDiffusionPipeline": "sd21_base", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux_dev"}


def model_config_of(model_dir: Path) -> str:
    """The conf/model option a benchmark model folder runs under, from its model_index.json's pipeline class."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    return MODEL_CONFIGS[index["_class_name"]]


class TailClock(L.Callback):
    """Placed after every other callback: the time the run's own callbacks took at the last step.

    At the run's last step `ArtifactCheckpoint` saves a checkpoint (artifacts + resume state), so this is
    the real cost of one checkpoint.
    """

    def __init__(self, timer: InterleavedTimer):
        self.timer = timer
        self.last_callbacks_s = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.last_callbacks_s = self.timer.clock() - self.timer._resume


def instrumented_fit(run, first: L.Callback | None = None, last: L.Callback | None = None):
    """`personalize.train.fit` as it is, with `first` before and `last` after its own callbacks, and
    without the sampling and evaluation that follow training (timed apart)."""
    return fit(run, callbacks_before=[first] if first else [], callbacks_after=[last] if last else [],
               sample=False, evaluate=False)


def side_paths(cfg, resolution: int, class_images: int):
    """(make_floor, make_naive, the subject's photos) for a run of `cfg`: each maker builds its path on the
    run's module, stage and trainer (what InterleavedTimer calls once a stage's steps are warm)."""
    latent_shape = None  # the VAE's latent channels, read from the run's model when a maker is called
    instance_pixels = load_subject_images(Path(str(cfg.subject.data_dir)), resolution)
    class_pixels = torch.rand(class_images, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    max_norm = float(cfg.method.optimizer.get("max_grad_norm") or 0)
    crop_size = resolution if DataSettings.from_cfg(cfg.method).crop == "random" else None

    def make_floor(module, stage, trainer) -> FloorStep:
        factor = 2 ** (len(module.vae.config.block_out_channels) - 1)
        shape = latent_shape or (module.vae.config.latent_channels, resolution // factor, resolution // factor)
        return FloorStep(module, stage, trainer, shape, crop_size)

    def make_naive(module, stage, trainer) -> NaiveStep:
        return NaiveStep(module, stage, trainer, instance_pixels, class_pixels, max_norm)

    return make_floor, make_naive, instance_pixels


def plain_floor_maker(method: str, model_dir: Path, resolution: int, hardware: str, work_dir: Path, plan: Plan,
                      overrides: list[str] = ()):
    """For an option variant: a maker of the plain method's floor, the yardstick of its vs_plain row.

    The variant's steps and the plain method's run in different worker processes, one after the other, and a
    shared machine's load changes between them (in one run here the same floor took 2.0 s in one worker and
    1.1 s in the next). Both workers time the plain floor, the same work, interleaved with their steps, so
    each step is read against it: variant ÷ plain = (variant step ÷ plain floor) ÷ (plain step ÷ plain
    floor), each a ratio of neighbours in time. The plain method's module is built when the maker is first
    called (after the stage's peak memory was read), on the variant's device."""
    built = {}

    def make(module, stage, trainer) -> FloorStep:
        if "run" not in built:
            cfg, _ = compose_method(method, model_dir, resolution, hardware, work_dir, plan, overrides)
            placeholder_class_images(cfg)
            built["run"] = prepare_run(cfg)
            built["run"].module.to(module.device)
            built["cfg"] = cfg
        plain = built["run"].module
        plain_stage = next(s for s in plain.stages if s.name == stage.name)
        make_floor, _, _ = side_paths(built["cfg"], resolution, plan.class_images)
        return make_floor(plain, plain_stage, trainer)

    return make


def bench_method(method: str, model_dir: Path, resolution: int, hardware: str, plan: Plan,
                 overrides: list[str] = (), work_dir: Path | None = None,
                 plain: tuple[str, list[str]] | None = None) -> dict:
    """Every training figure of one method (all of its stages), measured in this process.

    `plain`: for an option variant, its plain method and that method's overrides: the plain floor is timed
    beside each step too (`plain_floor_maker`)."""
    own_dir = work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix=f"bench-{method}-")) if own_dir else Path(work_dir)
    try:
        cfg, configured = compose_method(method, model_dir, resolution, hardware, work_dir, plan, overrides)
        placeholder_class_images(cfg)
        start = time.perf_counter()
        run = prepare_run(cfg)
        prepare_s = time.perf_counter() - start
        module, device = run.module, run.device
        clock = Clock(device)

        make_floor, make_naive, instance_pixels = side_paths(cfg, resolution, plan.class_images)
        yardstick = None if plain is None else plain_floor_maker(plain[0], model_dir, resolution, hardware,
                                                                 work_dir / "plain", plan, plain[1])
        timer = InterleavedTimer(plan, make_floor, make_naive, clock, device, make_yardstick=yardstick)
        tail = TailClock(timer)
        fit_start = time.perf_counter()
        instrumented_fit(run, timer, tail)
        fit_s = time.perf_counter() - fit_start

        # fixed costs: latent caching (per photo) and the artifacts of a checkpoint in each stage
        flip = 2 if cfg.method.get("flip", False) else 1
        prior = any(stage.prior_loss_weight > 0 for stage in module.stages)
        n_images = (len(instance_pixels) + (plan.class_images if prior else 0)) * flip
        cache_s = timed(module.cache_latents, clock, reps=2)
        artifacts = {}
        for stage in module.stages:
            seconds = []
            for i in range(plan.save_reps):
                start = clock()
                module.save_artifacts(work_dir / "saves" / f"{stage.name}-{i}", stage.end)
                seconds.append(clock() - start)
            contents = sorted(p.name for p in (work_dir / "saves" / f"{stage.name}-0").iterdir())
            artifacts[stage.name] = {"seconds": seconds, "contents": contents}
            shutil.rmtree(work_dir / "saves", ignore_errors=True)
        return {
            "method": method, "overrides": list(overrides), "accelerator": run.accelerator, "precision": run.precision,
            "device": str(device), "hardware": hardware, "batch_size": module.batch_size,
            "configured": configured, "stages": timer.stages,
            "prepare_s": prepare_s, "fit_s": fit_s, "threads": torch.get_num_threads(),
            "latent_cache_s": min(cache_s), "latent_cache_images": n_images, "photos": len(instance_pixels) * flip,
            "class_images_in_run": plan.class_images * flip if prior else 0,
            "checkpoint_s": tail.last_callbacks_s, "artifacts_save": artifacts,
        }
    finally:
        if own_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
