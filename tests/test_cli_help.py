"""What a user sees first: `--help` of each entry point, and shell completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command, what", [
    ("personalize", "Teach a text-to-image diffusion model one subject"),
    ("personalize-sample", "Sample images from a checkpoint"),
    ("personalize-eval", "Evaluate the checkpoints of a finished run"),
    ("personalize-report", "Print a paper's table"),
    ("personalize-edit", "Put a personalized subject into another picture"),
    ("personalize-data", "Fetch the DreamBooth dataset"),
])
def test_help_starts_with_what_the_tool_does_and_examples(command, what):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{command}: {what}")
    assert "powered by Hydra" not in result.stdout
    examples = lines[lines.index("Examples:") + 1:]
    examples = examples[:examples.index("")]
    assert len(examples) >= 3 and all(e.strip().startswith(command) for e in examples)
    assert "== Config ==" in result.stdout  # Hydra still fills in the composed config


def test_help_lists_choosable_groups_without_internal_files():
    out = run("personalize", "--help").stdout
    groups = dict(line.strip().split(": ", 1) for line in out.split("Config groups")[1].split("\n\n")[0].splitlines()[1:])
    assert groups["method"].split(", ") == ["custom_diffusion", "dreambooth", "finetune", "lora", "pivotal", "textual_inversion", "two_stage"]
    assert "tiny" in groups["model"].split(", ") and "sample_dog" in groups["subject"].split(", ")
    assert all("_common" not in options and "/" not in options for options in groups.values())


def test_bash_completion_installs_and_completes_groups_and_options():
    install = run("personalize", "-sc", "install=bash")
    assert install.returncode == 0, install.stderr
    assert install.stdout.rstrip().endswith("-F hydra_bash_completion personalize")
    keys = run("personalize", "-sc", "query=bash", env={"COMP_LINE": "personalize meth"}).stdout.split()
    assert "method=" in keys
    options = run("personalize", "-sc", "query=bash", env={"COMP_LINE": "personalize method="}).stdout.split()
    assert {"method=two_stage", "method=dreambooth", "method=lora"} <= set(options)
