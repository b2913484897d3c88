"""Bad input: a one-line PersonalizeError that names the problem and the fix, before anything is written.

Most cases call the functions directly; a few go through the real CLI to check what a user sees:
exactly one `error:` line on stderr and exit code 2.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.config import PROJECT_ROOT
from personalize.data import list_images, load_subject_images, open_rgb
from personalize.errors import PersonalizeError
from personalize.methods.stages import parse_stages
from personalize.schema import check_config, check_run_settings, preflight
from personalize.train import prepare_run

SAMPLE_DOG = PROJECT_ROOT / "data" / "samples" / "dog"


def photo(path, mode="RGB", size=(96, 64), color=(200, 30, 30), fmt=None, **save):
    img = Image.new("RGB", size, color)
    img = img.convert(mode) if mode != "RGB" else img
    img.save(path, format=fmt, **save)
    return path


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- subject folders and photos
def test_missing_and_empty_subject_folder(tmp_path):
    with pytest.raises(PersonalizeError, match="does not exist: set subject.data_dir") as error:
        list_images(tmp_path / "nope")
    one_line(error)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PersonalizeError, match="has no images: put 3-6 photos"):
        list_images(tmp_path / "empty")


def test_non_image_files_are_skipped_with_a_warning_and_fail_when_nothing_is_left(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(PersonalizeError, match=r"has no images \(1 other files skipped\)"):
        list_images(tmp_path)
    photo(tmp_path / "a.jpg")
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in list_images(tmp_path)] == ["a.jpg"]
    assert "skipping" in caplog.text and "notes.txt" in caplog.text and ".DS_Store" not in caplog.text


def test_corrupt_and_truncated_jpegs_name_the_file(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(2000))
    with pytest.raises(PersonalizeError, match="garbage.jpg.*corrupt or truncated; re-export it or remove it") as error:
        open_rgb(tmp_path / "garbage.jpg")
    one_line(error)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(PersonalizeError, match="cut.jpg.*truncated"):
        open_rgb(tmp_path / "cut.jpg")


@pytest.mark.parametrize("mode, fmt, expected", [
    ("L", "PNG", None),
    ("LA", "PNG", None),
    ("RGBA", "PNG", None),
    ("P", "PNG", None),
    ("CMYK", "JPEG", None),
    ("I;16", "PNG", None),
    ("RGBA-transparent", "PNG", (255, 255, 255)),   # transparency is flattened onto white
    ("P-transparent", "PNG", (255, 255, 255)),
    ("I;16-white", "PNG", (255, 255, 255)),        # 16-bit white stays white (scaled, not clipped)
])
def test_every_common_mode_becomes_8_bit_rgb(tmp_path, mode, fmt, expected):
    path = tmp_path / f"photo.{fmt.lower()}"
    if mode == "RGBA-transparent":
        Image.new("RGBA", (96, 64), (10, 20, 30, 0)).save(path)
    elif mode == "P-transparent":
        img = Image.new("P", (96, 64), 0)
        img.putpalette([10, 20, 30] * 256)
        img.save(path, transparency=0)
    elif mode.startswith("I;16"):
        value = 65535 if mode.endswith("white") else 30000
        Image.fromarray(np.full((64, 96), value, dtype=np.uint16)).save(path)
        assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    else:
        photo(path, mode=mode, fmt=fmt)
    img = open_rgb(path)
    assert img.mode == "RGB" and img.size == (96, 64)
    if expected is not None:
        assert img.getpixel((5, 5)) == expected
    if mode == "I;16":
        assert abs(img.getpixel((5, 5))[0] - round(30000 / 65535 * 255)) <= 1


def test_exif_rotated_photos_are_turned_upright(tmp_path):
    img = Image.new("RGB", (80, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 40, 40))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = open_rgb(tmp_path / "rotated.jpg")
    assert upright.size == (40, 80)
    red_top = upright.getpixel((20, 10))
    assert red_top[0] > 200 and red_top[2] < 60  # the stored left half is on top once displayed


def test_small_photos_are_warned_about(tmp_path, caplog):
    photo(tmp_path / "tiny.png", size=(32, 40))
    with caplog.at_level(logging.WARNING):
        images = load_subject_images(tmp_path, 64)
    assert images.shape == (1, 3, 64, 64)
    assert "smaller than the training resolution 64" in caplog.text


def test_huge_jpegs_are_decoded_at_reduced_scale_and_bombs_refused(tmp_path, monkeypatch):
    photo(tmp_path / "huge.jpg", size=(4000, 3000))
    img = open_rgb(tmp_path / "huge.jpg", min_side=64)
    assert 128 <= min(img.size) < 3000 // 2  # DCT-scaled decode, still 2x the training size
    assert load_subject_images(tmp_path, 64).shape == (1, 3, 64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    photo(tmp_path / "bomb.png", size=(100, 100))  # 10000 px > 2 x the (lowered) limit
    with pytest.raises(PersonalizeError, match="bomb.png.*too large to open safely.*downscale it") as error:
        open_rgb(tmp_path / "bomb.png")
    one_line(error)


# ---------------------------------------------------------------- tokens and prompts
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")


def test_placeholder_already_in_the_vocabulary(tokenizer):
    from personalize.methods.token import check_new_token

    with pytest.raises(PersonalizeError, match=r"placeholder 'dog' is already in the tokenizer's vocabulary \(as 'dog</w>'\)"):
        check_new_token(tokenizer, "dog", "dog")
    with pytest.raises(PersonalizeError, match="has spaces"):
        check_new_token(tokenizer, "<my dog>", "dog")
    assert check_new_token(tokenizer, "<my-dog>", "dog") == tokenizer.encode("dog", add_special_tokens=False)


def test_initializer_of_several_tokens(tokenizer):
    from personalize.methods.token import check_new_token

    with pytest.raises(PersonalizeError, match=r"initializer word 'stuffed animal' is 2 tokens \(stuffed</w> animal</w>\)"):
        check_new_token(tokenizer, "<sks>", "stuffed animal")


def test_token_errors_come_before_anything_is_written(make_cfg, tmp_path):
    cfg = make_cfg("method=textual_inversion", "subject=sample_dog", "method.new_token.initializer=qzx", name="ti")
    with pytest.raises(PersonalizeError, match="initializer word 'qzx' is 3 tokens"):
        prepare_run(cfg)
    assert not (tmp_path / "ti").exists()


def test_identifier_missing_from_the_prompt(make_cfg):
    with pytest.raises(PersonalizeError, match="does not contain the identifier 'sks'"):
        prepare_run(make_cfg("method=finetune", "subject=sample_dog", "method.phrase='a {class_noun}'"))


# ---------------------------------------------------------------- names and keys
@pytest.mark.parametrize("override, message", [
    ("method=nope", "unknown method 'nope': the methods are: custom_diffusion, dreambooth, finetune, lora, pivotal, textual_inversion, two_stage"),
    ("subject=dgo", "unknown subject 'dgo' (did you mean 'dog'?): the subjects are: backpack,"),
    ("model=sd3", "unknown model 'sd3'"),
    ("method=lora,nope", "unknown method 'nope'"),
    ("subject=glob(zzz*)", "matches no subject"),
    ("metod=lora", "unknown config key 'metod': did you mean 'method'?"),
    ("method.stages.unet.chekpoint_every=5", "did you mean 'checkpoint_every'?"),
    ("+trainer.max_epochs=3", "unknown config key 'trainer.max_epochs'"),
])
def test_preflight_names_the_valid_choices(override, message):
    with pytest.raises(PersonalizeError) as error:
        preflight("train", [override])
    assert message in one_line(error)


@pytest.mark.parametrize("args", [["method=lora,dreambooth", "subject=glob(dog*)", "-m"], ["seed=1", "+tags=[a]"],
                                  ["hydra.verbose=true", "experiment=demo", "method.stages.token.steps=3"]])
def test_preflight_lets_valid_command_lines_through(args):
    preflight("train", args)


def test_typo_in_a_config_file_is_caught(make_cfg):
    from omegaconf import OmegaConf, open_dict

    cfg = make_cfg("method=two_stage")
    with open_dict(cfg):  # what a misspelt key in an experiment or local YAML file composes to
        cfg.method.optimizer.weight_decy = 0.0
    with pytest.raises(PersonalizeError, match="'method.optimizer.weight_decy': did you mean 'weight_decay'"):
        check_config(cfg)
    check_config(make_cfg("method=two_stage", "experiment=demo"))
    OmegaConf.resolve(cfg)  # unrelated: the config itself is fine to resolve


@pytest.mark.parametrize("override, message", [
    ("method.stages.unet.steps=0", "method.stages.unet.steps=0 is out of range: use a whole number >= 1"),
    ("method.stages.unet.steps=-5", "method.stages.unet.steps=-5 is out of range"),
    ("method.stages.unet.steps=2.5", "method.stages.unet.steps=2.5 is not a whole number"),
    ("method.stages.unet.lr=-1e-4", "method.stages.unet.lr=-0.0001 is out of range: use a number > 0"),
    ("method.stages.unet.lr=nan", "method.stages.unet.lr=nan is not a finite number"),
    ("+method.stages.unet.prior_loss_weight=-1", "method.stages.unet.prior_loss_weight=-1 is out of range"),
    ("method.stages.unet.checkpoint_every=-1", "method.stages.unet.checkpoint_every=-1 is out of range"),
    ("method.stages.unet.checkpoint_every=1000", "checkpoint_every=1000 but the stage has 800 steps"),
    ("+method.stages.unet.lr_warmup_steps=-2", "method.stages.unet.lr_warmup_steps=-2 is out of range"),
    ("method.stages.unet.train=[vae]", "method.stages.unet.train=['vae']: each stage trains one or more of"),
    ("method.stages.unet.train=[]", "method.stages.unet.train=[]: each stage trains one or more of"),
])
def test_bad_stage_settings(make_cfg, override, message):
    """parse_stages (which every caller of the stages goes through) checks them with the schema's rules."""
    with pytest.raises(PersonalizeError) as error:
        parse_stages(make_cfg("method=finetune", override).method.stages)
    assert message in one_line(error)


