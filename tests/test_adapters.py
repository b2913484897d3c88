"""Adapters beyond plain UNet LoRA (issue 12): DoRA, targets beyond attention, rank/alpha per module, LoRA on
the text encoder, and the one LoRA file both LoRA trainables write.

Each variant trains the tiny model a few steps; then, on fixed inputs, four models must agree:
- the base model with the checkpoint file's tensors merged in by hand (the reference, computed here with plain
  tensor arithmetic from diffusers' keys, no PEFT: W + (alpha / rank) * up @ down, and for DoRA that weight
  rescaled to the trained magnitude per output channel, as the DoRA paper defines it);
- the trained module;
- the checkpoint loaded by stock diffusers only (tests/helpers.stock_pipeline);
- a pipeline that loaded an earlier checkpoint of the run first, then this one (evaluation's path).
The base weights stay bit-identical, and each adapted module has the rank the settings give it.

Pivotal tuning (method=pivotal): the token's lr is 0 after its fraction of the stage while the LoRA's
Adam state runs on in the same optimizer (checked on the optimizer's own state), and its checkpoint loads
the way diffusers' advanced script loads its own. Bad settings are one line, before anything is written.
"""

from __future__ import annotations

import json
import re

import lightning as L
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from personalize.artifacts import apply_checkpoint, load_checkpoint_pipeline
from personalize.errors import PersonalizeError
from personalize.methods.trainables import add_to_lora_file, read_lora_parts
from personalize.rundir import LORA_FILE, read_info
from personalize.train import fit, prepare_run
from tests.helpers import changed_fraction, snapshot, stock_pipeline, unet_output

# fp32 on CPU, the same shapes in every forward: the paths differ only in how the update is applied
# (merged into W by hand, or PEFT's separate branch), i.e. in rounding, orders of magnitude below this.
ATOL = 1e-5
MIN_EFFECT = 100 * ATOL  # what the adapters change must dwarf the tolerance
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
BEYOND_ATTENTION = [*ATTENTION, "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out",
                    "time_emb_proj"]
