"""Stopping cleanly on a signal: preemption, a time limit, Ctrl-C.

SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are how a job is told to stop: SLURM sends SIGTERM on preemption
or `scancel`, and SIGUSR1/SIGUSR2 before a time limit (`--signal`; the submitit launcher asks for
SIGUSR2); Ctrl-C is SIGINT. While `deferred()` is active, the handler only records the signal. The work
stops at the next point where nothing is lost:

- training: at the end of the current step; the run writes a resume state of that step
  (`ArtifactCheckpoint`), so `resume=true` continues it bit-identically;
- class-image generation: between batches (images already written stay);
- evaluation: between batches and (checkpoint, protocol) pairs (images and records written stay).

There `raise_if_interrupted` raises `Interrupted`; the CLI (`personalize.cli.run_task`) writes an
`INTERRUPTED` note into the run dir (the signal, the step, what was running), marks the W&B run, and
exits with 128 + the signal number, the shell's convention for "killed by that signal". A resumed run
that finishes removes the note.

A second SIGINT stops at once (KeyboardInterrupt): a user pressing Ctrl-C twice means it. Any other
repeated or further signal only adds to the record: a cluster may send SIGTERM and SIGUSR2 together, and
neither must cut short the resume state being written.

Handlers installed before us (submitit's, in a SLURM job) are not lost: once the work has stopped and
the W&B run is closed, `pass_on` hands each received signal to the handler that was there before, so
submitit checkpoints its call and requeues the job, as it would have without us.

This module imports neither torch nor Lightning: the CLI and the tracking code use it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from personalize.io import atomic_write_json
from personalize.rundir import INTERRUPTED_FILE  # the run was stopped by a signal and can be resumed

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(BaseException):
    """The work stopped at a safe point because a stop signal arrived.

    A BaseException, like KeyboardInterrupt: an `except Exception` on the way up must not take it for an
    error and carry on. `signals` lists every stop signal received, the first (which decides the exit
    code) first.
    """

    def __init__(self, signals: list[int], phase: str, step: int | None = None, run_dir: Path | None = None):
        self.signals = list(signals)
        self.phase = phase
        self.step = step
        self.run_dir = None if run_dir is None else Path(run_dir)
        super().__init__(self.describe())

    @property
    def signum(self) -> int:
        return self.signals[0]

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        return f"interrupted by {signal_name(self.signum)} during {self.phase}{where}"


@dataclass
class _State:
    depth: int = 0  # nesting of deferred(): only the outermost installs and restores
    received: list[int] = field(default_factory=list)
    previous: dict[int, Any] = field(default_factory=dict)  # the handlers before ours, by signal


_state = _State()


def _record(signum: int, frame) -> None:
    """The handler: record, nothing else (it runs between two bytecodes of whatever was running)."""
    if signum == signal.SIGINT and signal.SIGINT in _state.received:
        raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step to end
    _state.received.append(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Record stop signals instead of dying of them, until the block ends; then restore the handlers.

    Re-entrant (the CLI wraps the whole task, `fit` wraps training again); signals can only be handled
    in the main thread, so elsewhere (a test runner's worker thread) this does nothing.
    """
    if not _in_main_thread():
        yield
        return
    outermost = _state.depth == 0
    if outermost:
        _state.received.clear()
        _state.previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in STOP_SIGNALS:
            signal.signal(s, _record)
    _state.depth += 1
    try:
        yield
        if outermost and _state.received:  # (only when the block ended normally)
            log.warning("received %s after the last point where the work could stop: it completed",
                        ", ".join(signal_name(s) for s in _state.received))
    finally:
        _state.depth -= 1
        if outermost:
            for s, handler in _state.previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            _state.received.clear()  # handled (an Interrupted carries them); none must stop later work


def active() -> bool:
    return _state.depth > 0


def reclaim() -> None:
    """Put our handler back where a library replaced it while `deferred()` is active.

    Lightning's Trainer installs its own SIGTERM handler in `fit` (one that ends training with exit code
    0, and in DDP broadcasts from inside the handler); `ArtifactCheckpoint` calls this in
    `on_train_start`, after Lightning's, and Lightning restores ours when `fit` returns.
    """
    if active() and _in_main_thread():
        for s in STOP_SIGNALS:
            if signal.getsignal(s) is not _record:
                signal.signal(s, _record)


def pending() -> list[int]:
    """The stop signals received so far (first first); empty when none."""
    return list(_state.received)


def raise_if_interrupted(phase: str, step: int | None = None, run_dir: Path | None = None) -> None:
    """Stop here if a stop signal has arrived. Call it only where stopping loses nothing."""
    if _state.received:
        raise Interrupted(_state.received, phase, step, run_dir)


def pass_on(signals: list[int]) -> None:
    """Hand each signal to the Python handler that was installed before ours, if any (submitit's).

    Not the defaults: SIG_DFL would kill the process before it sets its exit code, SIG_IGN means nobody
    listens, and Python's own SIGINT handler would only raise KeyboardInterrupt. Called after `deferred()`
    has ended, when the previous handlers are back in place. A handler may exit (submitit's requeue does).
    """
    for s in dict.fromkeys(signals):
        handler: Callable | Any = signal.getsignal(s)
        if callable(handler) and handler not in (_record, signal.default_int_handler):
            log.info("handing %s to the handler installed before ours (%s)", signal_name(s),
                     getattr(handler, "__qualname__", handler))
            handler(s, None)


# ---------------------------------------------------------------- the INTERRUPTED note of a run dir
def mark_interrupted(run_dir: Path, stop: Interrupted) -> Path:
    """Write `<run>/INTERRUPTED` (JSON): which signal, at which step, during what, and how to continue."""
    path = Path(run_dir) / INTERRUPTED_FILE
    atomic_write_json(path, {
        "signal": signal_name(stop.signum), "signals": [signal_name(s) for s in stop.signals],
        "exit_code": stop.exit_code, "phase": stop.phase, "step": stop.step,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resume": f"resume={Path(run_dir).absolute()}",
    })
    return path


def read_interrupted(run_dir: Path) -> dict | None:
    path = Path(run_dir) / INTERRUPTED_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # written atomically by us, so only a hand edit gets here
        return {"phase": "unknown"}


def clear_interrupted(run_dir: Path, phases: tuple[str, ...] | None = None) -> bool:
    """Remove the note once the interrupted work is done (`phases`: only a note of one of these)."""
    note = read_interrupted(run_dir)
    if note is None or (phases is not None and note.get("phase") not in phases):
        return False
    (Path(run_dir) / INTERRUPTED_FILE).unlink(missing_ok=True)
    log.info("%s: the interrupted run is complete; removed its %s note", run_dir, INTERRUPTED_FILE)
    return True
