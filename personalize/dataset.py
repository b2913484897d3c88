"""The DreamBooth dataset (Ruiz et al., CVPR 2023; github.com/google/dreambooth, CC BY 4.0): fetch it into
`paths.dreambooth_dir`, verify it and say where it is (`personalize-data`, `make data`).

What comes from the repository's zip archive (one file, about 110 MB, fetched with the standard library):
its `dataset/` folder (the 30 subject folders, 158 photos at full resolution, `prompts_and_classes.txt`,
`references_and_licenses.txt`) and, for attribution, the repository's LICENSE and README.

A partial download never looks complete: the archive is downloaded and unpacked into a staging folder
beside the target, checked there, and `.complete` (the counts) is written last, before one rename puts
the folder in place. A killed fetch leaves only its staging folder, which the next call removes
(`personalize.io`'s temp naming: the writer's pid tells a dead writer's leftovers from a live one's).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from omegaconf import DictConfig, OmegaConf

from personalize.config import CONF_DIR
from personalize.data import IMAGE_SUFFIXES, open_rgb
from personalize.errors import PersonalizeError
from personalize.io import atomic_dir, atomic_write_json, remove_stale_temps

EXPECTED_SUBJECTS = 30
EXPECTED_PHOTOS = 158
PHOTOS_PER_SUBJECT = (4, 6)
MARKER = ".complete"
PROMPTS_FILE = "prompts_and_classes.txt"
REPOSITORY_URL = "https://github.com/google/dreambooth"
DEFAULT_URL = "https://codeload.github.com/google/dreambooth/zip/refs/heads/main"  # conf/data.yaml's url
_CHUNK = 1 << 20
_CHECK_SIDE = 64  # photos are decoded at reduced scale to prove them readable (libjpeg's DCT scaling)


@dataclass
class Inspection:
    """What a dataset folder holds, and what is wrong with it (empty `problems`: complete)."""

    root: Path
    photos: dict[str, int] = field(default_factory=dict)  # subject folder -> number of readable photos
    problems: list[str] = field(default_factory=list)
    marker: dict | None = None

    @property
    def total(self) -> int:
        return sum(self.photos.values())

    def counts(self) -> str:
        return f"{len(self.photos)} subjects, {self.total} photos"

    def first_problem(self) -> str:
        more = len(self.problems) - 1
        return self.problems[0] + (f" (and {more} more problem{'s' * (more > 1)})" if more > 0 else "")


def expected_subjects(conf_dir: Path = CONF_DIR) -> dict[str, int | None]:
    """The subjects whose config reads from `paths.dreambooth_dir`: folder name -> photos it should hold
    (its `num_images`). Read from conf/subject/*.yaml, unresolved, so the list never needs upkeep."""
    pattern = re.compile(r"\$\{paths\.dreambooth_dir\}/([^/]+)/?")
    subjects: dict[str, int | None] = {}
    for path in sorted((Path(conf_dir) / "subject").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        match = pattern.fullmatch(str(node.get("data_dir", "")))
        if match:
            subjects[match.group(1)] = node.get("num_images")
    return subjects


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def inspect_dataset(root: Path, conf_dir: Path = CONF_DIR) -> Inspection:
    """Check a dataset folder without changing it: every configured subject folder is there with 4-6
    readable photos (as many as its config says), 30 subjects and 158 photos in all, the prompts file,
    and, if there is a `.complete` marker, that it agrees with what is there now."""
    root = Path(root)
    result = Inspection(root)
    if not root.is_dir():
        result.problems.append(f"there is no folder {root}")
        return result
    if not (root / PROMPTS_FILE).is_file():
        result.problems.append(f"{PROMPTS_FILE} is missing")
    low, high = PHOTOS_PER_SUBJECT
    subjects = expected_subjects(conf_dir)
    for name, expected in subjects.items():
        folder = root / name
        if not folder.is_dir():
            result.problems.append(f"subject folder '{name}' is missing")
            continue
        readable = 0
        for photo in _photos(folder):
            try:
                open_rgb(photo, min_side=_CHECK_SIDE)
                readable += 1
            except PersonalizeError:
                result.problems.append(f"photo '{name}/{photo.name}' cannot be read (corrupt or truncated)")
        result.photos[name] = readable
        if not low <= readable <= high or (expected is not None and readable != int(expected)):
            want = f"{expected}" if expected is not None else f"{low}-{high}"
            result.problems.append(f"subject '{name}' has {readable} readable photos, not {want}")
    # the configs could drift from the dataset (a subject added or removed): the dataset's own counts
    if not result.problems and (len(result.photos), result.total) != (EXPECTED_SUBJECTS, EXPECTED_PHOTOS):
        result.problems.append(f"it has {result.counts()}, not {EXPECTED_SUBJECTS} subjects and {EXPECTED_PHOTOS} photos")
    result.marker = read_marker(root)
    if result.marker is not None and not result.problems and result.marker.get("photos") != result.photos:
        result.problems.append(f"its {MARKER} marker lists other photo counts than the folders hold (changed since?)")
    return result


def read_marker(root: Path) -> dict | None:
    try:
        marker = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(root: Path, found: Inspection, source: str) -> None:
    """`.complete`: written last, after the checks passed; a folder without it was never finished by us."""
    atomic_write_json(Path(root) / MARKER, {
        "subjects": len(found.photos), "total_photos": found.total, "photos": found.photos, "source": source,
        "verified": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


# ---------------------------------------------------------------- fetching
def _by_hand(url: str, target: Path) -> str:
    return (f"download {url} by hand (the google/dreambooth repository as a zip), unzip it, move its dataset/ "
            f"folder to {target}, then check it with `personalize-data verify_only=true`")


class _Progress:
    """One progress line on stderr: rewritten in place on a terminal, else a line every 10%."""

    def __init__(self, url: str, total: int, stream=None):
        self.url, self.total, self.stream = url, total, stream or sys.stderr
        self.done, self.step, self.last, self.printed = 0, -1, 0.0, ""
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def _text(self) -> str:
        mb = self.done / 1e6
        if self.total:
            return f"downloading {self.url}: {mb:.1f} of {self.total / 1e6:.1f} MB ({100 * self.done // self.total}%)"
        return f"downloading {self.url}: {mb:.1f} MB"

    def update(self, n: int) -> None:
        self.done += n
        if self.tty:
            now = time.monotonic()
            if now - self.last >= 0.2:
                self.last = now
                self.stream.write("\r" + self._text())
                self.stream.flush()
            return
        step = 10 * self.done // self.total if self.total else self.done // (16 * _CHUNK)
        if step != self.step:
            self.step, self.printed = step, self._text()
            print(self.printed, file=self.stream, flush=True)

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._text() + "\n")
        elif self.printed != self._text():
            print(self._text(), file=self.stream)
        self.stream.flush()


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def open_url(url: str, timeout: float, target: Path):
    """The response for `url`; offline (or any failure to connect) is one line saying how to get the
    dataset by hand. Called before anything is written, so a failure leaves no trace."""
    try:
        return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - the URL is the user's setting
    except _NETWORK_ERRORS as error:
        reason = getattr(error, "reason", None) or error
        raise PersonalizeError(f"cannot download the DreamBooth dataset from {url} ({reason}): {_by_hand(url, target)}") from error
    except ValueError as error:  # "unknown url type"
        raise PersonalizeError(f"url={url} is not a URL ({error}): use the repository's zip, e.g. url={DEFAULT_URL}") from error


def download(response, dest: Path, url: str, target: Path) -> int:
    """Stream an opened response into `dest` with a progress line; a download cut off is one line too.
    Returns the number of bytes."""
    with open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        progress = _Progress(url, total)
        try:
            while chunk := response.read1(_CHUNK):  # what has arrived: the progress line moves with the data
                out.write(chunk)
                progress.update(len(chunk))
        except _NETWORK_ERRORS as error:
            raise PersonalizeError(
                f"the download from {url} broke off after {progress.done / 1e6:.1f} MB ({error}): run it again, or "
                f"{_by_hand(url, target)}"
            ) from error
        progress.finish()
    if total and progress.done != total:
        raise PersonalizeError(
            f"the download from {url} stopped at {progress.done} of {total} bytes: run it again, or {_by_hand(url, target)}"
        )
    return progress.done


def extract_dataset(archive: Path, dest: Path, url: str, target: Path) -> None:
    """Unpack the archive's `dataset/` folder into `dest` (and the repository's LICENSE/README beside it).

    GitHub archives hold one top folder (`dreambooth-main/`); it is found from where the prompts file is,
    so another branch or a re-zipped copy works too. Names that would leave `dest` are refused.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == f"dataset/{PROMPTS_FILE}" or n.endswith(f"/dataset/{PROMPTS_FILE}")]
            if not names:
                raise PersonalizeError(
                    f"the archive from {url} has no dataset/{PROMPTS_FILE}: it is not the google/dreambooth "
                    f"repository; set url= to its zip, e.g. {DEFAULT_URL}"
                )
            dataset = min(names, key=len)[: -len(PROMPTS_FILE)]  # "dreambooth-main/dataset/"
            top = dataset[: -len("dataset/")]
            for info in zf.infolist():
                name = info.filename
                if info.is_dir():
                    continue
                if name.startswith(dataset):
                    relative = name[len(dataset):]
                elif name.startswith(top) and "/" not in name[len(top):] and name[len(top):].upper().startswith(("LICENSE", "README")):
                    relative = name[len(top):]
                else:
                    continue
                parts = PurePosixPath(relative).parts
                if not parts or relative.startswith("/") or any(p in ("..", "") or p.startswith(".") for p in parts):
                    continue  # hidden files (.DS_Store) and anything that would leave dest
                out = dest.joinpath(*parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(out, "wb") as sink:
                    shutil.copyfileobj(source, sink, _CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise PersonalizeError(
            f"the download from {url} is not a readable zip archive ({error}): run personalize-data force=true "
            f"again, or {_by_hand(url, target)}"
        ) from error


def fetch(url: str, target: Path, timeout: float = 60.0) -> Inspection:
    """Download, unpack and check the dataset in a staging folder beside `target`, then rename it into
    place (replacing what was there). Any failure leaves `target` as it was."""
    response = open_url(url, timeout, target)
    try:
        with response, atomic_dir(target) as staging:
            archive = staging / ".archive.zip"
            download(response, archive, url, target)
            extract_dataset(archive, staging, url, target)
            archive.unlink()
            found = inspect_dataset(staging)
            if found.problems:
                raise PersonalizeError(
                    f"the archive from {url} is not the complete DreamBooth dataset: {found.first_problem()}; "
                    f"nothing was written to {target}"
                )
            write_marker(staging, found, url)  # last: only a fully checked folder carries it
    except OSError as error:  # the network's errors are PersonalizeErrors by now: this is the disk
        raise PersonalizeError(
            f"cannot write the dataset beside {target} ({error}): it needs ~250 MB while unpacking and a folder "
            "you can write to; choose another with DREAMBOOTH_DIR=<dir> (or paths.dreambooth_dir=<dir>)"
        ) from error
    found.root = Path(target)
    return found


def target_dir(cfg: DictConfig) -> Path:
    """paths.dreambooth_dir as an absolute path (symlinks kept: a linked dataset stays linked)."""
    return Path(os.path.normpath(os.path.abspath(os.path.expanduser(str(cfg.paths.dreambooth_dir)))))


def data_task(cfg: DictConfig) -> Path:
    """`personalize-data`: fetch the dataset unless the target already passes the checks (a complete copy
    without the marker, placed by hand, is then marked); `verify_only` only checks, never writes;
    `force` fetches again and replaces what is there."""
    for key in ("verify_only", "force"):  # `force=yes` would otherwise count as true
        if not isinstance(cfg[key], bool):
            raise PersonalizeError(f"{key}={cfg[key]} is not true or false: use {key}=true or {key}=false")
    if isinstance(cfg.timeout_s, bool) or not isinstance(cfg.timeout_s, (int, float)) \
            or not 0 < cfg.timeout_s < float("inf"):
        raise PersonalizeError(f"timeout_s={cfg.timeout_s} is not a positive number of seconds: use e.g. timeout_s=60")
    target = target_dir(cfg)
    url = str(cfg.url)
    if target.parent.is_dir():  # what a killed fetch left beside the target: never read, only disk
        remove_stale_temps(target.parent, prefix=f".{target.name}.")
    if target.exists() and not target.is_dir():
        raise PersonalizeError(f"paths.dreambooth_dir={target} is a file, not a folder: remove it or choose another path")
    present = target.is_dir() and any(target.iterdir())
    if cfg.verify_only or (present and not cfg.force):
        found = inspect_dataset(target)
        if found.problems and not present:
            raise PersonalizeError(f"there is no DreamBooth dataset at {target}: fetch it with `personalize-data` "
                                   f"(make data), or {_by_hand(url, target)}")
        if found.problems:
            fix = "`personalize-data force=true` replaces it with a fresh download"
            raise PersonalizeError(f"{target} is not a complete DreamBooth dataset: {found.first_problem()}: {fix} "
                                   f"(the dataset: {REPOSITORY_URL}, {EXPECTED_SUBJECTS} subject folders, {EXPECTED_PHOTOS} photos)")
        state = "complete"
        if found.marker is None and not cfg.verify_only:  # a copy placed by hand, now fully checked: mark it
            try:
                write_marker(target, found, "placed by hand, verified in place")
                state = f"complete (checked now, {MARKER} written)"
            except OSError:  # a read-only copy is as good; it is checked in full on every call anyway
                state = "complete (checked now; read-only, not marked)"
        print(f"DreamBooth dataset: {found.counts()} in {target}, {state}; nothing to download"
              + ("" if cfg.verify_only else " (force=true fetches it again)"))
    else:
        found = fetch(url, target, timeout=float(cfg.timeout_s))
        print(f"DreamBooth dataset: {found.counts()} in {target}, fetched from {url} and verified")
    print(f"`personalize subject=dog` (or any of the {EXPECTED_SUBJECTS}) reads it from paths.dreambooth_dir; to keep it "
          "elsewhere, set DREAMBOOTH_DIR or paths.dreambooth_dir in conf/local/default.yaml")
    return target
