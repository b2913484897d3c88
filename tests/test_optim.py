"""Optimisation recipes (personalize/methods/optim.py), each against its reference, by value:

- the lr of every optimizer step equals what diffusers' `get_scheduler` gives the training scripts at
  that step, for every schedule, per stage, after a resume, and whatever the number of processes;
- per-trainable lrs: one parameter group per trainable at its own base lr, scaled by the schedule,
  and the first AdamW step moves each trainable by its own lr;
- `scale_lr`: the scripts' factor, in their order;
- gradient accumulation: k micro-batches of b rows give the gradients and weights of one batch of k*b
  (same examples, noise and timesteps), with and without prior preservation, through a token's shared
  text-encoder graph, and under bf16 autocast; the UNet never sees more than a micro-batch;
- adamw8bit and prodigy: the optimizer the package itself builds with our settings, step for step; a
  missing package is one line, before the run dir is written;
- the settings' checks; checkpoint.json names each setting away from the method's defaults (`overrides`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch
from diffusers.optimization import get_scheduler
from omegaconf import OmegaConf
from safetensors.torch import load_file

from personalize import signals
from personalize.config import PROJECT_ROOT, compose
from personalize.devices import HardwareSettings
from personalize.errors import PersonalizeError
from personalize.methods.optim import (
    LR_SCHEDULERS, OPTIMIZERS, LrSchedule, build_optimizer, check_optimizers, optimizer_name, scaled_lr,
)
from personalize.methods.stages import Stage, parse_stages
from personalize.train import fit, prepare_run
from tests.helpers import method_settings

QUICK = ["subject=sample_dog", "eval=none"]
LORA = ["method=lora", "method.stages.lora.steps=6", "method.stages.lora.checkpoint_every=3", "method.stages.lora.lr=1e-3"]
# each schedule with the settings it reads set away from their defaults, so that each is exercised
SCHEDULES = {
    "constant": {},
    "constant_with_warmup": {"lr_warmup_steps": 2},
    "linear": {"lr_warmup_steps": 2},
    "cosine": {"lr_warmup_steps": 2},
    "cosine_with_restarts": {"lr_warmup_steps": 1, "lr_num_cycles": 2},
    "polynomial": {"lr_warmup_steps": 2, "lr_power": 2.0},
}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip() == message
    return message


def stage_overrides(stage: str, settings: dict) -> list[str]:
    return [f"+method.stages.{stage}.{key}={value}" for key, value in settings.items()]


def reference_lrs(name: str, lr: float, steps: int, processes: int = 1, **settings) -> list[float]:
    """The lr of each optimizer step of a diffusers training script: get_scheduler with warm-up and total
    steps times the processes, stepped that many times after each optimizer step (as accelerate does)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=settings.get("lr_warmup_steps", 0) * processes,
                              num_training_steps=steps * processes, num_cycles=settings.get("lr_num_cycles", 1),
                              power=settings.get("lr_power", 1.0))
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(processes):
            scheduler.step()
    return lrs


class RecordLrs(L.Callback):
    """The lr of every parameter group of the optimizer that stepped, per global step (set before the step
    by the module, read after it)."""

    def __init__(self):
        self.lrs: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        stage = module._current_stage
        optimizer = trainer.optimizers[module.stages.index(stage)]
        self.lrs[trainer.global_step - 1] = [group["lr"] for group in optimizer.param_groups]


def named_in_checkpoint(run) -> dict:
    """The settings the run's last checkpoint.json names as set away from the method's defaults."""
    return json.loads((run.checkpoints()[-1] / "checkpoint.json").read_text()).get("overrides", {})


# ---------------------------------------------------------------- the lr of every step
@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_schedule_runs_the_lrs_of_get_scheduler_and_is_named_in_checkpoint_json(name, make_cfg):
    settings = SCHEDULES[name]
    run = prepare_run(make_cfg(*QUICK, *LORA, f"+method.stages.lora.lr_scheduler={name}",
                               *stage_overrides("lora", settings)))
    recorded = RecordLrs()
    fit(run, callbacks_after=[recorded], sample=False, evaluate=False)
    ours = [recorded.lrs[step][0] for step in range(6)]
    assert ours == reference_lrs(name, 1e-3, 6, **settings)  # exactly: the same floats
    if settings.get("lr_warmup_steps"):
        assert ours[0] == 0.0  # the scripts' warm-up starts at 0 (ours was (s+1)/warmup before)
    named = named_in_checkpoint(run)
    for key, value in {"lr_scheduler": name, **settings}.items():
        assert named[f"method.stages.lora.{key}"] == value, key


