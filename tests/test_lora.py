"""A LoRA checkpoint reloads as the model that trained, whatever its alpha (issue 10, item 3).

LoRA's update is W + (alpha / rank) * B @ A. A checkpoint that holds only A and B is read back by
stock diffusers with alpha = rank (scale 1), so a run with alpha != rank would evaluate another model
than it trained. Each case trains the tiny model a few steps, then compares on fixed inputs:
- the base UNet with the file's A, B merged by hand at the configured alpha / rank (the reference,
  computed here with plain tensor arithmetic, no PEFT);
- the trained module's UNet;
- the checkpoint loaded by stock diffusers only (tests/helpers.stock_pipeline);
- the checkpoint loaded by our evaluation loader (artifacts.load_checkpoint_pipeline).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from personalize.artifacts import load_checkpoint_pipeline
from personalize.rundir import CONFIG_FILE, LORA_FILE, load_run_config
from personalize.train import fit, prepare_run
from tests.helpers import stock_pipeline, unet_output

# fp32 on CPU, the same shapes in every forward: the paths differ only in how the update is applied
# (merged into W vs a separate low-rank branch), i.e. in rounding, orders of magnitude below this.
ATOL = 1e-5
# The LoRA effect must dwarf the tolerance, or the comparison would pass for an adapter that does nothing.
MIN_EFFECT = 100 * ATOL


def train_lora(make_cfg, rank: int, alpha: float, steps: int = 3):
    """A short `method=lora` run (a learning rate large enough that the adapter moves well away from 0)."""
    run = prepare_run(make_cfg(
        "method=lora", "subject=sample_dog", f"method.lora.rank={rank}", f"method.lora.alpha={alpha}",
        f"method.stages.lora.steps={steps}", f"method.stages.lora.checkpoint_every={steps}",
        "method.stages.lora.lr=2e-2",
    ))
    fit(run, sample=False, evaluate=False)
    return run


# A file's down / up projections: PEFT's names (what we write) or diffusers' converted ones (older checkpoints)
DOWN_UP = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))


@torch.no_grad()
def hand_merged_unet(base_dir, lora_file, scale: float):
    """The base UNet with every W replaced by W + scale * up @ down, from the file's `unet.` keys."""
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    tensors = load_file(lora_file)
    pairs = [(k, k.removesuffix(down) + up) for k in tensors for down, up in DOWN_UP if k.endswith(down)]
    assert pairs and len(tensors) == 2 * len(pairs), sorted(tensors)[:4]
    paths = set()
    for down, up in pairs:
        path = down.removeprefix("unet.").rsplit(".", 3 if ".lora.down." in down else 2)[0]
        layer = unet.get_submodule(path)
        layer.weight += scale * (tensors[up] @ tensors[down])
        paths.add(path)
    return unet, paths


def lora_layers(unet) -> dict[str, LoraLayer]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def assert_adapter(unet, targets: set[str], rank: int, alpha: float, where: str):
    """Every adapted layer has the trained rank and scale alpha / rank, and exactly the trained layers are adapted."""
    layers = lora_layers(unet)
    assert set(layers) == targets, f"{where}: adapted layers differ from the trained ones"
    for name, layer in layers.items():
        (adapter,) = layer.active_adapters
        assert layer.r[adapter] == rank, f"{where}: {name} has rank {layer.r[adapter]}, trained {rank}"
        assert layer.scaling[adapter] == pytest.approx(alpha / rank), (
            f"{where}: {name} scales by {layer.scaling[adapter]}, trained alpha / rank = {alpha / rank}")


