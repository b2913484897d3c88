"""Atomic file and folder writes: a killed run never leaves a truncated file that a later run trusts.

Everything is written under a temporary name in the same folder and renamed into place (`os.replace`
is atomic on POSIX within one file system). Temporary names carry the writer's pid, so the leftovers of a
killed writer can be told from the work of a live one (`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_image(image, path: Path) -> None:
    """Save a PIL image; the format follows the suffix of `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a staging folder that becomes `path` only when the block finishes without error.

    An existing `path` is replaced (a re-saved checkpoint of the same step after a resume).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the result is an ordinary folder
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# `.<name>.<pid>.tmp` (files) and `.<name>.<pid>.<random>` (staging folders), as written above
_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: Path, recursive: bool = False, prefix: str = "") -> list[Path]:
    """Delete the temporary files and staging folders that killed writers left in `folder`
    (only those whose names start with `prefix`: a folder the user owns holds only our own leftovers).

    Nothing ever reads them (they never got their final name); this only frees the disk. A writer is
    judged dead by its pid on this machine, so on a file system shared by several machines a live
    writer elsewhere could lose its temp file and fail; it would not corrupt anything.
    """
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in list(dirs) + files:
            match = _TEMP.match(name)
            if match and name.startswith(prefix) and not _alive(int(match.group("pid"))):
                entry = Path(root) / name
                if name in dirs:
                    shutil.rmtree(entry, ignore_errors=True)
                    dirs.remove(name)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        if not recursive:
            break
    return removed


def build_atomically(path: Path, marker: str, build) -> Path:
    """Build a folder once: `build(staging)` writes it beside `path`, and a rename puts it in place.

    `marker` is a file whose presence means the folder is complete. A reader never sees a half-written
    folder; when several jobs race, the first rename wins and the others drop their copy.
    """
    path = Path(path)
    if (path / marker).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(staging)
        try:
            staging.rename(path)
        except OSError:
            if not (path / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_jsonl(path: Path, log=None) -> list[dict]:
    """The JSON objects of a .jsonl file, in order; a line that does not parse is skipped with a warning
    (a record cut short by a kill before atomic writes, or edited by hand)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if log is not None:
                log.warning("%s:%d is not a JSON record; skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