def test_the_lr_does_not_depend_on_the_number_of_processes():
    """The scripts multiply warm-up and total steps by the processes and step the scheduler that often:
    the same fraction of the run, the same float."""
    for name, settings in SCHEDULES.items():
        stage = Stage(name="s", train=("lora",), steps=7, lr=3e-4, start=0, lr_scheduler=name, **settings)
        schedule = LrSchedule.for_stage(stage, [3e-4], 3e-4)
        ours = [schedule.lrs(step)[0] for step in range(7)]
        for processes in (1, 2, 8):
            assert ours == reference_lrs(name, 3e-4, 7, processes, **settings), (name, processes)


TWO_STAGE = ["method=two_stage", "method.stages.token.steps=3", "method.stages.token.lr=5e-2",
             "method.stages.unet.steps=5", "method.stages.unet.checkpoint_every=5", "method.stages.unet.lr=1e-3",
             "+method.stages.token.lr_scheduler=linear", "+method.stages.token.lr_warmup_steps=1",
             "+method.stages.unet.lr_scheduler=cosine_with_restarts", "+method.stages.unet.lr_warmup_steps=1",
             "+method.stages.unet.lr_num_cycles=2", "method.gradient_accumulation_steps=2"]


def test_each_stage_runs_its_own_schedule_and_a_resumed_run_repeats_the_lrs(make_cfg):
    """Stage 2's schedule starts at its own step 0; a run stopped inside stage 2 and resumed gets the lr of
    the uninterrupted run at every step (no scheduler state to restore: the lr is a function of the step),
    and, with 2 micro-batches a step, ends with the same bits (the data position counts whole steps)."""
    whole, recorded = prepare_run(make_cfg(*QUICK, *TWO_STAGE, name="whole")), RecordLrs()
    fit(whole, callbacks_after=[recorded], sample=False, evaluate=False)
    token = reference_lrs("linear", 5e-2, 3, lr_warmup_steps=1)
    unet = reference_lrs("cosine_with_restarts", 1e-3, 5, lr_warmup_steps=1, lr_num_cycles=2)
    assert [recorded.lrs[step][0] for step in range(8)] == token + unet

    class StopAfter(L.Callback):  # a SIGTERM during global step 5 (stage 2's third): saved, then stopped
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    first = prepare_run(make_cfg(*QUICK, *TWO_STAGE, name="stopped"))
    with pytest.raises(signals.Interrupted):
        fit(first, callbacks_after=[StopAfter()], sample=False, evaluate=False)
    resumed, after = prepare_run(make_cfg(*QUICK, *TWO_STAGE, f"resume={first.run_dir}", name="resumed")), RecordLrs()
    fit(resumed, callbacks_after=[after], sample=False, evaluate=False)
    assert sorted(after.lrs) == [6, 7]
    assert all(after.lrs[step] == recorded.lrs[step] for step in (6, 7))
    for file in ("learned_embeds.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        ours, reference = (load_file(run.checkpoints()[-1] / file) for run in (resumed, whole))
        assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours), file


# ---------------------------------------------------------------- a base lr per trainable
PIVOT = ["method=textual_inversion", "method.stages.token.train=[token,lora]", "method.stages.token.checkpoint_every=0",
         "method.stages.token.lr=1e-4", "+method.stages.token.trainable_lr={token: 5.0e-3}"]


def test_each_trainable_has_a_group_at_its_lr_scaled_by_the_schedule(make_cfg):
    run = prepare_run(make_cfg(*QUICK, *PIVOT, "method.stages.token.steps=4", "+method.stages.token.lr_scheduler=linear",
                               "+method.stages.token.lr_warmup_steps=1"))
    recorded = RecordLrs()
    fit(run, callbacks_after=[recorded], sample=False, evaluate=False)
    [optimizer] = run.module.trainer.optimizers
    assert [group["trainable"] for group in optimizer.param_groups] == ["token", "lora"]
    token_rows = run.module.trainables["token"].parameters()
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in token_rows]
    factors = reference_lrs("linear", 1.0, 4, lr_warmup_steps=1)  # the schedule's factor, on a base lr of 1
    for step, factor in enumerate(factors):
        assert recorded.lrs[step] == [5e-3 * factor, 1e-4 * factor], step
    assert named_in_checkpoint(run)["method.stages.token.trainable_lr.token"] == 5e-3


