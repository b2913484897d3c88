"""Shared fixtures: an isolated cache (tiny model, class images) per test session, and config composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports wandb/HF: never touch the network from tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from personalize.config import PROJECT_ROOT, compose  # noqa: E402

SHARED_DREAMBOOTH = PROJECT_ROOT.parent / "shared" / "dreambooth"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Tiny models and class images of this session live in a temp dir, not in the user's .cache."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["PERSONALIZE_CACHE"] = str(cache)
    return cache


def _tiny_dir(model: str) -> Path:
    """Where a tiny model config's model is, built on first use (in the session's isolated cache)."""
    from personalize.models import resolve_pretrained

    return Path(resolve_pretrained(compose("train", [f"model={model}"], output_dir="/unused").model))


@pytest.fixture(scope="session")
def tiny_model_dir(isolated_cache) -> Path:
    return _tiny_dir("tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(isolated_cache) -> Path:
    return _tiny_dir("tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_flux_dir(isolated_cache) -> Path:
    return _tiny_dir("tiny_flux")


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the train config on the tiny model (debug preset) with outputs under tmp_path."""
    def _make(*overrides: str, name: str = "run"):
        return compose("train", ["debug=default", *overrides], output_dir=tmp_path / name)

    return _make
