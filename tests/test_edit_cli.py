"""`personalize-edit` end to end on a short demo-like run (tiny model, CPU), its configs, and the
edit walkthrough notebook executed top to bottom."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from personalize.config import CONF_DIR, PROJECT_ROOT, compose
from personalize.edit import EditSettings
from personalize.errors import PersonalizeError

PHOTO = PROJECT_ROOT / "data" / "samples" / "dog2" / "00.jpg"
NOTEBOOK = PROJECT_ROOT / "notebooks" / "edit_walkthrough.ipynb"
EDIT_CONFIGS = sorted(p.stem for p in (CONF_DIR / "edit").glob("*.yaml") if not p.stem.startswith("_"))
SHORT_DEMO = [  # the demo experiment, a few steps: two checkpoints (steps 4 and 6)
    "experiment=demo", "debug=default", "++eval.enabled=false",
    "method.stages.token.steps=2", "method.stages.unet.steps=4", "method.stages.unet.checkpoint_every=2",
]
FAST = ["edit=fast", "edit.num_inference_steps=4", "edit.null_text_inner_steps=2", "logger=none"]


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`personalize-edit` (the installed console script, else the same entry point through python)."""
    script = Path(sys.executable).parent / "personalize-edit"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from personalize.cli import edit_main; edit_main()"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    from personalize.train import train

    run_dir = tmp_path_factory.mktemp("edit-cli") / "run"
    train(compose("train", SHORT_DEMO, output_dir=run_dir))
    return run_dir


def _edit_cfg(run_dir: Path, out_dir: Path, *overrides: str):
    return compose("edit", [f"run_dir={run_dir}", f"out_dir={out_dir}", *FAST, *overrides])


# --- configs ---------------------------------------------------------------------------------------


def test_edit_configs_map_onto_edit_settings():
    fields = {f.name: f.default for f in dataclasses.fields(EditSettings)}
    common = compose("edit", ["run_dir=x", "edit=_common"]).edit
    assert dict(common) == fields  # same keys, same defaults as the dataclass
    assert {"default", "fast", "replace", "refine", "reweight", "local_blend"} <= set(EDIT_CONFIGS)
    for name in EDIT_CONFIGS:
        assert set(compose("edit", ["run_dir=x", f"edit={name}"]).edit) == set(fields), name


def test_settings_fill_templates_from_the_checkpoint():
    from personalize.edit.runner import settings_from_config

    info = {"phrase": "<rare> dog", "identifier": "<rare>", "class_noun": "dog"}
    blend = settings_from_config(compose("edit", ["run_dir=x", "edit=local_blend"]).edit, info)
    assert blend.blend_words == ["dog", "<rare>"]
    reweight = settings_from_config(compose("edit", ["run_dir=x", "edit=reweight"]).edit, info)
    assert reweight.reweight == {"<rare>": 2.0}
    pairs = compose("edit", ["run_dir=x", "edit=reweight", 'edit.reweight=[["{identifier}", 3], ["{class_noun}", 0.5]]'])
    assert settings_from_config(pairs.edit, info).reweight == {"<rare>": 3.0, "dog": 0.5}  # replaced, not merged
    window = settings_from_config(compose("edit", ["run_dir=x", "edit.cross_steps=[0.1,0.7]"]).edit, info)
    assert window.cross_steps == (0.1, 0.7)
    assert compose("edit", ["run_dir=x", "edit=replace"]).edit.mode == "replace"


# --- the entry point -------------------------------------------------------------------------------


