"""Reading an offline W&B run back: what the tests check a run logged (history rows, how it ended).

Only the tests read a run's `.wandb` file (a private format of wandb's, see `read_offline_history`), so
the parser lives beside them rather than in the package.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline W&B runs under a run dir (`<run>/wandb/offline-run-*`), oldest first."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def read_offline_history(wandb_run: Path, wait_s: float = 30.0) -> list[dict]:
    """The history rows (each `log` call) of an offline W&B run, read from its `.wandb` file.

    wandb has no public reader for offline runs, so this parses the file directly: a LevelDB-style log
    (7-byte file header, 32 KiB blocks, records split into FULL/FIRST/MIDDLE/LAST chunks) of protobuf
    `Record`s; history items carry JSON values. `wandb.finish()` can return before wandb's service has
    written the file out, so this waits (up to `wait_s`) for the run's closing `exit` record.
    """
    return [{(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            for kind, record in _complete_records(Path(wandb_run), wait_s) if kind == "history"]


def read_offline_exit(wandb_run: Path, wait_s: float = 30.0) -> dict:
    """How an offline W&B run ended: its exit code (None if it never closed), whether it was marked
    preempting, its summary updates (key -> JSON value, the last one of each key) and the summary keys
    it removed."""
    out: dict = {"exit_code": None, "preempting": False, "summary": {}, "removed": []}
    for kind, record in _complete_records(Path(wandb_run), wait_s):
        if kind == "exit":
            out["exit_code"] = record.exit.exit_code
        elif kind == "preempting":
            out["preempting"] = True
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.summary.remove:
                key = item.key or "/".join(item.nested_key)
                out["summary"].pop(key, None)
                out["removed"].append(key)
    return out


def _complete_records(wandb_run: Path, wait_s: float) -> list:
    deadline = time.monotonic() + wait_s
    while True:
        records = _offline_records(wandb_run)
        if any(kind == "exit" for kind, _ in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _offline_records(wandb_run: Path) -> list:
    """(record type, Record) of every complete record in the run's `.wandb` file, in order."""
    path = next(Path(wandb_run).glob("*.wandb"))
    raw = path.read_bytes()
    block, header = 32768, 7
    records, pos, pending = [], 7, b""
    while pos + header <= len(raw):
        if block - pos % block < header:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + header])
        pos += header
        data, pos = raw[pos:pos + length], pos + length
        if pos > len(raw):  # the writer is mid-record
            break
        if kind in (1, 2):  # FULL, FIRST
            pending = data
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += data
        else:
            continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append((record.WhichOneof("record_type"), record))
    return records
