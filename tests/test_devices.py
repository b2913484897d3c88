"""personalize.devices: what `auto` becomes on a machine with and without a GPU, and the error lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from personalize.devices import device_of, dtype_name, resolve_device, resolve_dtype, resolve_hardware
from personalize.errors import PersonalizeError


def preset(name="auto", accelerator="auto", precision="auto", frozen_dtype="auto"):
    return OmegaConf.create(dict(name=name, accelerator=accelerator, precision=precision, frozen_dtype=frozen_dtype))


@pytest.fixture
def gpu(monkeypatch):
    """A machine that reports a CUDA GPU; `bf16` says whether it supports bf16 (an A100 does, a V100 not)."""
    def visible(bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    return visible


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_on_a_cpu_machine_is_fp32_on_cpu(no_gpu):
    assert resolve_hardware(preset()) == ("cpu", "32-true", torch.float32)
    assert device_of("cpu") == torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == "cpu"


@pytest.mark.parametrize("bf16, precision, frozen", [(True, "bf16-mixed", torch.bfloat16),
                                                     (False, "16-mixed", torch.float16)])
def test_auto_on_a_gpu_picks_bf16_where_supported_else_fp16(gpu, bf16, precision, frozen):
    gpu(bf16)
    assert resolve_hardware(preset()) == ("gpu", precision, frozen)
    assert device_of("gpu") == torch.device("cuda")
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"


def test_explicit_settings_are_kept(gpu):
    gpu(True)
    assert resolve_hardware(preset("gpu", "gpu", "32-true", "float32")) == ("gpu", "32-true", torch.float32)
    # frozen_dtype=auto follows the precision: the frozen parts run in the autocast dtype
    assert resolve_hardware(preset("gpu_fp16", "gpu", "16-mixed"))[2] == torch.float16
    assert resolve_hardware(preset("cpu", "cpu", "bf16-mixed", "bfloat16")) == ("cpu", "bf16-mixed", torch.bfloat16)


def test_a_gpu_setting_without_a_gpu_is_one_line(no_gpu):
    with pytest.raises(PersonalizeError, match=r"^hardware=gpu_bf16 needs a CUDA GPU but none is visible: "
                                               r"use hardware=cpu \(or auto\)$"):
        resolve_hardware(preset("gpu_bf16", "gpu", "bf16-mixed"))
    with pytest.raises(PersonalizeError, match=r"^device=cuda:0 but no CUDA GPU is available: use device=cpu \(or auto\)$"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("precision, frozen", [("16-mixed", "auto"), ("32-true", "float16")])
def test_fp16_on_cpu_is_one_line(no_gpu, precision, frozen):
    with pytest.raises(PersonalizeError, match=r"does not run on CPU: use hardware.precision=bf16-mixed "
                                               r"hardware.frozen_dtype=bfloat16 \(or 32-true/float32\)$"):
        resolve_hardware(preset("cpu", "cpu", precision, frozen))


def test_dtype_names_and_aliases():
    expected = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    assert {name: resolve_dtype(name) for name in expected} == expected
    assert resolve_dtype(None) == torch.float32
    with pytest.raises(PersonalizeError, match=r"^dtype=half is not one of float32, float16, bfloat16$"):
        resolve_dtype("half")
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]
    assert dtype_name(torch.float64) == "torch.float64"


def test_personalize_sample_asks_for_a_missing_gpu_in_one_line(tmp_path):
    """personalize-sample resolves `device` like personalize-edit, before it looks for the checkpoint."""
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a GPU machine
    result = subprocess.run([str(Path(sys.executable).parent / "personalize-sample"), f"run_dir={tmp_path}", "device=cuda:0"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=no_gpu)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: device=cuda:0 but no CUDA GPU is available: use device=cpu (or auto)")


# ---------------------------------------------------------------- hardware.offload_text_encoders
def test_offloaded_text_encoders_are_not_asked_again_and_train_the_same(make_cfg, monkeypatch):
    """A stage that trains nothing of the text encoders (LoRA on tiny FLUX, with the object templates: 27 prompts)
    encodes every prompt it can draw at its start and moves the encoders off the device (here the CPU already: a
    hook on each encoder fails the run if it runs again after the move). It trains exactly as without it."""
    from personalize.methods.module import Personalizer
    from personalize.train import fit, prepare_run

    overrides = ["model=tiny_flux", "method=lora", "subject=sample_dog", "method.prompt_templates=object",
                 "method.batch_size=2", "method.stages.lora.steps=3", "method.stages.lora.checkpoint_every=null",
                 "eval=none"]
    plain = prepare_run(make_cfg(*overrides, name="plain"))
    fit(plain, sample=False, evaluate=False)

    moved: list[torch.device] = []
    place = Personalizer._place_text_encoders

    def refuse(module, args):
        raise AssertionError(f"{type(module).__name__} ran after it was moved off the device")

    def moving(self, device):
        moved.append(device)
        place(self, device)
        for _, encoder in self.components.text_encoders():
            encoder.register_forward_pre_hook(refuse)

    monkeypatch.setattr(Personalizer, "_place_text_encoders", moving)
    offloaded = prepare_run(make_cfg(*overrides, "hardware.offload_text_encoders=true", name="offloaded"))
    fit(offloaded, sample=False, evaluate=False)
    module = offloaded.module
    assert moved == [torch.device("cpu")]  # once, at the stage's start
    assert set(module._prompt_embeds) == set(module.example_prompts.every_prompt()) and len(module._prompt_embeds) > 20
    lora = {n: p for n, p in plain.module.unet.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, dict(module.unet.named_parameters())[n]) for n, p in lora.items())