@pytest.mark.parametrize("override, message", [
    # the dozen, and their kin: each was a traceback, or accepted and silently wrong
    ("model.resolution=0", "model.resolution=0 is out of range: use a whole number >= 1"),
    ("model.resolution=100", "model.resolution=100 does not suit model"),
    ("method.instance_prompt='a photo of {phrase} {oops}'",
     "method.instance_prompt='a photo of {phrase} {oops}' has the placeholder {oops}, which is never filled: "
     "use only the placeholders {identifier}, {class_noun}, {phrase}"),
    ("method.phrase='{identifier} {class}'", "method.phrase='{identifier} {class}' has the placeholder {class}"),
    ("samples.prompts=['a {phrase}','a {subject}']", "samples.prompts[1]='a {subject}' has the placeholder {subject}"),
    ("method.identifier=''", "method.identifier='' is empty: use a non-empty string"),
    ("subject.class_noun=' '", "subject.class_noun=' ' is empty"),
    ("method.lora.dropout=1", "method.lora.dropout=1 is out of range: use a number in [0, 1)"),
    ("method.lora.rank=0", "method.lora.rank=0 is out of range: use a whole number >= 1"),
    ("method.lora.alpha=0", "method.lora.alpha=0 is out of range: use a number > 0"),
    ("method.optimizer.betas=[0.9,1.0]", "method.optimizer.betas[1]=1.0 is out of range: use a number in [0, 1)"),
    ("method.optimizer.eps=0", "method.optimizer.eps=0 is out of range: use a number > 0"),
    ("method.optimizer.weight_decay=-0.01", "method.optimizer.weight_decay=-0.01 is out of range"),
    ("method.optimizer.max_grad_norm=inf", "method.optimizer.max_grad_norm=inf is not a finite number"),
    ("class_images.count=0", "class_images.count=0 is out of range: use a whole number >= 1"),
    ("class_images.guidance_scale=-1", "class_images.guidance_scale=-1 is out of range: use a number >= 0"),
    ("class_images.sampler=dpm", "class_images.sampler=dpm is not a valid choice"),
    ("samples.num_images=0", "samples.num_images=0 is out of range"),
    ("eval.steps=0", "eval.steps=0 is out of range"),
    ("eval.images_per_prompt.simple=0", "eval.images_per_prompt.simple=0 is out of range"),
    ("seed=-1", "seed=-1 is out of range: use a whole number in [0, 4294967295]"),
    ("hardware.frozen_dtype=float64", "hardware.frozen_dtype=float64 is not a valid choice"),
    ("hardware.compile_unet=yes", "hardware.compile_unet=yes is not true or false"),
    ("hardware.num_nodes=0", "hardware.num_nodes=0 is out of range"),
    ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps=-1 is out of range"),
])
def test_a_setting_that_cannot_work_fails_before_anything_is_written(make_cfg, tmp_path, override, message):
    cfg = make_cfg("method=dreambooth", "subject=sample_dog", override, name="bad")
    with pytest.raises(PersonalizeError) as error:
        prepare_run(cfg)
    assert message in one_line(error)
    assert not (tmp_path / "bad").exists()