# one full module name and suffixes: PEFT matches a key against the end of a module's name
RANK_PATTERN = {"to_k": 8, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q": 2}
ALPHA_PATTERN = {"to_v": 1.0}

VARIANTS = {
    "dora": ["method.lora.use_dora=true"],
    "beyond_attention": [f"method.lora.target_modules=[{','.join(BEYOND_ATTENTION)}]"],
    "dora_beyond_attention": ["method.lora.use_dora=true", f"method.lora.target_modules=[{','.join(BEYOND_ATTENTION)}]"],
    "patterns": ["method.lora.rank_pattern={to_k: 8, down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q: 2}",
                 "method.lora.alpha_pattern={to_v: 1.0}"],
    "text_encoder": ["method.stages.lora.train=[lora,text_encoder_lora]",
                     "+method.stages.lora.trainable_lr={text_encoder_lora: 1.0e-2}"],
    "text_encoder_dora_patterns": ["method.stages.lora.train=[lora,text_encoder_lora]", "method.lora.use_dora=true",
                                   "method.lora.text_encoder_target_modules=[q_proj,k_proj,v_proj,out_proj,fc1]",
                                   "method.lora.rank_pattern={fc1: 2, to_k: 8}"],
}


def train(make_cfg, *overrides: str, steps: int = 2):
    """A short `method=lora` run at rank 4, alpha 8, with a checkpoint after every step."""
    run = prepare_run(make_cfg(
        "method=lora", "subject=sample_dog", "method.lora.rank=4", "method.lora.alpha=8",
        f"method.stages.lora.steps={steps}", "method.stages.lora.checkpoint_every=1", "method.stages.lora.lr=2e-2",
        "eval=none", *overrides))
    before = snapshot(run.module)
    fit(run, sample=False, evaluate=False)
    return run, before


@torch.no_grad()
def text_output(text_encoder, tokenizer):
    ids = tokenizer(["a photo of sks dog"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return text_encoder.eval()(ids)[0]


def pattern_value(patterns: dict, name: str, default):
    """The value a {key: value} pattern gives module `name`: a key is the whole name or its end after a dot."""
    return next((v for k, v in patterns.items() if name == k or name.endswith(f".{k}")), default)


@torch.no_grad()
def hand_merged(model, part: dict[str, torch.Tensor], alpha: float, alpha_pattern: dict):
    """`model` with each adapted weight replaced by its merged value from the file's part, in place.

    LoRA: W + (alpha / r) * up @ down (r from the tensors' shapes; a convolution's down is a k x k
    convolution to r channels, its up a 1 x 1 one back). DoRA: that weight times magnitude / its norm per
    output channel. Returns the adapted module names and their ranks."""
    ranks = {}
    # diffusers' converter names the attention projections' tensors lora.down/lora.up (UNet) or
    # lora_linear_layer.down/up (text encoder) and leaves PEFT's lora_A/lora_B on other modules
    downs = {k: re.sub(r"\.(lora\.down|lora_linear_layer\.down|lora_A)\.weight$", "", k) for k in part
             if re.search(r"\.(lora\.down|lora_linear_layer\.down|lora_A)\.weight$", k)}
    for key, path in downs.items():
        up = part[key.replace("down.weight", "up.weight").replace("lora_A.weight", "lora_B.weight")]
        down = part[key]
        layer = model.get_submodule(path)
        rank = down.shape[0]
        weight = layer.weight + pattern_value(alpha_pattern, path, alpha) / rank * (up.flatten(1) @ down.flatten(1)).view(layer.weight.shape)
        magnitude = part.get(f"{path}.lora_magnitude_vector", part.get(f"{path}.lora_magnitude_vector.weight"))
        if magnitude is not None:
            norm = weight.flatten(1).norm(dim=1)
            # a Linear's magnitude is [out], a convolution's [1, out, 1, 1] (PEFT's layouts)
            weight = (magnitude.reshape(-1) / norm).view(-1, *[1] * (weight.dim() - 1)) * weight
        layer.weight.copy_(weight)
        ranks[path] = rank
    return ranks


def lora_ranks(model) -> dict[str, int]:
    return {name: module.r[module.active_adapters[0]] for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def expected_ranks(module_names, targets, rank: int, rank_pattern: dict) -> dict[str, int]:
    """The modules the targets adapt (PEFT's rule: the name or its end after a dot) and their rank."""
    adapted = [n for n in module_names if any(n == t or n.endswith(f".{t}") for t in targets)]
    return {n: pattern_value(rank_pattern, n, rank) for n in adapted}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_variant_reloads_as_the_trained_model(variant, make_cfg, tiny_model_dir):
    run, before = train(make_cfg, *VARIANTS[variant])
    module, lora = run.module, run.cfg.method.lora
    first, last = run.checkpoints()
    trains_text_encoder = "text_encoder_lora" in module.trains
    parts = read_lora_parts(last / LORA_FILE)
    assert set(parts) == ({"unet", "text_encoder"} if trains_text_encoder else {"unet"})
    metadata = json.loads(safe_open(last / LORA_FILE, "pt").metadata()["lora_adapter_metadata"])
    assert metadata["unet.use_dora"] is bool(lora.use_dora) and metadata["unet.lora_alpha"] == 8
    rank_pattern, alpha_pattern = dict(lora.rank_pattern or {}), dict(lora.alpha_pattern or {})

    # every trained tensor moved, every base weight (vae, text encoder, UNet) is bit for bit the base model's
    after = snapshot(module)
    for name, part in before.items():
        fraction = changed_fraction(part, after[name])
        if name in module.trains:
            assert fraction > 0.9, f"{variant}: only {fraction:.0%} of the {name} tensors changed"
        else:
            assert fraction == 0.0, f"{variant}: {name} must stay bit-identical, {fraction:.0%} of its tensors changed"

    # UNet: reference (hand merge of the file) = trained = stock-loaded = loaded after an earlier checkpoint
    base_unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    base = unet_output(base_unet)
    names = [n for n, _ in base_unet.named_modules()]
    ranks = hand_merged(base_unet, parts["unet"][0], 8.0, alpha_pattern)
    assert ranks == expected_ranks(names, lora.target_modules, 4, rank_pattern), f"{variant}: the file's UNet ranks"
    reference, trained = unet_output(base_unet), unet_output(module.unet)
    effect = (reference - base).abs().max().item()
    assert effect > MIN_EFFECT, f"{variant}: the adapters change the UNet output by only {effect:.2e}"
    assert (trained - reference).abs().max().item() <= ATOL, f"{variant}: trained UNet vs hand-merged file"
    stock = stock_pipeline(tiny_model_dir, last)
    assert (unet_output(stock.unet) - trained).abs().max().item() <= ATOL, f"{variant}: stock-loaded UNet"
    assert lora_ranks(stock.unet) == ranks, f"{variant}: stock load_lora_weights gave other ranks"
    evaluation = load_checkpoint_pipeline(first)
    apply_checkpoint(evaluation, last)  # the earlier checkpoint's adapters, both parts, give way to this one's
    assert (unet_output(evaluation.unet) - trained).abs().max().item() <= ATOL, f"{variant}: UNet after an earlier checkpoint"

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    base_text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder")
    base_text = text_output(base_text_encoder, tokenizer)
    if not trains_text_encoder:
        assert torch.equal(text_output(stock.text_encoder, tokenizer), base_text)
        return
    # text encoder: the same four agree
    te_ranks = hand_merged(base_text_encoder, parts["text_encoder"][0], 8.0, alpha_pattern)
    te_names = [n for n, _ in CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").named_modules()]
    assert te_ranks == expected_ranks(te_names, lora.text_encoder_target_modules, 4, rank_pattern)
    reference, trained = text_output(base_text_encoder, tokenizer), text_output(module.text_encoder, tokenizer)
    effect = (reference - base_text).abs().max().item()
    assert effect > MIN_EFFECT, f"{variant}: the adapters change the text encoder output by only {effect:.2e}"
    assert (trained - reference).abs().max().item() <= ATOL, f"{variant}: trained text encoder vs hand-merged file"
    assert (text_output(stock.text_encoder, tokenizer) - trained).abs().max().item() <= ATOL, f"{variant}: stock-loaded text encoder"
    assert lora_ranks(stock.text_encoder) == te_ranks
    assert (text_output(evaluation.text_encoder, tokenizer) - trained).abs().max().item() <= ATOL


def test_the_lora_file_holds_both_parts_whichever_saves_first(make_cfg, tmp_path):
    run, _ = train(make_cfg, *VARIANTS["text_encoder_dora_patterns"], steps=1)
    unet_lora, text_lora = run.module.trainables["lora"], run.module.trainables["text_encoder_lora"]
    files = {}
    for order in ([unet_lora, text_lora], [text_lora, unet_lora]):
        folder = tmp_path / "-".join(t.name for t in order)
        folder.mkdir()
        for trainable in order:
            assert trainable.save(folder) == LORA_FILE
        with safe_open(folder / LORA_FILE, "pt") as f:
            files[folder.name] = ({k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lora_adapter_metadata"]))
    (a_tensors, a_meta), (b_tensors, b_meta) = files.values()
    assert a_meta == b_meta and a_tensors.keys() == b_tensors.keys()
    assert all(torch.equal(a_tensors[k], b_tensors[k]) for k in a_tensors)
    assert {k.split(".")[0] for k in a_tensors} == {"unet", "text_encoder"}
    # one rank_pattern for both: each part's config holds the keys that match its own modules
    assert a_meta["text_encoder.rank_pattern"] == {"fc1": 2} and a_meta["unet.rank_pattern"] == {"to_k": 8}
    assert a_meta["text_encoder.use_dora"] is True and a_meta["unet.use_dora"] is True
    # and the run's own checkpoint is that file, named once in checkpoint.json
    ckpt = run.checkpoints()[-1]
    assert load_file(ckpt / LORA_FILE).keys() == a_tensors.keys()
    assert read_info(ckpt).contents == [LORA_FILE]


def test_a_part_is_replaced_not_merged_when_its_trainable_saves_again(tmp_path):
    """A second save of one part (a later checkpoint written into the same folder) replaces that part only."""
    a = {"m.lora.down.weight": torch.ones(2, 3), "m.lora.up.weight": torch.ones(3, 2)}
    b = {"m.lora.down.weight": torch.zeros(2, 3), "m.lora.up.weight": torch.zeros(3, 2)}
    te = {"m.lora_linear_layer.down.weight": torch.full((2, 3), 5.0), "m.lora_linear_layer.up.weight": torch.ones(3, 2)}
    add_to_lora_file(tmp_path, "unet", a, {"r": 2, "lora_alpha": 2})
    add_to_lora_file(tmp_path, "text_encoder", te, {"r": 2, "lora_alpha": 4})
    add_to_lora_file(tmp_path, "unet", b, {"r": 2, "lora_alpha": 8})
    parts = read_lora_parts(tmp_path / LORA_FILE)
    assert torch.equal(parts["unet"][0]["m.lora.down.weight"], b["m.lora.down.weight"]) and parts["unet"][1]["lora_alpha"] == 8
    assert torch.equal(parts["text_encoder"][0]["m.lora_linear_layer.down.weight"], te["m.lora_linear_layer.down.weight"])
    assert parts["text_encoder"][1]["lora_alpha"] == 4


def test_text_encoder_lora_trains_with_gradient_checkpointing(make_cfg):
    """The frozen embeddings give the checkpointed layers no input that requires grad: the adapters must still learn."""
    run, before = train(make_cfg, *VARIANTS["text_encoder"], "hardware.gradient_checkpointing=true", steps=1)
    assert changed_fraction(before["text_encoder_lora"], snapshot(run.module)["text_encoder_lora"]) > 0.9


def test_checkpoint_json_names_the_adapter_settings(make_cfg):
    run, _ = train(make_cfg, *VARIANTS["text_encoder_dora_patterns"], steps=1)
    overrides = read_info(run.checkpoints()[-1]).overrides
    assert overrides["method.lora.use_dora"] is True
    assert overrides["method.lora.text_encoder_target_modules"] == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
    assert overrides["method.lora.rank_pattern.fc1"] == 2 and overrides["method.lora.rank_pattern.to_k"] == 8
    assert overrides["method.stages.lora.train"] == ["lora", "text_encoder_lora"]
    assert "method.lora.rank" not in overrides and "method.lora.alpha_pattern" not in overrides  # 4 and null: the file's


@pytest.mark.parametrize("override,says", [
    ("method.lora.target_modules=[to_q,no_such_layer]",
     "method.lora.target_modules has 'no_such_layer', which names no module of the unet"),
    ("method.lora.target_modules=[conv_norm_out]",
     "method.lora.target_modules=['conv_norm_out']: PEFT cannot adapt these on the unet (Target module GroupNorm"),
    ("method.lora.rank_pattern={to_kk: 8}",
     "method.lora.rank_pattern.to_kk=8 matches none of the modules LoRA adapts (method.lora.target_modules on the unet;"),
    # a text encoder's module name where only the UNet gets LoRA
    ("method.lora.rank_pattern={fc1: 2}",
     "method.lora.rank_pattern.fc1=2 matches none of the modules LoRA adapts (method.lora.target_modules on the unet;"),
    ("method.lora.alpha_pattern={attn3: 2}",
     "method.lora.alpha_pattern.attn3=2 matches none of the modules"),
    ("method.lora.rank_pattern=[8]", "method.lora.rank_pattern=[8] is not a mapping"),
    ("method.lora.rank_pattern={to_k: 0}", "method.lora.rank_pattern.to_k=0 is out of range: use a whole number >= 1"),
    ("method.lora.alpha_pattern={to_k: -1}", "method.lora.alpha_pattern.to_k=-1 is out of range: use a number > 0"),
    ("method.lora.use_dora=yes", "method.lora.use_dora=yes is not true or false"),
    ("method.lora.text_encoder_target_modules=[]", "method.lora.text_encoder_target_modules=[] is empty"),
    ("method.stages.lora.train=[text_encoder,text_encoder_lora]",
     "the stages train both 'text_encoder' and 'text_encoder_lora': train the whole text encoder or LoRA on it"),
])
def test_a_bad_adapter_setting_is_one_line_before_anything_is_written(override, says, make_cfg, tmp_path):
    overrides = [override]
    if override.startswith("method.lora.text_encoder_target"):  # only checked where a stage trains it
        overrides.append("method.stages.lora.train=[lora,text_encoder_lora]")
    with pytest.raises(PersonalizeError) as error:
        prepare_run(make_cfg("method=lora", "subject=sample_dog", *overrides, name="bad"))
    message = str(error.value)
    assert says in message and "\n" not in message, message
    assert not (tmp_path / "bad").exists(), "nothing may be written before the settings are checked"


def test_a_pattern_key_that_is_not_a_regex_is_one_line(make_cfg, tmp_path):
    cfg = make_cfg("method=lora", "subject=sample_dog", name="bad")
    cfg.method.lora.rank_pattern = {"to_k(": 8}  # Hydra's override grammar would not even pass this
    with pytest.raises(PersonalizeError, match=r"method.lora.rank_pattern has the key 'to_k\(', which is not a regex"):
        prepare_run(cfg)
    assert not (tmp_path / "bad").exists()



# ---------------------------------------------------------------- pivotal tuning
class OptimizerRecorder(L.Callback):
    """Per optimizer step: the groups' lrs, and one LoRA tensor's gradient and Adam first moment before and
    after the step (the run has one stage, so one optimizer)."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_start(self, trainer, module):
        optimizer = trainer.optimizers[0]
        lora = next(g for g in optimizer.param_groups if g["trainable"] == "lora")["params"][0]

        def before(opt, args, kwargs):
            state = opt.state.get(lora, {})
            self.steps.append({"lrs": {g["trainable"]: g["lr"] for g in opt.param_groups}, "grad": lora.grad.clone(),
                               "exp_avg_before": state["exp_avg"].clone() if "exp_avg" in state else None})

        def after(opt, args, kwargs):
            self.steps[-1].update(exp_avg=opt.state[lora]["exp_avg"].clone(), step=int(opt.state[lora]["step"]))

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)


PIVOTAL = ["method=pivotal", "subject=sample_dog", "method.batch_size=2", "method.stages.pivotal.steps=4",
           "method.stages.pivotal.checkpoint_every=1", "method.stages.pivotal.lr=2e-2",
           "method.stages.pivotal.trainable_lr.token=5e-2", "eval=none"]


def test_pivotal_freezes_the_token_after_its_fraction_and_the_lora_adam_runs_on(make_cfg):
    run = prepare_run(make_cfg(*PIVOTAL))  # trainable_frac {token: 0.5}: the token trains steps 0 and 1 of 4
    recorder = OptimizerRecorder()
    fit(run, callbacks_before=[recorder], sample=False, evaluate=False)

    # one optimizer for the whole stage: the token's group at its lr, then 0; the LoRA's at its lr throughout
    assert [s["lrs"] for s in recorder.steps] == [{"lora": 2e-2, "token": 5e-2}] * 2 + [{"lora": 2e-2, "token": 0.0}] * 2
    # the LoRA's Adam state is the same one across the freeze: at the first frozen step its first moment goes on
    # from where it was (beta1 m + (1 - beta1) g), its step count is the run's, not restarted
    beta1 = run.cfg.method.optimizer.betas[0]
    first_frozen = recorder.steps[2]
    assert first_frozen["exp_avg_before"] is not None and first_frozen["exp_avg_before"].abs().max() > 0
    continued = beta1 * first_frozen["exp_avg_before"] + (1 - beta1) * first_frozen["grad"]
    assert torch.allclose(first_frozen["exp_avg"], continued, rtol=1e-5, atol=1e-9)
    restarted = (1 - beta1) * first_frozen["grad"]
    assert not torch.allclose(first_frozen["exp_avg"], restarted, rtol=1e-2)
    assert [s["step"] for s in recorder.steps] == [1, 2, 3, 4]

    # the token moved in steps 0-1 and is bit for bit the same from then on; the LoRA moved in every step
    checkpoints = run.checkpoints()
    tokens = [load_file(c / "learned_embeds.safetensors")["<s0>"] for c in checkpoints]
    assert tokens[0].shape == (2, 32) and not torch.equal(tokens[0], tokens[1])
    assert torch.equal(tokens[1], tokens[2]) and torch.equal(tokens[2], tokens[3])
    loras = [load_file(c / LORA_FILE) for c in checkpoints]
    for earlier, later in zip(loras, loras[1:]):
        assert any(not torch.equal(earlier[k], later[k]) for k in earlier)


def test_pivotal_checkpoint_loads_as_the_advanced_script_loads_its_own(make_cfg, tiny_model_dir):
    """The script's way: load_lora_weights, then load_textual_inversion of the embedding tensor with the token
    names given; the prompt's encoding and the UNet then equal the trained module's."""
    from diffusers import StableDiffusionPipeline

    run = prepare_run(make_cfg(*PIVOTAL))
    fit(run, sample=False, evaluate=False)
    module, ckpt = run.module, run.checkpoints()[-1]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(ckpt)
    embedding = load_file(ckpt / "learned_embeds.safetensors")["<s0>"]
    pipe.load_textual_inversion(embedding, token=["<s0>", "<s0>_1"], text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)

    prompt = "a photo of <s0> dog"
    with torch.no_grad():
        stock, _ = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)
        ids = module.tokenizer([module.trainables["token"].prompt_for_encoder(prompt)], padding="max_length",
                               max_length=module.tokenizer.model_max_length, return_tensors="pt").input_ids
        ours = module.text_encoder(ids)[0]
    assert (stock - ours).abs().max().item() <= ATOL
    assert (unet_output(pipe.unet) - unet_output(module.unet)).abs().max().item() <= ATOL


@pytest.mark.parametrize("override,says", [
    ("method.stages.pivotal.trainable_frac=0.5", "method.stages.pivotal.trainable_frac=0.5 is not a mapping"),
    ("+method.stages.pivotal.trainable_frac.unet=0.5",
     "method.stages.pivotal.trainable_frac.unet=0.5: the stage trains lora, token, not unet"),
    ("method.stages.pivotal.trainable_frac={token: 0}", "method.stages.pivotal.trainable_frac.token=0 is not a fraction"),
    ("method.stages.pivotal.trainable_frac={token: 1.5}", "method.stages.pivotal.trainable_frac.token=1.5 is not a fraction"),
    ("method.stages.pivotal.trainable_frac={token: 0.0001}",
     "method.stages.pivotal.trainable_frac.token=0.0001 is not a fraction of the stage's 1000 steps that trains it "
     "at least one step: use a number in [0.001, 1]"),
])
def test_a_bad_trainable_frac_is_one_line_before_anything_is_written(override, says, make_cfg, tmp_path):
    with pytest.raises(PersonalizeError) as error:
        prepare_run(make_cfg("method=pivotal", "subject=sample_dog", override, name="bad"))
    assert says in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "bad").exists()


def test_two_stage_with_a_lora_second_stage_is_one_override(make_cfg, tiny_model_dir):
    run = prepare_run(make_cfg("method=two_stage", "subject=sample_dog", "method.stages.unet.train=[lora]",
                               "method.stages.token.steps=2", "method.stages.token.lr=5e-2", "method.stages.unet.steps=2",
                               "method.stages.unet.checkpoint_every=2", "method.stages.unet.lr=2e-2", "eval=none"))
    before = snapshot(run.module)
    fit(run, sample=False, evaluate=False)
    after = snapshot(run.module)
    for name in before:
        fraction = changed_fraction(before[name], after[name])
        assert fraction > 0.9 if name in ("token", "lora") else fraction == 0.0, f"{name}: {fraction:.0%} changed"
    (ckpt,) = run.checkpoints()
    assert {p.name for p in ckpt.iterdir()} == {"checkpoint.json", "learned_embeds.safetensors", LORA_FILE}
    stock = stock_pipeline(tiny_model_dir, ckpt)
    assert (unet_output(stock.unet) - unet_output(run.module.unet)).abs().max().item() <= ATOL
    token_id = stock.tokenizer.convert_tokens_to_ids("<rare>")
    assert torch.equal(stock.text_encoder.get_input_embeddings().weight[token_id], run.module.token_embedding.new_rows[0].detach())


def test_pivotal_with_text_encoder_lora_killed_before_the_freeze_resumes_bit_identical(tmp_path, make_cfg):
    """Killed while writing step 3's resume state, the run continues from step 2, the first frozen step of the
    token: the optimizer (the LoRA's Adam state, the token's group), both LoRA parts and the token come back."""
    from tests.test_resume import assert_same_outputs, personalize, run_dirs

    args = [*PIVOTAL, "method.stages.pivotal.train=[lora,token,text_encoder_lora]", "samples.num_images=1"]
    killed = personalize(*args, f"paths.log_dir={tmp_path / 'out'}", kill="resume-save:3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    [run_dir] = run_dirs(tmp_path / "out")
    resumed = personalize(*args, f"paths.log_dir={tmp_path / 'out'}", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} from step-000002" in resumed.stdout + resumed.stderr
    reference = fit(prepare_run(make_cfg(*args, name="uninterrupted")))
    assert_same_outputs(run_dir, reference.run_dir)
