"""Training objectives: what the denoiser is fed, what it should predict, and how rows of the loss weigh.

An objective is a pure function of the clean latents, the random numbers drawn for them and the
timesteps; the module draws those numbers (from its one generator, in a fixed order) and the backbone
calls the denoiser. `DDPMObjective` is Stable Diffusion's: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
with the ε or v target of the model's scheduler. `FlowMatchingObjective` is FLUX.1's (and SD 3.5's): its
timesteps index the flow-match scheduler's sigmas, its input is (1 - σ) x_0 + σ ε, its target ε - x_0.

The options are those of the diffusers training scripts, computed as they compute them:
- `noise.offset` (train_dreambooth.py `--offset_noise`, train_text_to_image.py `--noise_offset`):
  ε += offset * n, with n one normal number per (row, channel), broadcast over the pixels;
- `noise.input_perturbation` (train_text_to_image.py): the input is noised with ε + γ * n while the
  target stays that of ε;
- `noise.min_timestep` / `noise.max_timestep`: timesteps drawn uniformly from [min, max) instead of
  [0, num_train_timesteps);
- `loss.snr_gamma` (Min-SNR-γ, Hang et al. 2023; diffusers' `compute_snr`): each row's loss weighs
  min(SNR(t), γ) / SNR(t) for ε, min(SNR(t), γ) / (SNR(t) + 1) for v, by that row's own timestep.
Flow matching has the options of diffusers' FLUX/SD3 scripts (train_dreambooth_lora_flux.py) instead:
- `loss.weighting_scheme` (`--weighting_scheme`): logit_normal and mode change how timesteps are drawn
  (`compute_density_for_timestep_sampling`: u = sigmoid(logit_mean + logit_std * n), or
  u = 1 - v - mode_scale * (cos²(π v / 2) - 1 + v) for a uniform v; index floor(u * 1000) of the schedule);
  cosmap and sigma_sqrt keep the uniform draw and weigh each row's loss by `compute_loss_weighting_for_sd3`
  (2 / (π (1 - 2σ + 2σ²)), σ⁻²); none: uniform timesteps, plain MSE;
- `loss.logit_mean`, `loss.logit_std` (logit_normal) and `loss.mode_scale` (mode).
Each objective refuses, in one line, the other's options: they are not the same quantities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
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


WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")  # diffusers' --weighting_scheme


@dataclass(frozen=True)
class LossSettings:
    """method.loss: how the rows of the denoising loss are weighted (and, for flow matching, how its
    timesteps are drawn: diffusers' one `--weighting_scheme` decides both)."""

    snr_gamma: float | None = None  # None: plain MSE, every timestep weighs the same (DDPM only)
    # flow matching only, with the defaults of diffusers' FLUX scripts
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    @classmethod
    def from_cfg(cls, cfg) -> LossSettings:
        cfg = cfg or {}
        gamma = cfg.get("snr_gamma")
        defaults = cls()
        return cls(snr_gamma=None if gamma is None else float(gamma),
                   weighting_scheme=str(cfg.get("weighting_scheme") or defaults.weighting_scheme),
                   **{k: float(cfg[k]) if cfg.get(k) is not None else getattr(defaults, k)
                      for k in ("logit_mean", "logit_std", "mode_scale")})

    def non_default(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def flow_matching_options(self) -> dict:
        """The flow-matching options set away from their defaults."""
        return {k: v for k, v in self.non_default().items() if k != "snr_gamma"}


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
        flow = loss.flow_matching_options()
        if flow:
            key, value = next(iter(flow.items()))
            raise PersonalizeError(
                f"method.loss.{key}={value}: a flow-matching option (model.backbone=flux); this model trains the "
                f"DDPM objective, which has none: leave it at {getattr(LossSettings, key)} (Min-SNR-γ, "
                "method.loss.snr_gamma, weighs its timesteps)")
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


class FlowMatchingObjective:
    """Rectified-flow matching on a diffusers `FlowMatchEulerDiscreteScheduler`, as diffusers'
    train_dreambooth_lora_flux.py trains FLUX.1: a row's timestep is the training schedule's
    `timesteps[floor(u * N)]` for u from the weighting scheme's density, its σ the schedule's sigma there
    (the scheduler as loaded: FLUX.1-dev shifts its sigmas only when sampling), the input (1 - σ) x + σ ε,
    the target ε - x (the velocity from the data to the noise), and the row weight
    `compute_loss_weighting_for_sd3`'s."""

    UNIFORM_BITS = 24  # a float32 uniform in [0, 1): 24 random bits, as torch.rand makes one

    def __init__(self, scheduler, noise: NoiseSettings = NoiseSettings(), loss: LossSettings = LossSettings()):
        self.scheduler, self.noise, self.loss = scheduler, noise, loss
        for key, value in noise.non_default().items():
            raise PersonalizeError(
                f"method.noise.{key}={value}: a DDPM option; the flow-matching objective (model.backbone=flux) has "
                f"no such setting (diffusers' FLUX scripts neither): leave it at {getattr(NoiseSettings, key)}; "
                f"method.loss.weighting_scheme ({', '.join(WEIGHTING_SCHEMES)}) shapes its timesteps")
        if loss.snr_gamma is not None:
            raise PersonalizeError(
                f"method.loss.snr_gamma={loss.snr_gamma}: Min-SNR-γ weighs DDPM timesteps; the flow-matching "
                f"objective (model.backbone=flux) weighs by method.loss.weighting_scheme ({', '.join(WEIGHTING_SCHEMES)}): "
                "set method.loss.snr_gamma=null")
        if loss.weighting_scheme not in WEIGHTING_SCHEMES:
            raise PersonalizeError(f"method.loss.weighting_scheme={loss.weighting_scheme}: choose one of "
                                   f"{', '.join(WEIGHTING_SCHEMES)}")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        # the scripts' `noise_scheduler_copy`: the schedule of the scheduler as loaded, before any set_timesteps
        self.timesteps = scheduler.timesteps.clone().float()
        self.sigmas = scheduler.sigmas.clone().float()[:len(self.timesteps)]  # without the appended terminal 0

    def density(self, rows: int, randn: Randn, randint: Randint) -> torch.Tensor:
        """u in [0, 1] per row, from `compute_density_for_timestep_sampling`'s distribution for the scheme,
        drawn through the run's generator: a normal for logit_normal, else a float32 uniform."""
        loss = self.loss
        if loss.weighting_scheme == "logit_normal":
            return torch.sigmoid(loss.logit_mean + loss.logit_std * randn((rows,)))
        u = randint(0, 2 ** self.UNIFORM_BITS, rows).float() * 2.0 ** -self.UNIFORM_BITS
        if loss.weighting_scheme == "mode":
            u = 1 - u - loss.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def draw(self, shape: tuple, randn: Randn, randint: Randint) -> Draw:
        """The noise, then each row's timestep, in the script's order of draws."""
        noise = randn(shape)
        u = self.density(shape[0], randn, randint)
        # u = 1 (mode at v = 0; a sigmoid that rounds up) would index one past the schedule: its last entry
        indices = (u * self.num_train_timesteps).long().clamp(0, len(self.timesteps) - 1)
        return Draw(noise, self.timesteps.to(noise.device)[indices.to(noise.device)])

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Each timestep's σ, looked up in the schedule as the scripts' `get_sigmas` does; a timestep off the
        schedule (the module's fixed probe) by the scheduler's own relation σ = t / N."""
        schedule = self.timesteps.to(timesteps.device)
        match = schedule[None, :] == timesteps.float()[:, None]
        looked_up = self.sigmas.to(timesteps.device)[match.float().argmax(dim=1)]
        return torch.where(match.any(dim=1), looked_up, timesteps.float() / self.num_train_timesteps)

    def _sigma_like(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.sigma(timesteps).to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))

    def noisy(self, latents: torch.Tensor, draw: Draw) -> torch.Tensor:
        sigma = self._sigma_like(latents, draw.timesteps)
        return (1.0 - sigma) * latents + sigma * draw.noise

    def target(self, latents: torch.Tensor, draw: Draw) -> torch.Tensor:
        return draw.noise - latents

    def row_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """`compute_loss_weighting_for_sd3` of each row's σ; None where it is 1 for every row (plain MSE)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.loss.weighting_scheme not in ("cosmap", "sigma_sqrt"):
            return None
        return compute_loss_weighting_for_sd3(self.loss.weighting_scheme, self.sigma(timesteps)).float()
