"""The smoke sweep, run once per test session and shared by test_sweep, test_report and test_notebooks.

Sweeps run as the user runs them: `personalize -m ...` in a subprocess, outputs in a temp dir, the
session's isolated cache (tiny model, class images), W&B offline, one thread (the CI box is small).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from personalize.config import PROJECT_ROOT

BIN = Path(sys.executable).parent
SMOKE = "zeng2023_table1_smoke"


@dataclass
class Sweep:
    outputs: Path  # PERSONALIZE_OUTPUTS of the sweep
    returncode: int
    log: str  # stdout + stderr
    seconds: float

    @property
    def runs(self) -> list[Path]:
        """The job dirs of the sweep(s), by job number."""
        return sorted((p.parent for p in self.outputs.glob("train/multiruns/*/*/*/config.yaml")),
                      key=lambda p: (p.parent.name, int(p.name.split("_")[0])))


def env(outputs: Path, **extra: str) -> dict:
    environ = dict(os.environ, PERSONALIZE_OUTPUTS=str(outputs), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    environ.update(extra)
    return environ


def run(command: str, *args: str, outputs: Path, timeout: float = 600, **extra: str) -> Sweep:
    """Run one of the package's commands (`personalize`, `personalize-report`, ...) like a user would."""
    start = time.monotonic()
    proc = subprocess.run([str(BIN / command), *args], cwd=PROJECT_ROOT, env=env(outputs, **extra),
                          capture_output=True, text=True, timeout=timeout)
    return Sweep(outputs, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)


_SESSION: dict[str, Sweep] = {}


def report(sweep: Sweep, experiment: str, *overrides: str) -> tuple[str, Path]:
    """`personalize-report experiment=<experiment>` over a sweep's outputs: its log and the report folder."""
    result = run("personalize-report", f"experiment={experiment}", "logger=none", *overrides, outputs=sweep.outputs)
    assert result.returncode == 0, result.log[-4000:]
    return result.log, sweep.outputs / "report" / experiment


def markdown_row(text: str, name: str) -> list[str]:
    """The cells (after the name) of the markdown table row named `name` in a report's output."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in row.strip("|").split("|")[1:]]


def smoke_sweep(tmp_path_factory) -> Sweep:
    """`personalize -m experiment=zeng2023_table1_smoke` (basic launcher, W&B offline), once per session."""
    if SMOKE not in _SESSION:
        outputs = tmp_path_factory.mktemp("smoke-sweep")
        # its own class-image cache: other tests of the session may already hold the same images
        sweep = run("personalize", "-m", f"experiment={SMOKE}", f"paths.class_image_dir={outputs / 'class_images'}",
                    outputs=outputs)
        assert sweep.returncode == 0, sweep.log[-4000:]
        _SESSION[SMOKE] = sweep
    return _SESSION[SMOKE]
