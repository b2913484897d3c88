"""One LightningModule for every method: the noise-prediction loss of latent diffusion, run stage by stage.

Nothing that can be hoisted out of the step runs in it:
- subject (and class) photos are VAE-encoded once; the step samples from the cached latent
  distribution (mean + std * noise), which is what encoding every step would give, at no cost;
- prompt embeddings are computed once per stage whenever nothing in the text encoder trains;
- frozen components never get gradients (requires_grad off, so autograd does not even record them).

Manual optimisation: each stage has its own optimizer over only what it trains (methods/optim.py: its
lr schedule is a function of the step), and the stage is a pure function of the global step, so a
resumed run lands in the right stage with the right optimizer and lr. Gradient accumulation runs the
step's rows through forward and backward `batch_size` at a time, then steps once.

Every random number of a step comes from one generator of the module, drawn for the whole global batch
on every rank, and the data order from one permutation of the whole run: N processes (or k accumulated
micro-batches) see what one process with N (or k) times the batch sees, and a resumed run (its
checkpoint holds the generator state and the data position) continues the exact sequence of the
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ParallelStrategy
from torch.utils.data import DataLoader, Dataset, Sampler

from personalize.backbones import Backbone, Components, Conditioning, ImageInfo, backbone_for
from personalize.backbones.objectives import Draw
from personalize import instrument
from personalize.data import crop_offsets, crop_square, crop_top_left
from personalize.devices import HardwareSettings
from personalize.errors import PersonalizeError
from personalize.io import atomic_dir
from personalize.methods.optim import LrSchedule, build_optimizer
from personalize.methods.settings import MethodSettings
from personalize.methods.stages import Stage, stage_at
from personalize.methods.token import NewTokenEmbedding
from personalize.methods.trainables import Trainable, attach, encodes_prompt
from personalize.prompts import PROMPT_TEMPLATES, ExamplePrompts
from personalize.resume import rng_state, set_rng_state
from personalize.rundir import CheckpointInfo, write_info

log = logging.getLogger(__name__)


class StepIndices(Dataset):
    """Item i = (instance image index, class image index, training prompt): one example of one step.

    The photos themselves are cached latents inside the module; the loader only decides which ones a
    step sees, in the order StepSampler gives (seeded, split over ranks, resumable), and with which
    prompt (`ExamplePrompts`: the photo's caption, a template drawn for position i, or the instance
    prompt), so the prompt of an example is a pure function of its position, like its photo.
    """

    def __init__(self, length: int, num_instance: int, num_class: int, prompts: ExamplePrompts | None = None,
                 num_photos: int | None = None):
        self.length, self.num_instance, self.num_class = length, num_instance, max(num_class, 1)
        self.prompts = prompts or ExamplePrompts(instance="")
        self.num_photos = num_photos or num_instance  # instance index % num_photos: the photo (flips included)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        instance = i % self.num_instance
        return instance, i % self.num_class, self.prompts.for_example(instance % self.num_photos, i)


class StepSampler(Sampler[int]):
    """This rank's dataset positions, step after step, from one seeded permutation of the whole run.

    Step s uses positions perm[s*G:(s+1)*G] (G = world_size * batch_size, the global batch) and rank r
    takes its `batch_size` of them, so the split over ranks changes nothing; `start_step` (set on
    resume) skips the steps already trained. It does the DDP split itself: the Trainer must not add a
    DistributedSampler (use_distributed_sampler=False).
    """

    def __init__(self, num_steps: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_steps, self.batch_size, self.seed = num_steps, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_step = 0

    def __len__(self) -> int:  # the whole run: Lightning counts batches from the restored position on
        return self.num_steps * self.batch_size

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        perm = torch.randperm(self.num_steps * global_batch, generator=torch.Generator().manual_seed(self.seed)).tolist()
        for step in range(self.start_step, self.num_steps):
            first = step * global_batch + self.rank * self.batch_size
            yield from perm[first:first + self.batch_size]


class StepLoader(DataLoader):
    """A DataLoader Lightning saves and restores with the checkpoint (it has state_dict/load_state_dict).

    Its state is the number of steps trained when the checkpoint was taken (one batch per step), which
    is exact even though Lightning prefetches a batch ahead.
    """

    def __init__(self, dataset: Dataset, sampler: StepSampler, steps_done):
        # a generator of its own: creating the iterator must not draw from the global RNG
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                         generator=torch.Generator())
        self._steps_done = steps_done

    def state_dict(self) -> dict:
        return {"steps_done": int(self._steps_done())}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.start_step = int(state["steps_done"])


class Personalizer(L.LightningModule):
    _lr_schedules: tuple[LrSchedule, ...] = ()  # one per stage, built with its optimizer (configure_optimizers)

    def __init__(self, components: Components, method: MethodSettings, prompts: dict, instance_images: torch.Tensor,
                 class_images: torch.Tensor | None = None, *, hardware: HardwareSettings,
                 checkpoint_info: dict | None = None, seed: int | None = None, backbone: Backbone | None = None,
                 uncropped_images: list[torch.Tensor] | None = None,
                 instance_sizes: tuple[tuple[int, int], ...] | None = None):
        """`method` and `hardware`: the run's settings, parsed once from the config (train.prepare_run) or
        built directly; `prompts`: identifier, phrase, instance, class, and `captions` ({photo name: filled
        caption or None}, in photo order); `uncropped_images`: with method.data.crop=random, each photo resized
        so its shorter side is the resolution (each step VAE-encodes random crops of them); `instance_sizes`:
        each photo's (height, width) before any resize, which a backbone may condition on (SDXL), default the
        images' own."""
        super().__init__()
        self.automatic_optimization = False
        # resume states hold only what trained (see on_save_checkpoint); the frozen rest comes from the base model
        self.strict_loading = False
        self.method = method
        self.hardware = hardware
        self.stages: list[Stage] = list(method.stages)
        self.trains = {t for stage in self.stages for t in stage.train}
        self.tokenizer = components.tokenizer
        self.text_encoder = components.text_encoder
        self.vae = components.vae
        self.unet = components.unet
        self.noise_scheduler = components.noise_scheduler
        self.components = components
        # what only some families have (SDXL's second text encoder): registered, so it moves with the module
        self.extra_components = torch.nn.ModuleDict(
            {name: part for name, part in components.extra.items() if isinstance(part, torch.nn.Module)})
        # the model family: prompt conditioning, objective, denoiser call (SD 1.x/2.x when not given)
        self.backbone = backbone or backbone_for(None)
        self.objective = self.backbone.objective(components, method.noise, method.loss)
        self.instance_prompt = prompts["instance"]
        self.class_prompt = prompts.get("class")
        self.identifier = prompts["identifier"]
        self.captions: dict[str, str | None] = dict(prompts.get("captions") or {})
        templates = method.prompt_templates
        self.example_prompts = ExamplePrompts(
            instance=self.instance_prompt, phrase=prompts.get("phrase", self.identifier),
            captions=tuple(self.captions.values()), templates=tuple(PROMPT_TEMPLATES[templates]) if templates else (),
            seed=method.data_seed,
        )
        self.checkpoint_info = checkpoint_info or {}
        self.seed = int(seed if seed is not None else self.checkpoint_info.get("seed", 0))
        self._generator: torch.Generator | None = None
        self._rng_to_restore: dict | None = None
        self.batch_size = method.batch_size
        # gradient accumulation: a step's rows are drawn (data, noise, timesteps) as one batch of
        # batch_size x accumulation rows, then run forward and backward batch_size rows at a time
        self.accumulation = method.gradient_accumulation_steps
        self.rows_per_step = method.rows_per_step
        self._images = {"instance": instance_images, "class": class_images}
        self._latents: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prompt_embeds: dict[str, Conditioning] = {}  # by prompt text, within a stage that encodes none with gradients
        self._cache_prompts = False  # whether the current stage encodes each distinct prompt once (_conditioning)
        self._uncropped = uncropped_images
        # each image's (height, width) before any resize: the photos' own; class images are made at the resolution
        self._sizes = {name: [tuple(images.shape[-2:])] * len(images)
                       for name, images in self._images.items() if images is not None}
        if instance_sizes:
            self._sizes["instance"] = list(instance_sizes)
        self._current_stage: Stage | None = None
        self._text_encoders_device: torch.device | None = None  # where offload_text_encoders put them; None: not moved

        if any(s.prior_loss_weight > 0 for s in self.stages) and class_images is None:
            raise PersonalizeError("a stage has prior_loss_weight > 0 but no class images were given")

        for module in (self.text_encoder, self.vae, self.unet, *self.extra_components.values()):
            module.requires_grad_(False)
        # what the stages train (and a new token even where no stage trains it any more), created on the components
        self.trainables: dict[str, Trainable] = attach(components, method, self.identifier, self.trains)
        if hardware.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if hardware.compile_unet:
            # in place (nn.Module.compile): the UNet keeps its class, so save_pretrained still works
            self.unet.compile()
        if hardware.gradient_checkpointing:
            for name in self.trains:
                self.trainables[name].enable_gradient_checkpointing()

    # ---------------------------------------------------------------- setup
    @property
    def token_embedding(self) -> NewTokenEmbedding | None:
        """The new token's embedding (its own fp32 row), where the method adds one."""
        token = self.trainables.get("token")
        return token.embedding if token is not None else None

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            # DDP registers, when it wraps the module (after this hook), only the parameters that require
            # grad at that moment. Register those of every stage; each stage then freezes the others, which
            # the strategy sees as unused parameters (hardware=ddp finds them; plain `ddp` is refused earlier).
            for s in self.stages:
                for param in self._trainable_params(s):
                    param.requires_grad_(True)

    def on_fit_start(self) -> None:
        self.cache_latents()

    def on_train_start(self) -> None:
        # after Lightning's setup and the dataloader: nothing between here and the first step draws randomness
        generator = self.generator
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore, generator)
            self._rng_to_restore = None

    @property
    def generator(self) -> torch.Generator:
        """The source of every random number of a step (latent sampling, noise, timesteps)."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._generator

    def _ranks(self) -> tuple[int, int]:
        trainer = self._trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _randn(self, shape) -> torch.Tensor:
        """Normal noise for this rank's rows of the global batch: every rank draws all rows, keeps its own."""
        world, rank = self._ranks()
        rows = shape[0]
        full = torch.randn((rows * world, *shape[1:]), generator=self.generator, device=self.device)
        return full[rank * rows:(rank + 1) * rows]

    def _randint(self, low: int, high: int, rows: int) -> torch.Tensor:
        world, rank = self._ranks()
        full = torch.randint(low, high, (rows * world,), generator=self.generator, device=self.device)
        return full[rank * rows:(rank + 1) * rows]

    def _draw(self, latents: torch.Tensor) -> Draw:
        """The objective's random numbers (noise, timesteps...) for these rows, from the run's generator."""
        return self.objective.draw(tuple(latents.shape), self._randn, self._randint)

    @torch.no_grad()
    def cache_latents(self) -> None:
        """VAE-encode the photos once: mean and std of each latent distribution, flips included."""
        flip = self.method.flip
        for name, images in self._images.items():
            if images is None:
                continue
            if flip:
                images = torch.cat([images, images.flip(-1)])
            means, stds = [], []
            for chunk in images.split(8):
                dist = self.vae.encode(chunk.to(self.device, self.vae.dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
            # SD: z * scaling_factor; FLUX: (z - shift_factor) * scaling_factor
            self._latents[name] = self.backbone.latent_distribution(self.vae, torch.cat(means), torch.cat(stds))

    def train_dataloader(self) -> DataLoader:
        total_steps = self.total_steps()
        flip = 2 if self.method.flip else 1
        num_class = 0 if self._images["class"] is None else len(self._images["class"]) * flip
        world, rank = self._ranks()
        dataset = StepIndices(total_steps * self.rows_per_step * world, len(self._images["instance"]) * flip, num_class,
                              self.example_prompts, num_photos=len(self._images["instance"]))
        sampler = StepSampler(total_steps, self.rows_per_step, self.method.data_seed, rank, world)
        return StepLoader(dataset, sampler, steps_done=lambda: self.global_step)

    def configure_optimizers(self):
        optimizers, self._lr_schedules = zip(*(self._make_optimizer(stage) for stage in self.stages))
        return list(optimizers)

    def _trainable_params(self, stage: Stage) -> list[torch.nn.Parameter]:
        params: dict[int, torch.nn.Parameter] = {}  # by id: the text encoder's parameters include a new token's row
        for name in stage.train:
            params.update((id(p), p) for p in self.trainables[name].parameters())
        return list(params.values())

    def _make_optimizer(self, stage: Stage) -> tuple[torch.optim.Optimizer, LrSchedule]:
        """The stage's optimizer (a parameter group per trainable) and its lr schedule: methods/optim.py."""
        mixed = "mixed" in str(self.trainer.precision) if self._trainer is not None else False
        return build_optimizer(stage, self.trainables, self.method, self.hardware,
                               world_size=self._ranks()[0], mixed_precision=mixed)

    # ---------------------------------------------------------------- stages
    def _enter_stage(self, stage: Stage) -> None:
        """Switch what trains; freeze everything else and hoist what the frozen parts compute."""
        log.info("stage '%s': training %s for %d steps at lr %g", stage.name, "+".join(stage.train), stage.steps, stage.lr)
        for param in self.parameters():
            param.requires_grad_(False)
        for param in self._trainable_params(stage):
            param.requires_grad_(True)
        self._current_stage = stage
        self._prompt_embeds.clear()  # what the earlier stage trained may have changed them
        self._cache_prompts = not encodes_prompt(stage.train)
        if self._cache_prompts and self.hardware.offload_text_encoders:
            self._offload_text_encoders(stage)

    def _stage_prompts(self, stage: Stage) -> list[str]:
        """Every prompt a step of `stage` can encode: each example's (ExamplePrompts), and the class prompt
        where the stage has a prior loss."""
        prompts = self.example_prompts.every_prompt()
        if stage.prior_loss_weight > 0:
            prompts.append(self.class_prompt)
        return list(dict.fromkeys(prompts))

    @torch.no_grad()
    def _offload_text_encoders(self, stage: Stage) -> None:
        """hardware.offload_text_encoders: encode every prompt the stage can draw now, then move the text encoders
        to the CPU (FLUX's T5-XXL is ~9.5 GB in bf16); `_encode_prompts` brings them back for anything else. Not
        under DDP, which broadcasts every module's buffers from one device each step."""
        if self._ranks()[0] > 1:
            log.info("hardware.offload_text_encoders: the text encoders stay on the device under DDP (its strategy "
                     "broadcasts every module's buffers each step)")
            return
        for prompt in self._stage_prompts(stage):
            if prompt not in self._prompt_embeds:
                self._prompt_embeds[prompt] = self._encode_prompt(prompt)
        self._place_text_encoders(torch.device("cpu"))
        log.info("stage '%s': %d prompt embeddings cached, the text encoders moved off %s", stage.name,
                 len(self._prompt_embeds), self.device)

    def _place_text_encoders(self, device: torch.device) -> None:
        for _, encoder in self.components.text_encoders():
            encoder.to(device)
        self._text_encoders_device = device
        if device.type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _encode_prompt(self, prompt: str) -> Conditioning:
        return self._encode_prompts([prompt])

    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The text encoder's conditioning of `prompts`, each spelled as the attached trainables need it
        (a multi-vector token's placeholder as its tokens, as the stock pipeline spells it)."""
        for trainable in self.trainables.values():
            prompts = [trainable.prompt_for_encoder(p) for p in prompts]
        if self._text_encoders_device not in (None, self.device):  # offloaded, and a prompt not cached
            self._place_text_encoders(self.device)
        return self.backbone.encode_prompt(self.components, prompts, self.device)

    def _conditioning(self, prompts: list[str]) -> Conditioning:
        """The conditioning of rows with these prompts (a step's instance rows, or its class rows).

        Where nothing the stage trains needs gradients through the text encoder, each distinct prompt is
        encoded once per stage, on its own (so its embedding does not depend on the rows it first came
        with); else the step's distinct prompts are encoded with gradients, in one batch. One prompt for
        every row (the default) is expanded, not copied."""
        distinct = list(dict.fromkeys(prompts))
        if self._cache_prompts:
            with torch.no_grad():
                for prompt in distinct:
                    if prompt not in self._prompt_embeds:
                        self._prompt_embeds[prompt] = self._encode_prompt(prompt)
            encoded = Conditioning.cat([self._prompt_embeds[p] for p in distinct])
        else:
            encoded = self._encode_prompts(distinct)
        if len(distinct) == 1:
            return encoded.expand(len(prompts))
        rows = torch.tensor([distinct.index(p) for p in prompts], device=self.device)
        return Conditioning({k: v[rows] for k, v in encoded.items()})

    def _sample_latents(self, name: str, index: torch.Tensor) -> torch.Tensor:
        mean, std = self._latents[name]
        mean, std = mean[index], std[index]
        return mean + std * self._randn(mean.shape)

    def _instance_latents(self, index: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """Latents of these instance rows: sampled from the cached distributions of the centre crops, or
        (method.data.crop=random) from those of fresh random crops, VAE-encoded now; and the random crops'
        offsets (None for centre crops)."""
        if self._uncropped is None:
            return self._sample_latents("instance", index), None
        pixels, offsets = self._random_crops(index)
        with torch.no_grad(), instrument.span("train.encode_crops"):
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        mean, std = self.backbone.latent_distribution(self.vae, dist.mean.float(), dist.std.float())
        return mean + std * self._randn(mean.shape), offsets

    def _image_conditioning(self, name: str, index: torch.Tensor, offsets: list[int] | None = None) -> Conditioning:
        """What the backbone conditions on about these rows' images (SDXL: size and crop; SD: nothing). Row j
        is image index[j] % N, mirrored where index[j] >= N (flip); `offsets`: its random crop's (else the centre)."""
        sizes, resolution = self._sizes[name], self._images[name].shape[-1]
        images = []
        for row, i in enumerate(index.tolist()):
            size, offset = sizes[i % len(sizes)], None if offsets is None else offsets[row]
            images.append(ImageInfo(size, crop_top_left(size, resolution, offset, mirrored=i >= len(sizes))))
        return self.backbone.image_conditioning(images, self.device)

    def _random_crops(self, index: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """These rows' crops [n, 3, R, R] and their offsets along each photo's longer side.

        Row j shows photo index[j] % N, mirrored where index[j] >= N (flip); its offset is floor(u * k) for
        the photo's k offsets, u ~ U[0, 1) from the run's generator, drawn for every row of the global
        batch on every rank (as the noise is), so a resumed run and N processes crop what one process does."""
        world, rank = self._ranks()
        rows = len(index)
        u = torch.rand((rows * world,), generator=self.generator, device=self.device)[rank * rows:(rank + 1) * rows]
        resolution, count = self._images["instance"].shape[-1], len(self._uncropped)
        crops, offsets = [], []
        for i, fraction in zip(index.tolist(), u.tolist()):
            photo = self._uncropped[i % count]
            choices = crop_offsets(photo, resolution)
            offset = min(int(fraction * choices), choices - 1)
            crop = crop_square(photo, offset, resolution)
            crops.append(crop.flip(-1) if i >= count else crop)
            offsets.append(offset)
        return torch.stack(crops), offsets

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        stage = stage_at(self.stages, self.global_step)
        if stage is not self._current_stage:
            self._enter_stage(stage)
        instance_idx, class_idx, instance_prompts = batch
        latents, offsets = self._instance_latents(instance_idx)
        draw = self._draw(latents)
        embeds = self._conditioning(list(instance_prompts)) | self._image_conditioning("instance", instance_idx, offsets)
        n_instance = len(latents)
        if stage.prior_loss_weight > 0:  # the class rows, each with its own noise and timesteps
            class_latents = self._sample_latents("class", class_idx)
            class_draw = self._draw(class_latents)
            latents = torch.cat([latents, class_latents])
            draw = Draw(*(None if a is None else torch.cat([a, b]) for a, b in
                          zip((draw.noise, draw.timesteps, draw.perturbation),
                              (class_draw.noise, class_draw.timesteps, class_draw.perturbation))))
            embeds = Conditioning.cat([embeds, self._conditioning([self.class_prompt] * len(class_idx))
                                       | self._image_conditioning("class", class_idx)])

        optimizer = self.optimizers()[self.stages.index(stage)] if len(self.stages) > 1 else self.optimizers()
        self._set_lr(optimizer, stage)
        optimizer.zero_grad(set_to_none=True)
        instance_loss, prior_loss = self._backward_in_micro_batches(stage, latents, draw, embeds, n_instance)
        loss = instance_loss
        if prior_loss is not None:
            loss = instance_loss + stage.prior_loss_weight * prior_loss
            self.log("train/prior_loss", prior_loss, on_step=True, batch_size=n_instance)
        if self.method.optimizer.clips:
            self.clip_gradients(optimizer, gradient_clip_val=self.method.optimizer.max_grad_norm,
                                gradient_clip_algorithm="norm")
        optimizer.step()

        # not prog_bar: Lightning would read it on the host (a device sync) after every step
        self.log("train/loss", loss, on_step=True, batch_size=n_instance)
        self.log("train/instance_loss", instance_loss, on_step=True, batch_size=n_instance)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, batch_size=n_instance)
        self.log("train/stage", float(self.stages.index(stage)), on_step=True, batch_size=n_instance)
        return loss

    def _backward_in_micro_batches(self, stage: Stage, latents: torch.Tensor, draw: Draw, embeds: Conditioning,
                                   n_instance: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of the step's rows, `batch_size` instance rows (and as many class rows) at a
        time: one micro-batch per accumulation step. Each micro-batch's loss is weighted by its share of
        the rows, so the gradients add up to those of the whole batch's loss (its instance and prior
        terms are means over the rows). Under DDP they are all-reduced once, in the last backward.

        Returns the step's instance loss and prior loss (None without prior preservation), detached."""
        weights = self.objective.row_weights(draw.timesteps)
        prior = stage.prior_loss_weight > 0
        micro, share = n_instance // self.accumulation, 1.0 / self.accumulation
        # a conditioning computed with gradients (a token or the text encoder trains) is one graph that
        # every micro-batch's backward goes through: kept until the last
        shared_graph = any(v.requires_grad for v in embeds.values())
        instance_loss, prior_loss = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i in range(self.accumulation):
            last = i == self.accumulation - 1
            if self.accumulation == 1:  # the whole batch: no copies
                part, part_draw, part_embeds, part_weights = latents, draw, embeds, weights
            else:
                rows = torch.arange(i * micro, (i + 1) * micro, device=self.device)
                if prior:  # the class rows follow the instance rows
                    rows = torch.cat([rows, rows + n_instance])
                part, part_embeds = latents[rows], Conditioning({k: v[rows] for k, v in embeds.items()})
                part_draw = Draw(**{f.name: None if getattr(draw, f.name) is None else getattr(draw, f.name)[rows]
                                    for f in dataclasses.fields(draw)})
                part_weights = None if weights is None else weights[rows]
            pred, target = self._predict(part, part_draw, part_embeds)
            instance = _loss(pred[:micro], target[:micro], None if part_weights is None else part_weights[:micro])
            micro_loss = instance
            if prior:
                prior_part = _loss(pred[micro:], target[micro:], None if part_weights is None else part_weights[micro:])
                micro_loss = instance + stage.prior_loss_weight * prior_part
                prior_loss = prior_loss + prior_part.detach() * share
            instance_loss = instance_loss + instance.detach() * share
            with nullcontext() if last else self._no_gradient_sync():
                self.manual_backward(micro_loss if self.accumulation == 1 else micro_loss * share,
                                     retain_graph=shared_graph and not last)
            del pred, target, micro_loss  # this micro-batch's graph goes before the next one's forward
        return instance_loss, prior_loss if prior else None

    def _no_gradient_sync(self):
        """This backward's gradients stay on this rank; DDP all-reduces them with the last micro-batch's."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()

    def _predict(self, latents: torch.Tensor, draw: Draw, conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's prediction for the noised latents, and what it should have predicted."""
        noisy = self.objective.noisy(latents, draw)
        pred = self.backbone.denoise(self.components, noisy, draw.timesteps, conditioning)
        return pred, self.objective.target(latents, draw)

    @torch.no_grad()
    def predicts_finite(self) -> bool:
        """Whether the current weights still give a finite prediction: one forward pass on fixed noise.

        Cheap next to saving a checkpoint, and draws from no RNG of the run. (A diverging model can have
        finite weights that overflow in the forward, and a step's loss only vouches for the weights
        before that step's update.)"""
        if not self._latents:
            self.cache_latents()
        latents = self._latents["instance"][0][:1]
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(latents)
        t = torch.full((1,), self.objective.num_train_timesteps // 2, device=self.device)
        # a stage's cached embedding where it has one: the text encoders may be off the device (offload_text_encoders)
        prompt = self._prompt_embeds.get(self.instance_prompt) if self._cache_prompts else None
        prompt = prompt if prompt is not None else self._encode_prompt(self.instance_prompt)
        conditioning = prompt | self._image_conditioning("instance", torch.arange(1))
        pred, _ = self._predict(latents, Draw(noise, t), conditioning)
        return bool(torch.isfinite(pred).all())

    def _set_lr(self, optimizer, stage: Stage) -> None:
        """The lr of this step: diffusers' schedule of the stage at its step (a pure function of the global
        step, so a resumed run repeats the uninterrupted run's lrs)."""
        self._lr_schedules[self.stages.index(stage)].apply(optimizer, self.global_step - stage.start)

    # ---------------------------------------------------------------- resume states
    def stages_begun(self, step: int) -> list[Stage]:
        """The stages begun before global step `step`: what a checkpoint or resume state at `step` holds."""
        return [s for s in self.stages if s.start < step]

    def trained_names(self, step: int) -> set[str]:
        """State-dict names of the parameters trained in the stages begun before global step `step`."""
        ids = {id(p) for s in self.stages_begun(step) for p in self._trainable_params(s)}
        return {name for name, param in self.named_parameters() if id(param) in ids}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Only what trained so far: a resume rebuilds the frozen rest from the base model, as the run began.
        names = self.trained_names(self.global_step)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        checkpoint["personalize"] = {"rng": rng_state(self.generator)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected, found = self.trained_names(int(checkpoint["global_step"])), set(checkpoint["state_dict"])
        if found != expected:
            raise PersonalizeError(
                f"the resume state holds {len(found)} trained tensors where this method expects {len(expected)} "
                f"(e.g. {sorted(found ^ expected)[:2]}): it comes from a different method; start a new run without resume="
            )
        self._rng_to_restore = checkpoint.get("personalize", {}).get("rng")

    # ---------------------------------------------------------------- artifacts
    def trained_until(self, step: int) -> set[str]:
        """What has trained in the stages begun before global step `step`."""
        return {t for s in self.stages_begun(step) for t in s.train}

    @torch.no_grad()
    def save_artifacts(self, ckpt_dir: Path, step: int) -> Path:
        """Write what trained up to `step` in stock diffusers formats, atomically."""
        trained = self.trained_until(step)
        stage = stage_at(self.stages, step - 1)
        with atomic_dir(ckpt_dir) as tmp:
            # each saved file named once: the LoRA trainables write their parts into one file
            contents = list(dict.fromkeys(t.save(tmp) for name, t in self.trainables.items()
                                          if name in trained or t.saved_untrained))
            info = dict(self.checkpoint_info, step=step, stage=stage.name, stage_step=step - stage.start,
                        identifier=self.identifier, prompt=self.instance_prompt, contents=contents)
            info.update(self.example_settings())
            write_info(tmp, CheckpointInfo.from_json(info, tmp))  # typed: a missing or ill-typed field fails here
        return ckpt_dir

    def example_settings(self) -> dict:
        """What checkpoint.json names of how the training examples were made, where it is not the default:
        `prompt_templates`, the token's `num_vectors`, `data` (crop, resize filter) and the photos' `captions`."""
        settings: dict = {}
        if self.method.prompt_templates:
            settings["prompt_templates"] = self.method.prompt_templates
        if self.method.num_vectors != 1:
            settings["num_vectors"] = self.method.num_vectors
        data = self.method.data.non_default()
        if data:
            settings["data"] = data
        captions = {name: caption for name, caption in self.captions.items() if caption is not None}
        if captions:
            settings["captions"] = captions
        return settings

    def total_steps(self) -> int:
        return self.stages[-1].end


def _loss(pred: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor | None) -> torch.Tensor:
    """The MSE of these rows; with row weights (Min-SNR-γ), each row's mean error times its weight, averaged
    over the rows, as the diffusers scripts compute it."""
    if row_weights is None:
        return F.mse_loss(pred, target)
    per_row = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.dim())))
    return (per_row * row_weights).mean()