def test_the_first_adamw_step_moves_each_trainable_by_its_own_lr(make_cfg):
    """AdamW's first update is lr * g / (|g| + eps): the largest change of a tensor is its group's lr."""
    run = prepare_run(make_cfg(*QUICK, *PIVOT, "method.stages.token.steps=1", "method.optimizer.weight_decay=0"))
    token = run.module.trainables["token"].parameters()
    lora = run.module.trainables["lora"].parameters()
    before = [p.detach().clone() for p in token + lora]
    fit(run, sample=False, evaluate=False)
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(token + lora, before)]
    assert max(moved[:len(token)]) == pytest.approx(5e-3, rel=1e-4)
    assert max(moved[len(token):]) == pytest.approx(1e-4, rel=1e-4)


def test_a_token_row_trained_with_its_text_encoder_is_in_the_tokens_group(make_cfg):
    cfg = make_cfg(*QUICK, "method=textual_inversion", "method.stages.token.train=[text_encoder,token]",
                   "method.stages.token.steps=2", "method.stages.token.checkpoint_every=0",
                   "+method.stages.token.trainable_lr={token: 5.0e-3}")
    module = prepare_run(cfg).module
    [optimizer] = module.configure_optimizers()
    token, text_encoder = optimizer.param_groups
    assert (token["trainable"], token["lr"], text_encoder["trainable"], text_encoder["lr"]) == ("token", 5e-3, "text_encoder", 5e-4)
    rows = module.trainables["token"].parameters()
    assert [id(p) for p in token["params"]] == [id(p) for p in rows]
    everything = {id(p) for p in module.text_encoder.parameters()}
    assert {id(p) for p in text_encoder["params"]} == everything - {id(p) for p in rows}


# ---------------------------------------------------------------- scale_lr
def test_scale_lr_multiplies_every_lr_by_the_scripts_factor(make_cfg):
    method = OmegaConf.create({"scale_lr": True, "batch_size": 3, "gradient_accumulation_steps": 4})
    for lr in (5e-4, 1e-6, 0.1, 2.5e-5):
        for world in (1, 2, 8):  # their expression, their order: lr * accumulation * batch * processes
            assert scaled_lr(lr, method, world) == lr * 4 * 3 * world
    assert scaled_lr(5e-4, OmegaConf.create({"scale_lr": False, "batch_size": 3}), 8) == 5e-4
    # the settings the optimizer is built from give the same (the config above is what banner.py passes)
    typed = dataclasses.replace(METHOD, scale_lr=True, batch_size=3, gradient_accumulation_steps=4)
    assert all(scaled_lr(lr, typed, world) == lr * 4 * 3 * world for lr in (5e-4, 2.5e-5) for world in (1, 8))
    assert scaled_lr(5e-4, dataclasses.replace(typed, scale_lr=False), 8) == 5e-4

    module = prepare_run(make_cfg(*QUICK, *PIVOT, "method.stages.token.steps=2", "method.batch_size=2",
                                  "method.gradient_accumulation_steps=3", "method.scale_lr=true")).module
    [optimizer] = module.configure_optimizers()
    assert [group["lr"] for group in optimizer.param_groups] == [5e-3 * 3 * 2 * 1, 1e-4 * 3 * 2 * 1]
    assert optimizer.defaults["lr"] == 1e-4 * 3 * 2 * 1


# ---------------------------------------------------------------- gradient accumulation
class StepGradients(L.Callback):
    """The gradients each optimizer step used (they stay until the next step's zero_grad), and the rows of
    every UNet call that trains (with autograd on: not the checkpoints' no-grad finiteness check)."""

    def __init__(self):
        self.grads: list[torch.Tensor] = []
        self.unet_rows: list[int] = []

    def on_train_start(self, trainer, module):
        module.unet.register_forward_hook(
            lambda _, args, __: self.unet_rows.append(args[0].shape[0]) if torch.is_grad_enabled() else None)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[module.stages.index(module._current_stage)]
        self.grads.append(torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]).clone())


def trained(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for stage in module.stages for p in module._trainable_params(stage)])