# alpha != rank both ways (the 8 vs 4, and a non-default rank with alpha below it), and alpha == rank
@pytest.mark.parametrize("rank,alpha", [(4, 8), (8, 2), (4, 4)])
def test_lora_checkpoint_reloads_as_the_trained_model(rank, alpha, make_cfg, tiny_model_dir):
    run = train_lora(make_cfg, rank, alpha)
    ckpt = run.checkpoints()[-1]
    trained = unet_output(run.module.unet)

    reference_unet, targets = hand_merged_unet(tiny_model_dir, ckpt / LORA_FILE, alpha / rank)
    reference = unet_output(reference_unet)
    base = unet_output(UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet"))
    effect = (reference - base).abs().max().item()
    assert effect > MIN_EFFECT, f"the LoRA changes the UNet output by only {effect:.2e}"
    assert torch.allclose(trained, reference, atol=ATOL), (
        f"trained module vs hand-merged file: max diff {(trained - reference).abs().max():.2e}")

    stock = stock_pipeline(tiny_model_dir, ckpt).unet
    diff = (unet_output(stock) - trained).abs().max().item()
    assert diff <= ATOL, f"stock-loaded UNet differs from the trained one by {diff:.2e} (LoRA effect {effect:.2e})"
    assert_adapter(stock, targets, rank, alpha, "stock load_lora_weights")

    ours = load_checkpoint_pipeline(ckpt).unet
    diff = (unet_output(ours) - trained).abs().max().item()
    assert diff <= ATOL, f"evaluation-loaded UNet differs from the trained one by {diff:.2e} (LoRA effect {effect:.2e})"
    assert_adapter(ours, targets, rank, alpha, "load_checkpoint_pipeline")


def test_lora_metadata_is_diffusers_own(make_cfg):
    """The file carries the adapter config where diffusers looks for it: `lora_adapter_metadata`, `unet.`-prefixed."""
    run = train_lora(make_cfg, rank=4, alpha=8, steps=1)
    with safe_open(run.checkpoints()[-1] / LORA_FILE, "pt") as f:
        header = f.metadata()
    config = json.loads(header["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8
    assert sorted(config["unet.target_modules"]) == sorted(run.cfg.method.lora.target_modules)
    assert config["unet.rank_pattern"] == {} and config["unet.alpha_pattern"] == {}


def strip_metadata(ckpt):
    """Rewrite the LoRA file as it was written before this change: the same tensors, no adapter metadata."""
    save_file(load_file(ckpt / LORA_FILE), ckpt / LORA_FILE, metadata={"format": "pt"})
    with safe_open(ckpt / LORA_FILE, "pt") as f:
        assert "lora_adapter_metadata" not in f.metadata()


def test_lora_checkpoint_without_metadata_still_loads_with_alpha_equal_to_rank(make_cfg, tiny_model_dir, tmp_path, caplog):
    """A checkpoint written before the metadata was saved loads as it always did (scale 1, the hand merge at
    alpha = rank), and our loader warns unless the run's config shows alpha = rank trained."""
    run = train_lora(make_cfg, rank=4, alpha=8, steps=1)
    ckpt = run.checkpoints()[-1]
    strip_metadata(ckpt)
    copied = tmp_path / "copied" / ckpt.name  # a checkpoint folder outside its run: no config.yaml to consult
    shutil.copytree(ckpt, copied)

    reference_unet, targets = hand_merged_unet(tiny_model_dir, ckpt / LORA_FILE, 1.0)
    reference = unet_output(reference_unet)
    for folder, says in [(ckpt, "method.lora.alpha=8 with rank=4"), (copied, "config.yaml")]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="personalize.methods.trainables"):
            ours = load_checkpoint_pipeline(folder).unet
        assert_adapter(ours, targets, rank=4, alpha=4, where=f"old checkpoint {folder}")
        assert torch.allclose(unet_output(ours), reference, atol=ATOL)
        warnings = [r.getMessage() for r in caplog.records if r.name == "personalize.methods.trainables"]
        assert len(warnings) == 1 and str(folder / LORA_FILE) in warnings[0] and says in warnings[0], warnings

    # the same file from a run that trained alpha = rank is exactly what trained: nothing to warn about
    config = load_run_config(run.run_dir)
    config.method.lora.alpha = config.method.lora.rank
    (run.run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(config))
    caplog.clear()
    with caplog.at_level("WARNING", logger="personalize.methods.trainables"):
        load_checkpoint_pipeline(ckpt)
    assert not [r for r in caplog.records if r.name == "personalize.methods.trainables"], caplog.text
