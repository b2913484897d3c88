"""Every notebook in notebooks/ executes top to bottom (nbclient, a real kernel), on the smoke sweep's output.

A notebook executed by another test file (listed in EXECUTED_ELSEWHERE) is not run twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from personalize.config import PROJECT_ROOT
from tests import sweeps

NOTEBOOKS = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))
EXECUTED_ELSEWHERE = {"edit_walkthrough.ipynb": "tests/test_edit_cli.py"}


def test_notebooks_executed_elsewhere_really_are():
    for name, test_file in EXECUTED_ELSEWHERE.items():
        if (PROJECT_ROOT / "notebooks" / name).exists():
            assert name in (PROJECT_ROOT / test_file).read_text(), f"{test_file} no longer executes {name}"


@pytest.mark.slow  # a kernel per notebook (~30 s each on 2 cores); the report they call is tested in test_report.py
@pytest.mark.parametrize("notebook", [n for n in NOTEBOOKS if n.name not in EXECUTED_ELSEWHERE], ids=lambda p: p.stem)
def test_notebook_executes(notebook: Path, tmp_path_factory, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    sweep = sweeps.smoke_sweep(tmp_path_factory)  # notebooks read the sweep's outputs
    for key, value in sweeps.env(sweep.outputs, COMPARE_EXPERIMENT=sweeps.SMOKE).items():
        if key in ("PERSONALIZE_OUTPUTS", "OMP_NUM_THREADS", "WANDB_MODE", "HF_HUB_OFFLINE", "COMPARE_EXPERIMENT"):
            monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(PROJECT_ROOT / "notebooks")}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    if notebook.stem == "compare_methods":
        text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                         for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "4 run(s) of group 'zeng2023_table1_smoke'" in text
        assert "every method x subject x column has a value" in text
        images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert len(images) >= 2, "the step plot and the image grid"
    assert os.environ["PERSONALIZE_OUTPUTS"] == str(sweep.outputs)