# eps 1e-3: Adam's step is then smooth in the gradient, so float noise in a gradient cannot turn into a
# sign flip of a near-zero one (a full-lr difference); the gradients themselves are compared as they are
ACCUMULATION = {
    "finetune": ["method=finetune", "method.stages.unet.steps=2", "method.stages.unet.checkpoint_every=2",
                 "method.stages.unet.lr=1e-4", "method.optimizer.eps=1e-3"],
    "dreambooth": ["method=dreambooth", "method.stages.unet.steps=2", "method.stages.unet.checkpoint_every=2",
                   "method.stages.unet.lr=1e-4", "method.optimizer.eps=1e-3", "class_images.count=2"],
    "textual_inversion": ["method=textual_inversion", "method.stages.token.steps=2", "method.stages.token.checkpoint_every=2",
                          "method.stages.token.lr=1e-3", "method.optimizer.eps=1e-3"],
}
BF16 = ["hardware.precision=bf16-mixed", "hardware.frozen_dtype=bfloat16"]


SNR = ["method.loss.snr_gamma=5.0"]  # Min-SNR-γ: each row weighted by its own timestep's weight


@pytest.mark.parametrize("method, extra", [("finetune", []), ("dreambooth", []), ("dreambooth", SNR),
                                           ("textual_inversion", []), ("finetune", BF16)],
                         ids=["no-prior", "prior", "prior-snr", "shared-text-graph", "bf16"])
def test_k_micro_batches_of_b_train_as_one_batch_of_k_times_b(method, extra, make_cfg):
    """Same examples, noise and timesteps (the step's rows are drawn as one batch either way); the prior
    rows of DreamBooth go with their micro-batch, with their own SNR weights; the new token's embedding
    is one graph for both."""
    runs = {}
    for k, b in ((2, 1), (1, 2)):
        run = prepare_run(make_cfg(*QUICK, *ACCUMULATION[method], *extra, f"method.batch_size={b}",
                                   f"method.gradient_accumulation_steps={k}", name=f"k{k}"))
        before, recorded = trained(run.module), StepGradients()
        fit(run, callbacks_after=[recorded], sample=False, evaluate=False)
        runs[k] = before, trained(run.module), recorded
        assert named_in_checkpoint(run).get("method.gradient_accumulation_steps", 1) == k
    (start, accumulated, micro), (_, whole, big) = runs[2], runs[1]
    prior = 2 if method == "dreambooth" else 1  # instance rows and as many class rows per UNet call
    assert set(micro.unet_rows) == {1 * prior} and len(micro.unet_rows) == 2 * 2  # 2 steps x 2 micro-batches
    assert set(big.unet_rows) == {2 * prior} and len(big.unet_rows) == 2
    assert torch.equal(start, runs[1][0])
    update = (whole - start).abs().max()
    if extra != BF16:
        for g, reference in zip(micro.grads, big.grads):  # float reordering only
            assert (g - reference).norm() / reference.norm() < 1e-5
        assert torch.allclose(accumulated, whole, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-3 * float(update))
    else:  # bf16 autocast: other batch shapes, other bf16 roundings of the activations
        assert (micro.grads[0] - big.grads[0]).norm() / big.grads[0].norm() < 1e-2
        assert (accumulated - whole).abs().max() < 0.2 * update