def test_cli_edits_a_photo_end_to_end(demo_run, tmp_path):
    out = tmp_path / "photo"
    proc = _cli(f"run_dir={demo_run}", f"image={PHOTO}", f"out_dir={out}", *FAST[:-1],  # W&B offline: the default
                'source_prompt="a photo of a {class_noun}"', 'target_prompt="a photo of {phrase}"')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"side by side: {out / 'side_by_side.png'}"
    for name in ("side_by_side.png", "source.png", "reconstruction.png", "edited.png", "attention_source.png",
                 "attention_target.png", "edit.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "edit.json").read_text())
    assert record["source_prompt"] == "a photo of a dog" and record["target_prompt"] == "a photo of <rare> dog"
    assert record["controller"] == "Replace" and record["step"] == 6 and record["image"] == str(PHOTO)
    assert record["settings"]["num_inference_steps"] == 4 and record["reconstruction_psnr"] > 0
    single = Image.open(out / "edited.png")
    assert single.size == (64, 64) and Image.open(out / "source.png").size == (64, 64)
    tile = 256  # 64 px images are scaled up 4x in the side-by-side
    assert Image.open(out / "side_by_side.png").width == 3 * tile  # source | reconstruction | edit
    assert Image.open(out / "attention_target.png").width == 5 * 128  # one tile per word of the target
    assert list((out / "wandb").glob("offline-run-*")), "the W&B run is written offline into the edit folder"


def test_generated_source_local_blend_and_step(demo_run, tmp_path):
    from personalize.edit.runner import run_edit

    out = run_edit(_edit_cfg(demo_run, tmp_path / "gen", "edit=local_blend", "step=4", *FAST[1:],
                             'target_prompt="a photo of {phrase} on the beach"'))
    record = json.loads((out / "edit.json").read_text())
    assert record["step"] == 4 and record["image"] is None and record["seed"] == 0
    assert record["controller"] == "Refine" and record["settings"]["blend_words"] == ["dog", "<rare>"]
    assert Image.open(out / "side_by_side.png").width == 2 * 256  # a generated source: source | edit
    # The default folder: <run>/edits/<time>, next to the run's checkpoints.
    default = run_edit(compose("edit", [f"run_dir={demo_run}", *FAST, "attention_maps=false"]))
    assert default.parent == demo_run / "edits" and (default / "side_by_side.png").exists()
    assert not (default / "attention_source.png").exists()


@pytest.mark.parametrize("overrides,message", [
    (["step=5"], "no checkpoint at step 5: available steps are 4, 6"),
    (["edit=replace", 'target_prompt="a photo of {phrase} on the beach"'], "mode=replace"),
    (["image=data/samples/dog2/00.jpg.missing"], "does not exist"),
    (['target_prompt="a photo of {subject}"'], "{phrase}, {identifier}, {class_noun}"),
    (["edit=local_blend", "edit.blend_words=[cat]"], "none of the blend words"),
    (["edit=reweight", 'edit.reweight=[["cat", 2.0]]'], "'cat' is not in the prompt"),
])
def test_bad_input_is_a_one_line_error(demo_run, tmp_path, overrides, message):
    from personalize.edit.runner import run_edit

    with pytest.raises(PersonalizeError) as error:
        run_edit(_edit_cfg(demo_run, tmp_path / "bad", *overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "bad").exists()  # nothing written for bad input


def test_cli_missing_image_exits_2_with_one_line(demo_run, tmp_path):
    proc = _cli(f"run_dir={demo_run}", f"image={tmp_path / 'nope.jpg'}", "logger=none")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == f"error: image '{tmp_path / 'nope.jpg'}' does not exist: pass image=<path to a " \
                                  "photo>, or image=null to edit a generated image"
    assert "Traceback" not in proc.stdout + proc.stderr


# --- the notebook ----------------------------------------------------------------------------------


@pytest.mark.slow  # a kernel runs the whole walkthrough (~80 s on 2 cores); test_cli_edits_a_photo_end_to_end covers the CLI
def test_edit_walkthrough_notebook_executes(tmp_path, monkeypatch):
    """Top to bottom on the kernel 'python3', which jupyter_client starts with this interpreter (.venv)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PERSONALIZE_NOTEBOOK_DIR", str(tmp_path))  # the kernel inherits it: outputs land here
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 8  # photos, side-by-sides and attention maps, inline
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Reweight over Refine" in text and "side_by_side.png" in text
    assert (tmp_path / "cli" / "side_by_side.png").exists() and (tmp_path / "photo.png").exists()
