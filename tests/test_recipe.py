"""checkpoint.json's `overrides`: the method settings a run changed from its method file, and only those."""

from __future__ import annotations

from personalize.methods.recipe import method_defaults, overrides
from personalize.rundir import list_checkpoints, read_info
from personalize.train import fit, prepare_run


def test_a_run_names_exactly_what_it_changed_from_its_method_file(make_cfg):
    run = prepare_run(make_cfg("method=lora", "subject=sample_dog", "eval=none", "method.stages.lora.steps=2",
                               "method.stages.lora.checkpoint_every=null", "method.loss.snr_gamma=5",
                               "method.lora.rank=2", name="overrides"))
    fit(run, sample=False, evaluate=False)
    (ckpt,) = list_checkpoints(run.run_dir)
    info = read_info(ckpt)
    # debug=default shortens every method's stages: its own overrides show too, as what a user would see
    assert info.overrides["method.loss.snr_gamma"] == 5.0
    assert info.overrides["method.lora.rank"] == 2
    assert info.overrides["method.stages.lora.steps"] == 2
    assert "method.lora.alpha" not in info.overrides and "method.noise.offset" not in info.overrides


def test_the_method_file_itself_has_no_overrides_and_interpolated_values_are_not_recipe_settings():
    for name in ("textual_inversion", "two_stage", "dreambooth", "lora", "finetune", "custom_diffusion"):
        defaults = method_defaults(name)
        assert defaults is not None and overrides(defaults) == {}
    ti = method_defaults("textual_inversion")
    ti.new_token.initializer = "cat"  # the file says ${subject.init_word}: the subject's, not the recipe's
    assert overrides(ti) == {}
    assert method_defaults("_common") is None and method_defaults("nope") is None