def test_accumulation_over_two_processes_matches_one_process_with_the_global_batch(tmp_path, make_cfg):
    """Under DDP the micro-batches before the last keep their gradients on their rank (no_sync) and the
    last backward all-reduces the sum: two processes x 2 micro-batches of 1 = one process, one batch of 4.
    Ranks that never synced would each train on their own rows: off by about a whole update (this fails
    when the last backward is run without the sync too)."""
    args = [*QUICK, *ACCUMULATION["finetune"], "method.batch_size=1", "method.gradient_accumulation_steps=2"]
    result = subprocess.run([sys.executable, "-m", "personalize.cli", "debug=default", *args, "hardware=ddp_cpu",
                             "logger=none", f"paths.log_dir={tmp_path / 'out'}"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    [run_dir] = [p.parent for p in (tmp_path / "out").glob("train/runs/*/config.yaml")]
    single = prepare_run(make_cfg(*QUICK, *ACCUMULATION["finetune"], "method.batch_size=4", name="single"))
    start = {k: v.detach().clone() for k, v in single.module.unet.state_dict().items()}
    fit(single, sample=False, evaluate=False)
    file = "checkpoints/step-000002/unet/diffusion_pytorch_model.safetensors"
    ddp, one = load_file(run_dir / file), load_file(single.run_dir / file)
    update = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert all(torch.allclose(ddp[k], one[k], rtol=4 * torch.finfo(torch.float32).eps, atol=1e-3 * update) for k in one)


# ---------------------------------------------------------------- the optimizers
class Params:
    """A stand-in trainable: its parameters, with parameters of its own (not a component trained in place)."""

    trains_in_place = ()

    def __init__(self, *params):
        self._params = list(params)

    def parameters(self):
        return self._params


def twin_parameters(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(128, 64, generator=generator)), torch.nn.Parameter(torch.randn(300, generator=generator))]
    return ours, [torch.nn.Parameter(p.detach().clone()) for p in ours]


def train(optimizer, params, steps: int = 3) -> None:
    """`steps` optimizer steps on seeded gradients: the same gradients for every optimizer trained so."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


METHOD = method_settings(compose("train", ["method=lora"], output_dir="/unused"))
CPU = HardwareSettings.from_cfg(compose("train", ["hardware=cpu"], output_dir="/unused").hardware)  # hardware.optimizer=adamw
LOW_MEMORY_CFG = compose("train", ["hardware=low_memory"], output_dir="/unused").hardware  # hardware.optimizer=adamw8bit


def test_prodigy_is_prodigyopts_own_with_the_advanced_scripts_settings():
    import prodigyopt

    params = twin_parameters()
    stage = Stage(name="lora", train=("lora",), steps=3, lr=1.0, start=0, optimizer="prodigy")
    ours, _ = build_optimizer(stage, {"lora": Params(*params[0])}, METHOD, CPU)
    reference = prodigyopt.Prodigy(params[1], lr=1.0, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                   use_bias_correction=True, safeguard_warmup=True)
    assert type(ours) is prodigyopt.Prodigy
    train(ours, params[0])
    train(reference, params[1])
    assert all(torch.equal(p, q) for p, q in zip(*params))
    assert not torch.equal(params[0][0], twin_parameters()[0][0])  # it did move


def test_adamw8bit_is_bitsandbytes_own_and_close_to_adamw():
    import bitsandbytes as bnb

    params = twin_parameters()
    stage = Stage(name="lora", train=("lora",), steps=3, lr=1e-3, start=0, optimizer="adamw8bit")
    ours, _ = build_optimizer(stage, {"lora": Params(*params[0])}, METHOD, CPU)
    reference = bnb.optim.AdamW8bit(params[1], lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    start = [p.detach().clone() for p in params[0]]
    train(ours, params[0])
    train(reference, params[1])
    assert all(torch.equal(p, q) for p, q in zip(*params))
    assert ours.state[params[0][0]]["state1"].dtype == torch.uint8  # 8-bit moments (bitsandbytes quantises tensors of 4096+ elements)

    full = twin_parameters()[0]  # fp32 AdamW from the same start, on the same gradients
    train(torch.optim.AdamW(full, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8), full)
    for p, q, s in zip(params[0], full, start):
        update = (q.detach() - s).abs().max()
        assert (p.detach() - q.detach()).abs().max() < 0.3 * update  # quantised moments: a close step


def test_hardware_adamw8bit_turns_only_the_adamw_stages_8bit():
    adamw = Stage(name="a", train=("unet",), steps=1, lr=1e-5, start=0)
    prodigy = Stage(name="b", train=("unet",), steps=1, lr=1.0, start=1, optimizer="prodigy")
    low_memory = HardwareSettings.from_cfg(LOW_MEMORY_CFG)
    assert low_memory.optimizer == "adamw8bit"
    assert [optimizer_name(s, low_memory) for s in (adamw, prodigy)] == ["adamw8bit", "prodigy"]
    assert [optimizer_name(s, CPU) for s in (adamw, prodigy)] == ["adamw", "prodigy"]


@pytest.mark.parametrize("override, package", [
    ("+method.stages.lora.optimizer=prodigy", "prodigyopt"),
    ("+method.stages.lora.optimizer=adamw8bit", "bitsandbytes"),
    ("hardware.optimizer=adamw8bit", "bitsandbytes"),
])
def test_a_missing_optimizer_package_is_one_line_before_the_run_dir(override, package, make_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    cfg = make_cfg(*QUICK, *LORA, override)
    with pytest.raises(PersonalizeError) as error:
        prepare_run(cfg)
    key, value = override.lstrip("+").split("=")
    assert one_line(error) == (f"{key}={value} needs the package {package}, which is not installed: pip install {package} "
                               f"(or 'personalize[{OPTIMIZERS[value][2]}]'), or use {key}=adamw")
    assert not os.path.exists(cfg.paths.output_dir)


def test_the_optimizer_settings_reach_every_optimizer():
    cfg = compose("train", ["method=lora", "method.optimizer.betas=[0.8,0.99]", "method.optimizer.eps=1e-6",
                            "method.optimizer.weight_decay=0.5", "method.optimizer.prodigy_safeguard_warmup=false"],
                  output_dir="/unused")
    method, method_cfg = method_settings(cfg), cfg.method
    for name in OPTIMIZERS:
        stage = Stage(name="lora", train=("lora",), steps=1, lr=1e-3, start=0, optimizer=name)
        optimizer, _ = build_optimizer(stage, {"lora": Params(torch.nn.Parameter(torch.zeros(3)))}, method, CPU)
        group = optimizer.param_groups[0]
        assert (group["betas"], group["eps"], group["weight_decay"], group["lr"]) == ((0.8, 0.99), 1e-6, 0.5, 1e-3), name
        if name == "prodigy":
            assert (group["safeguard_warmup"], group["use_bias_correction"]) == (False, True)
    # all installed here: no error, from the settings or from the preset's config (what the config checks pass)
    check_optimizers(parse_stages(method_cfg.stages), HardwareSettings.from_cfg(LOW_MEMORY_CFG))
    check_optimizers(parse_stages(method_cfg.stages), LOW_MEMORY_CFG)


# ---------------------------------------------------------------- the settings' checks
@pytest.mark.parametrize("overrides, message", [
    (["+method.stages.lora.lr_scheduler=cosin"],
     "method.stages.lora.lr_scheduler=cosin is not a valid choice (did you mean 'cosine'?): use one of constant, "
     "constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial (diffusers' get_scheduler names)"),
    (["+method.stages.lora.optimizer=adam"], "method.stages.lora.optimizer=adam is not a valid choice (did you mean 'adamw'?)"),
    (["+method.stages.lora.lr_warmup_steps=10"],
     "method.stages.lora.lr_warmup_steps=10 has no effect with lr_scheduler=constant: use "
     "method.stages.lora.lr_scheduler=constant_with_warmup (or one of linear, cosine, cosine_with_restarts, "
     "polynomial), or lr_warmup_steps=0"),
    (["+method.stages.lora.lr_scheduler=cosine", "+method.stages.lora.lr_num_cycles=3"],
     "method.stages.lora.lr_num_cycles=3 has no effect with lr_scheduler=cosine: use "
     "method.stages.lora.lr_scheduler=cosine_with_restarts, or lr_num_cycles=1"),
    (["+method.stages.lora.lr_scheduler=linear", "+method.stages.lora.lr_power=2"],
     "method.stages.lora.lr_power=2 has no effect with lr_scheduler=linear"),
    (["+method.stages.lora.lr_num_cycles=0"], "method.stages.lora.lr_num_cycles=0 is out of range: use a whole number >= 1"),
    (["+method.stages.lora.lr_power=0"], "method.stages.lora.lr_power=0 is out of range: use a number > 0"),
    (["+method.stages.lora.lr_scheduler=polynomial", "method.stages.lora.lr=1e-8"],
     "method.stages.lora.lr=1e-08 with lr_scheduler=polynomial, which decays to 1e-07: use an lr above 1e-07"),
    (["+method.stages.lora.trainable_lr={unet: 1e-5}"],
     "method.stages.lora.trainable_lr.unet=1e-05: the stage trains lora, not unet: give lrs to those"),
    (["+method.stages.lora.trainable_lr={lora: -1}"],
     "method.stages.lora.trainable_lr.lora=-1 is out of range: use a number > 0 (the stage's learning rate)"),
    (["+method.stages.lora.trainable_lr=0.1"], "method.stages.lora.trainable_lr=0.1 is not a mapping: use {trainable: lr}"),
    (["method.scale_lr=yes"], "method.scale_lr=yes is not true or false"),
])
def test_a_bad_optimisation_setting_is_one_line_before_the_run_dir(overrides, message, make_cfg):
    cfg = make_cfg(*QUICK, *LORA, *overrides)
    with pytest.raises(PersonalizeError) as error:
        prepare_run(cfg)
    assert one_line(error).startswith(message), str(error.value)
    assert not os.path.exists(cfg.paths.output_dir)
