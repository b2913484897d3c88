"""Training objectives: what the denoiser is fed, what it should predict, and how rows of the loss weigh.

An objective is a pure function of the clean latents, the random numbers drawn for them and the
timesteps; the module draws those numbers (from its one generator, in a fixed order) and the backbone
calls the denoiser. `DDPMObjective` is Stable Diffusion's: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
with the ε or v target of the model's scheduler. A flow-matching objective (SD 3.5, FLUX.1) fits the same
four methods: its timesteps are sigmas, its input (1 - σ) x_0 + σ ε, its target ε - x_0.

The options are those of the diffusers training scripts, computed as they compute them:
- `noise.offset` (train_dreambooth.py `--offset_noise`, train_text_to_image.py `--noise_offset`):
  ε += offset * n, with n one normal number per (row, channel), broadcast over the pixels;
- `noise.input_perturbation` (train_text_to_image.py): the input is noised with ε + γ * n while the
  target stays that of ε;
- `noise.min_timestep` / `noise.max_timestep`: timesteps drawn uniformly from [min, max) instead of
  [0, num_train_timesteps);
- `loss.snr_gamma` (Min-SNR-γ, Hang et al. 2023; diffusers' `compute_snr`): each row's loss weighs
  min(SNR(t), γ) / SNR(t) for ε, min(SNR(t), γ) / (SNR(t) + 1) for v, by that row's own timestep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from personalize.errors import PersonalizeError

Randn = Callable[[tuple], torch.Tensor]  # normal noise of a shape, from the run's generator
Randint = Callable[[int, int, int], torch.Tensor]  # (low, high, rows): uniform integers in [low, high)


@dataclass(frozen=True)
class NoiseSettings:
    """method.noise: how the training noise and timesteps are drawn."""

    offset: float = 0.0
    input_perturbation: float = 0.0
    min_timestep: int = 0
    max_timestep: int | None = None  # None: the scheduler's num_train_timesteps (exclusive)

    @classmethod
    def from_cfg(cls, cfg) -> NoiseSettings:
        cfg = cfg or {}
        top = cfg.get("max_timestep")
        return cls(offset=float(cfg.get("offset") or 0.0),
                   input_perturbation=float(cfg.get("input_perturbation") or 0.0),
                   min_timestep=int(cfg.get("min_timestep") or 0),
                   max_timestep=None if top is None else int(top))

    def non_default(self) -> dict:
        return {k: v for k, v in vars(self).items() if v != getattr(NoiseSettings, k)}


@dataclass(frozen=True)
class LossSettings:
    """method.loss: how the rows of the denoising loss are weighted."""

    snr_gamma: float | None = None  # None: plain MSE, every timestep weighs the same

    @classmethod
    def from_cfg(cls, cfg) -> LossSettings:
        gamma = (cfg or {}).get("snr_gamma")
        return cls(snr_gamma=None if gamma is None else float(gamma))

    def non_default(self) -> dict:
        return {} if self.snr_gamma is None else {"snr_gamma": self.snr_gamma}


@dataclass
class Draw:
    """The random numbers of one group of rows (instance or class), drawn in a fixed order."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    perturbation: torch.Tensor | None = None


class DDPMObjective:
    """The DDPM noise-prediction objective of a diffusers `DDPMScheduler` (ε or v target)."""

    PREDICTION_TYPES = ("epsilon", "v_prediction")

    def __init__(self, scheduler, noise: NoiseSettings = NoiseSettings(), loss: LossSettings = LossSettings()):
        self.scheduler, self.noise, self.loss = scheduler, noise, loss
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in self.PREDICTION_TYPES:
            raise PersonalizeError(f"prediction_type={self.prediction_type}: this objective trains one of "
                                   f"{', '.join(self.PREDICTION_TYPES)}")
        self.timestep_range = (noise.min_timestep, noise.max_timestep or self.num_train_timesteps)
        low, high = self.timestep_range
        if not 0 <= low < high <= self.num_train_timesteps:
            raise PersonalizeError(
                f"method.noise.min_timestep={noise.min_timestep}, method.noise.max_timestep={noise.max_timestep}: "
                f"timesteps are drawn from [min, max) inside [0, {self.num_train_timesteps}) of this model's "
                f"scheduler: use 0 <= min < max <= {self.num_train_timesteps} (max_timestep=null is {self.num_train_timesteps})")

    def draw(self, shape: tuple, randn: Randn, randint: Randint) -> Draw:
        """Noise, timesteps (and the perturbation) for rows of `shape`, in diffusers' order of draws."""
        noise = randn(shape)
        if self.noise.offset:
            noise = noise + self.noise.offset * randn((shape[0], shape[1], *([1] * (len(shape) - 2))))
        timesteps = randint(*self.timestep_range, shape[0])
        perturbation = randn(shape) if self.noise.input_perturbation else None
        return Draw(noise, timesteps, perturbation)

    def noisy(self, latents: torch.Tensor, draw: Draw) -> torch.Tensor:
        """The denoiser's input: the latents noised to their timesteps (with the perturbed noise, if any)."""
        noise = draw.noise
        if draw.perturbation is not None:
            noise = noise + self.noise.input_perturbation * draw.perturbation
        return self.scheduler.add_noise(latents, noise, draw.timesteps)

    def target(self, latents: torch.Tensor, draw: Draw) -> torch.Tensor:
        if self.prediction_type == "v_prediction":  # SD 2.x 768 models
            return self.scheduler.get_velocity(latents, draw.noise, draw.timesteps)
        return draw.noise

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) of each timestep, in float32."""
        abar = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        return abar / (1.0 - abar)

    def row_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Each row's weight in the loss, or None where every row weighs 1 (plain MSE)."""
        if self.loss.snr_gamma is None:
            return None
        snr = self.snr(timesteps)
        clipped = torch.clamp(snr, max=self.loss.snr_gamma)
        return clipped / (snr + 1.0) if self.prediction_type == "v_prediction" else clipped / snr