def test_batch_size_and_plain_ddp_with_stages(make_cfg):
    cfg = make_cfg("method=finetune", "method.batch_size=0")
    with pytest.raises(PersonalizeError, match="method.batch_size=0 is out of range: use a whole number >= 1"):
        check_run_settings(cfg, parse_stages(cfg.method.stages))
    cfg = make_cfg("method=two_stage", "hardware=ddp_cpu", "hardware.strategy=ddp")
    with pytest.raises(PersonalizeError, match="use hardware.strategy=ddp_find_unused_parameters_true"):
        check_run_settings(cfg, parse_stages(cfg.method.stages))
    cfg = make_cfg("method=finetune", "hardware=ddp_cpu", "hardware.strategy=ddp")  # one stage: plain DDP is fine
    check_run_settings(cfg, parse_stages(cfg.method.stages))


# ---------------------------------------------------------------- a diverging run
def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    from personalize.methods.module import Personalizer
    from personalize.resume import list_resume_states
    from personalize.train import fit

    run = prepare_run(make_cfg("method=finetune", "subject=sample_dog", "eval=none", "method.stages.unet.steps=6",
                               "method.stages.unet.checkpoint_every=1", name="nan"))
    predict = Personalizer._predict

    def poisoned(self, *args):  # the 3rd step's forward overflows
        pred, target = predict(self, *args)
        return (pred * float("nan"), target) if torch.is_grad_enabled() and self.global_step == 2 else (pred, target)

    monkeypatch.setattr(Personalizer, "_predict", poisoned)
    with pytest.raises(PersonalizeError) as error:
        fit(run)
    message = one_line(error)
    assert "the loss became nan at step 3 (stage 'unet')" in message
    assert f"last good checkpoint: {run.run_dir / 'checkpoints' / 'step-000002'}" in message
    assert "Lower method.stages.unet.lr" in message
    assert [c.name for c in run.checkpoints()] == ["step-000001", "step-000002"]  # nothing saved from NaN weights
    assert [s.name for s in list_resume_states(run.run_dir)] == ["step-000002"]


