"""The training objective's options, against the diffusers scripts' own computations.

- Min-SNR-γ: the row weights equal those train_text_to_image.py / train_dreambooth_lora.py build from
  `diffusers.training_utils.compute_snr`, for ε and v targets; and a real training step with prior
  preservation weighs the instance rows and the class rows each by their own timesteps, checked
  against a brute-force loss computed here from the step's own predictions.
- Offset noise, input perturbation, the timestep range: the draws and the noised input equal what the
  scripts compute from the same random numbers.
- The default objective is unchanged: a step's loss equals plain DDPM MSE (the diffusers examples').
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from personalize.backbones.objectives import DDPMObjective, Draw, LossSettings, NoiseSettings
from personalize.errors import PersonalizeError
from personalize.methods.module import Personalizer
from personalize.train import fit, prepare_run


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000, prediction_type=prediction_type)


def generator_draws(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (lambda shape: torch.randn(shape, generator=g),
            lambda low, high, rows: torch.randint(low, high, (rows,), generator=g))


# ---------------------------------------------------------------- Min-SNR-γ weights
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_snr_weights_are_the_diffusers_scripts(prediction_type, gamma):
    sched = scheduler(prediction_type)
    timesteps = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    objective = DDPMObjective(sched, loss=LossSettings(snr_gamma=gamma))
    # what the scripts compute (train_text_to_image.py, `--snr_gamma`)
    snr = compute_snr(sched, timesteps)
    reference = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    reference = reference / snr if prediction_type == "epsilon" else reference / (snr + 1)
    torch.testing.assert_close(objective.row_weights(timesteps), reference.float(), rtol=1e-5, atol=0)
    assert DDPMObjective(sched).row_weights(timesteps) is None  # no snr_gamma: plain MSE


# ---------------------------------------------------------------- noise options
def test_offset_noise_and_input_perturbation_are_computed_as_the_scripts_do():
    sched = scheduler()
    shape = (3, 4, 8, 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    objective = DDPMObjective(sched, NoiseSettings(offset=0.1, input_perturbation=0.05, min_timestep=100, max_timestep=300))
    randn, randint = generator_draws(1)
    draw = objective.draw(shape, randn, randint)

    # the scripts' order: noise, the per-channel offset, the timesteps, then the perturbation
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(shape, generator=g) + 0.1 * torch.randn((3, 4, 1, 1), generator=g)
    timesteps = torch.randint(100, 300, (3,), generator=g)
    perturbation = torch.randn(shape, generator=g)
    torch.testing.assert_close(draw.noise, noise, rtol=0, atol=0)
    torch.testing.assert_close(draw.timesteps, timesteps, rtol=0, atol=0)
    # input perturbation: the input is noised with noise + γ·n, the target stays the noise
    torch.testing.assert_close(objective.noisy(latents, draw), sched.add_noise(latents, noise + 0.05 * perturbation, timesteps))
    torch.testing.assert_close(objective.target(latents, draw), noise, rtol=0, atol=0)


def test_the_timestep_range_bounds_every_draw_and_a_bad_range_is_one_line():
    objective = DDPMObjective(scheduler(), NoiseSettings(min_timestep=200, max_timestep=210))
    randn, randint = generator_draws()
    t = torch.cat([objective.draw((64, 4, 2, 2), randn, randint).timesteps for _ in range(10)])
    assert t.min() >= 200 and t.max() < 210 and len(set(t.tolist())) == 10  # every value of [200, 210) is drawn
    for low, high in ((500, 500), (0, 1001), (900, 100)):
        with pytest.raises(PersonalizeError, match=r"method.noise.min_timestep=.*use 0 <= min < max <= 1000") as error:
            DDPMObjective(scheduler(), NoiseSettings(min_timestep=low, max_timestep=high))
        assert "\n" not in str(error.value)


def test_v_prediction_targets_the_velocity():
    sched = scheduler("v_prediction")
    latents = torch.randn(2, 4, 8, 8)
    draw = Draw(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]))
    torch.testing.assert_close(DDPMObjective(sched).target(latents, draw),
                               sched.get_velocity(latents, draw.noise, draw.timesteps), rtol=0, atol=0)


# ---------------------------------------------------------------- a real step, brute force
def _record_steps(monkeypatch) -> list[dict]:
    """Every training forward's predictions, targets and timesteps, and the loss the step returned."""
    seen: list[dict] = []
    predict, step = Personalizer._predict, Personalizer.training_step

    def recording_predict(self, latents, draw, conditioning):
        pred, target = predict(self, latents, draw, conditioning)
        if torch.is_grad_enabled():
            seen.append({"pred": pred.detach().clone(), "target": target.detach().clone(),
                         "timesteps": draw.timesteps.clone()})
        return pred, target

    def recording_step(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        seen[-1]["loss"] = float(loss.detach())
        seen[-1]["scheduler"] = self.noise_scheduler
        return loss

    monkeypatch.setattr(Personalizer, "_predict", recording_predict)
    monkeypatch.setattr(Personalizer, "training_step", recording_step)
    return seen


def _brute_force(pred, target, timesteps, scheduler, gamma, rows, prior_weight):
    """The loss the issue asks for, one row at a time: each row's mean squared error, times the weight of
    its own timestep, averaged over the instance rows, plus λ times the same over the class rows."""
    def weight(t):
        if gamma is None:
            return 1.0
        abar = float(scheduler.alphas_cumprod[t])
        snr = abar / (1 - abar)
        return min(snr, gamma) / snr

    per_row = [float(((pred[i] - target[i]) ** 2).mean()) * weight(int(timesteps[i])) for i in range(len(pred))]
    instance = sum(per_row[:rows]) / rows
    prior = sum(per_row[rows:]) / (len(pred) - rows) if len(pred) > rows else 0.0
    return instance + prior_weight * prior


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_a_step_with_prior_weighs_instance_and_class_rows_by_their_own_timesteps(make_cfg, monkeypatch, gamma):
    seen = _record_steps(monkeypatch)
    overrides = ["method=dreambooth", "subject=sample_dog", "eval=none", "method.stages.unet.steps=2",
                 "method.stages.unet.checkpoint_every=null",
                 "method.batch_size=2", "class_images.count=2", "method.stages.unet.prior_loss_weight=0.7"]
    if gamma is not None:
        overrides.append(f"method.loss.snr_gamma={gamma}")
    fit(prepare_run(make_cfg(*overrides, name=f"snr-{gamma}")), sample=False, evaluate=False)
    assert len(seen) == 2
    for step in seen:
        assert len(step["pred"]) == 4  # 2 instance rows + 2 class rows
        assert len(set(step["timesteps"].tolist())) > 1  # the rows have timesteps of their own
        expected = _brute_force(step["pred"], step["target"], step["timesteps"], step["scheduler"], gamma, 2, 0.7)
        assert step["loss"] == pytest.approx(expected, rel=1e-5)
    if gamma is None:  # the default is the diffusers examples' loss exactly: plain MSE over each group
        step = seen[0]
        plain = F.mse_loss(step["pred"][:2], step["target"][:2]) + 0.7 * F.mse_loss(step["pred"][2:], step["target"][2:])
        assert step["loss"] == pytest.approx(float(plain), rel=1e-6)


def test_noise_settings_reach_the_step_and_a_bad_range_stops_before_the_run_dir(make_cfg, monkeypatch, tmp_path):
    seen = _record_steps(monkeypatch)
    fit(prepare_run(make_cfg("method=lora", "subject=sample_dog", "eval=none", "method.stages.lora.steps=2",
                             "method.stages.lora.checkpoint_every=null",
                             "method.noise.min_timestep=990", "method.noise.offset=0.1", name="range")),
        sample=False, evaluate=False)
    assert all(990 <= int(t) < 1000 for step in seen for t in step["timesteps"])

    cfg = make_cfg("method=lora", "subject=sample_dog", "method.noise.min_timestep=10", "method.noise.max_timestep=5",
                   name="bad-range")
    with pytest.raises(PersonalizeError, match="method.noise.min_timestep=10, method.noise.max_timestep=5"):
        prepare_run(cfg)
    assert not (tmp_path / "bad-range").exists()
