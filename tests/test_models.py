"""Model loading: the tiny model goes through from_pretrained; a missing hub model offline is one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from personalize.config import PROJECT_ROOT
from personalize.errors import PersonalizeError
from personalize.models import load_components


def test_tiny_model_is_built_once_and_loaded_like_a_hub_model(tiny_model_dir):
    assert (tiny_model_dir / "model_index.json").exists()
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_dir / part).is_dir()
    cfg = OmegaConf.create({"pretrained": str(tiny_model_dir), "tiny": False, "revision": None, "variant": None})
    components = load_components(cfg)
    assert components.unet.config.cross_attention_dim == components.text_encoder.config.hidden_size
    ids = components.tokenizer("a photo of rare dog").input_ids
    assert components.tokenizer.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "photo</w>", "of</w>", "rare</w>", "dog</w>"]


def test_missing_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    cfg = OmegaConf.create({"pretrained": "stabilityai/stable-diffusion-2-1-base", "tiny": False, "revision": None})
    with pytest.raises(PersonalizeError, match=r"stabilityai/stable-diffusion-2-1-base.*hf download"):
        load_components(cfg)


def test_cli_prints_one_line_for_a_missing_model(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PERSONALIZE_OUTPUTS=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "personalize.cli", "debug=default", "model=sd21_base", "subject=sample_dog"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stabilityai/stable-diffusion-2-1-base" in errors[0]
    assert "Traceback" not in result.stderr