def test_diverged_weights_are_not_saved(make_cfg):
    from personalize.train import fit

    run = prepare_run(make_cfg("method=finetune", "subject=sample_dog", "eval=none", "method.stages.unet.steps=3",
                               "method.stages.unet.checkpoint_every=1", "method.stages.unet.lr=1e30",
                               "method.optimizer.max_grad_norm=0", name="huge-lr"))
    with pytest.raises(PersonalizeError, match="prediction became non-finite at step 1 .*last good checkpoint: none yet"):
        fit(run)
    assert run.checkpoints() == []


# ---------------------------------------------------------------- what the user sees
def personalize(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personalize.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["method=nope"], "error: unknown method 'nope': the methods are: custom_diffusion, dreambooth, finetune, lora, pivotal, textual_inversion, two_stage"),
    (["metod=lora"], "error: unknown config key 'metod': did you mean 'method'?"),
    (["subject=sample_dog", "subject.data_dir=/nonexistent"], "error: subject folder '/nonexistent' does not exist"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, args, message):
    result = personalize("debug=default", f"paths.log_dir={tmp_path}", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith(message)
    assert not list(tmp_path.glob("train/runs/*"))  # nothing half-made, not even Hydra's folder


def personalize_bin(*args: str, outputs, cwd) -> subprocess.CompletedProcess:
    """The installed `personalize` command, outputs under PERSONALIZE_OUTPUTS, as a user runs it."""
    return subprocess.run([str(Path(sys.executable).parent / "personalize"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PERSONALIZE_OUTPUTS=str(outputs)))


@pytest.mark.parametrize("args, message", [
    # caught on the command line, before Hydra makes a folder
    (["model.resolution=0"], "error: model.resolution=0 is out of range: use a whole number >= 1"),
    (["method.instance_prompt='a photo of {phrase} {oops}'"],
     "error: method.instance_prompt='a photo of {phrase} {oops}' has the placeholder {oops}"),
    # caught once the model's config is read: Hydra's folder exists by then and must go again
    (["model.resolution=100"], "error: model.resolution=100 does not suit model"),
])
def test_a_bad_setting_leaves_no_run_folder(tmp_path, args, message):
    outputs = tmp_path / "outputs"
    result = personalize_bin("debug=default", "subject=sample_dog", *args, outputs=outputs, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [result.stderr.rstrip("\n")] and result.stderr.startswith(message)
    assert not list(outputs.glob("train/runs/*")), list(outputs.rglob("*"))


def test_a_failed_resume_keeps_the_resumed_run_and_removes_only_its_own_folder(tmp_path):
    outputs = tmp_path / "outputs"
    earlier = outputs / "train" / "runs" / "earlier-run"
    (earlier / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "train.log", ".hydra/config.yaml"):
        (earlier / name).write_text("x\n")
    result = personalize_bin("debug=default", "subject=sample_dog", f"resume={earlier}", "model.resolution=100",
                             outputs=outputs, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: model.resolution=100"), result.stderr[-3000:]
    assert [p.name for p in (outputs / "train" / "runs").iterdir()] == ["earlier-run"]
    assert sorted(str(p.relative_to(earlier)) for p in earlier.rglob("*")) == [".hydra", ".hydra/config.yaml",
                                                                              "config.yaml", "train.log"]


def test_only_a_folder_of_hydras_own_files_counts_as_unused(tmp_path, monkeypatch):
    from personalize.cli import unused_run_dir_files

    def run_dir(name, *files):
        folder = tmp_path / name
        for file in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log", *files):
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / file).write_text("")
        return folder

    fresh = run_dir("fresh")
    assert sorted(p.name for p in unused_run_dir_files(fresh, ".hydra", [fresh / "train.log"])) == [
        "config.yaml", "hydra.yaml", "overrides.yaml", "train.log"]
    for extra in ("config.yaml", "checkpoints/step-000001/checkpoint.json", "resume/step-000002/state.json",
                  "FAILED", ".hydra/notes.txt", "other.log"):
        folder = run_dir(extra.replace("/", "_"), extra)
        assert unused_run_dir_files(folder, ".hydra", [folder / "train.log"]) is None, extra
    monkeypatch.chdir(fresh)  # hydra.run.dir=. : the user's folder, whatever it holds
    assert unused_run_dir_files(fresh, ".hydra", [fresh / "train.log"]) is None
    assert unused_run_dir_files(tmp_path / "missing", ".hydra", []) is None


def test_sample_prompts_are_checked_before_any_checkpoint_is_loaded(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    result = subprocess.run([str(Path(sys.executable).parent / "personalize-sample"), f"run_dir={run}",
                             "prompts=[\"a {phrase} {oops}\"]"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        "error: prompts[0]='a {phrase} {oops}' has the placeholder {oops}, which is never filled: "
        "use only the placeholders {identifier}, {class_noun}, {phrase}"]
    assert not list(run.glob(".sample-logs/*"))  # its log folder went with the error
