"""Everything around training on SDXL and FLUX.1 (issue 13), on the tiny random-weight models:

- DreamBooth's class images are the backbone's own stock pipeline's samples (StableDiffusionXLPipeline with the
  configured sampler, FluxPipeline with its flow-match scheduler) for the same prompt and seeds, computed here
  by calling that pipeline directly; their cache key (and the prior protocol's base images') changes with the
  model and with model.vae, and is unchanged where neither applies;
- every evaluation protocol on a tiny-FLUX LoRA run: its records equal an independent recomputation of one
  checkpoint (the LoRA loaded into a stock FluxPipeline by diffusers' own loader, the same prompts and seeds,
  CLIP-I / CLIP-T / CLIP score / DINO / FID / IS from the same tiny CLIP and DINO with our own preprocessing
  and formulas);
- a photo smaller than the model's resolution is warned about once per run, naming it, its size and the
  resolution;
- experiment=dreambench_sdxl / dreambench_flux: the recipes of the references they cite, their smoke twins
  differ only in sizes, and the smoke twins run through a sweep and `personalize-report`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from personalize.config import PROJECT_ROOT, compose
from personalize.data import Subject
from personalize.methods.optim import scaled_lr
from personalize.methods.stages import parse_stages
from personalize.models import resolve_pretrained
from personalize.prompts import CLASS_NOUNS, DREAMBOOTH_LIVE_PROMPTS, JINDAL_PROMPTS
from personalize.rundir import read_records
from tests import sweeps

SAMPLE_DOG = PROJECT_ROOT / "data" / "samples" / "dog"


def model_dir(name: str) -> Path:
    return Path(resolve_pretrained(compose("train", [f"model={name}"], output_dir="/unused").model))


def stock_pipeline(name: str):
    """The stock diffusers pipeline of a tiny model, loaded here without the project's loaders."""
    from diffusers import DPMSolverMultistepScheduler, FluxPipeline, StableDiffusionXLPipeline

    if name == "tiny_flux":
        pipe = FluxPipeline.from_pretrained(model_dir(name))  # keeps its FlowMatchEulerDiscreteScheduler
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir(name), add_watermarker=False)
        # class_images.sampler / eval.sampler dpm_multistep: diffusers' DPM-Solver++ on the model's schedule
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_uint8(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, size: int) -> np.ndarray:
    """[n, H, W, 3] uint8 as diffusers' numpy_to_pil rounds its float output; one CPU generator per image."""
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                  generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
    return (np.asarray(images) * 255).round().astype(np.uint8)


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def assert_same_pixels(ours: np.ndarray, reference: np.ndarray):
    """The same images: at most 1 of 255 levels apart (the low bits kernels may change, shared/DESIGN.md)."""
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------ class images


@pytest.mark.parametrize("model,pipeline", [("tiny_sdxl", "StableDiffusionXLPipeline"), ("tiny_flux", "FluxPipeline")])
def test_class_images_are_the_backbones_own_pipeline_samples(model, pipeline, make_cfg, tmp_path, monkeypatch):
    from personalize import train
    from personalize.data import to_tensor

    cfg = make_cfg(f"model={model}", "method=dreambooth", "subject=sample_dog", "class_images.count=3",
                   "class_images.batch_size=2", "class_images.steps=2", f"paths.class_image_dir={tmp_path / 'ci'}")
    loaded = []
    real_load = train.load_pipeline
    monkeypatch.setattr(train, "load_pipeline", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    stages = parse_stages(cfg.method.stages)
    subject = Subject.from_cfg(cfg.subject)
    tensors = train.prepare_class_images(cfg, subject, stages, "cpu", torch.float32)
    assert [type(p).__name__ for p in loaded] == [pipeline]

    folder = train.class_image_spec(cfg, subject).folder(tmp_path / "ci")
    ours = np.stack([png(folder / f"{i:05d}.png") for i in range(3)])
    ci = cfg.class_images
    assert str(ci.prompt).format(class_noun="dog") == "a photo of dog"
    # the same batches as the cache makes them (index-aligned, batch 2: [0, 1], then [2, 3] of which 3 is dropped)
    pipe = stock_pipeline(model)
    reference = np.concatenate([
        sample_uint8(pipe, ["a photo of dog"] * 2, [0, 1], 2, float(ci.guidance_scale), 64),
        sample_uint8(pipe, ["a photo of dog"] * 2, [2, 3], 2, float(ci.guidance_scale), 64)[:1]])
    assert_same_pixels(ours, reference)
    assert ours.std() > 0 and not np.array_equal(ours[0], ours[1])  # images, not a blank or one noise
    torch.testing.assert_close(tensors, torch.stack([to_tensor(Image.fromarray(a)) for a in ours]))


def test_the_cache_key_changes_with_the_model_and_its_vae(tmp_path):
    """Training class images (train.class_image_spec) and the prior protocol's base images
    (evaluator.base_image_spec) are keyed by the model and model.vae; a spec without model.vae keeps the key
    its fields gave before model.vae existed, so no cache made earlier is generated again."""
    import hashlib

    from personalize.eval.evaluator import base_image_spec
    from personalize.eval.settings import EvalSettings
    from personalize.train import class_image_spec

    vae = tmp_path / "other-vae"
    setups = {"tiny": ["model=tiny"], "tiny_sdxl": ["model=tiny_sdxl"], "tiny_flux": ["model=tiny_flux"],
              "tiny_sdxl+vae": ["model=tiny_sdxl", f"model.vae={vae}"]}
    train_keys, base_keys = {}, {}
    for name, overrides in setups.items():
        cfg = compose("train", ["debug=default", *overrides, "method=dreambooth"], output_dir="/unused")
        spec = class_image_spec(cfg, Subject.from_cfg(cfg.subject))
        base = base_image_spec(cfg.model, EvalSettings.from_cfg(cfg.eval), "a photo of a dog")
        assert (spec.vae, base.vae) == ((str(vae),) * 2 if "vae" in name else (None, None))
        assert spec.model == base.model == resolve_pretrained(cfg.model)
        train_keys[name], base_keys[name] = spec.key(), base.key()
        if "vae" not in name:  # the key of the fields alone, as before model.vae was a field
            fields = {k: v for k, v in vars(spec).items() if k != "vae"}
            assert spec.key() == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    assert len(set(train_keys.values())) == 4 and len(set(base_keys.values())) == 4


# ------------------------------------------------------------------------- evaluation on a tiny-FLUX LoRA run


class Scorer:
    """CLIP and DINO features of the tiny stand-ins, with our own preprocessing: PIL's bicubic resize of the
    shorter side, the centre crop, mean/std (CLIP: its preprocessor_config.json; DINO: 256/224 of the crop,
    ImageNet statistics, as the DreamBooth protocol's DINO)."""

    def __init__(self, cfg):
        from transformers import AutoTokenizer, CLIPModel, ViTModel

        from personalize.eval.standins import ensure_tiny_clip, ensure_tiny_dino

        clip_dir, dino_dir = ensure_tiny_clip(cfg.eval.clip_model), ensure_tiny_dino(cfg.eval.dino_model)
        self.clip = CLIPModel.from_pretrained(clip_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(clip_dir)
        self.dino = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
        pre = json.loads((Path(clip_dir) / "preprocessor_config.json").read_text())
        self.clip_prep = (int(pre["size"]), int(pre["crop_size"]), pre["image_mean"], pre["image_std"])
        crop = self.dino.config.image_size
        self.dino_prep = (round(crop * 256 / 224), crop, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

    @staticmethod
    def _pixels(images, prep) -> torch.Tensor:
        size, crop, mean, std = prep
        rows = []
        for image in images:
            w, h = image.size
            scale = size / min(w, h)
            image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
            left, top = (image.width - crop) // 2, (image.height - crop) // 2
            array = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float64) / 255
            rows.append(torch.from_numpy((array - mean) / std).permute(2, 0, 1).float())
        return torch.stack(rows)

    @torch.no_grad()
    def clip_images(self, images) -> torch.Tensor:
        out = self.clip.vision_model(pixel_values=self._pixels(images, self.clip_prep)).pooler_output
        return F.normalize(self.clip.visual_projection(out).double(), dim=-1)

    @torch.no_grad()
    def clip_texts(self, texts) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        out = self.clip.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return F.normalize(self.clip.text_projection(out).double(), dim=-1)

    @torch.no_grad()
    def dino_images(self, images) -> torch.Tensor:
        out = self.dino(pixel_values=self._pixels(images, self.dino_prep)).last_hidden_state[:, 0]
        return F.normalize(out.double(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over every (generated, reference) pair, one pair at a time."""
    return sum(float(a[i] @ b[j]) for i, j in itertools.product(range(len(a)), range(len(b)))) / (len(a) * len(b))


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), unbiased covariances (Heusel et al.); the trace of
    the root as Tr((S_a^1/2 S_b S_a^1/2)^1/2), from symmetric eigendecompositions."""
    a, b = a.numpy(), b.numpy()
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(sa)
    half = vectors @ np.diag(np.sqrt(values.clip(min=0))) @ vectors.T
    root_trace = np.sqrt(np.linalg.eigvalsh(half @ sb @ half).clip(min=0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * root_trace)


def inception_score(logits: torch.Tensor, splits: int, seed: int) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per split, averaged; the images shuffled into splits as the record says
    (metric_settings: split_seed)."""
    with torch.random.fork_rng(devices=[]):  # the permutation torchmetrics draws after seeding with split_seed
        torch.manual_seed(seed)
        order = torch.randperm(len(logits))
    probs = logits.double()[order].softmax(dim=1)
    scores = []
    for part in probs.chunk(splits):
        marginal = part.mean(0, keepdim=True)
        scores.append(float((part * (part.log() - marginal.log())).sum(1).mean().exp()))
    return sum(scores) / len(scores)


def reference_photos(size: int) -> list[Image.Image]:
    """The subject's photos as the references: upright, the centre square, bicubic to the resolution."""
    photos = []
    for path in sorted(SAMPLE_DOG.glob("*.jpg")):
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        photos.append(image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC))
    return photos


def protocol_prompts(name: str) -> tuple[list[str], list[str]]:
    """(prompts, clean prompts) of a protocol for the LoRA run's "sks dog" (a live subject)."""
    templates = {"dreambooth": DREAMBOOTH_LIVE_PROMPTS, "simple": ["a photo of {}"], "jindal": JINDAL_PROMPTS,
                 "prior": ["a photo of a {}"]}[name]
    if name == "prior":
        return [t.format("dog") for t in templates], [t.format("dog") for t in templates]
    return [t.format("sks dog") for t in templates], [t.format("dog") for t in templates]


def trained_flux_lora(tmp_path_factory, protocols: list[str], checkpoint_every: int):
    """A two-step LoRA run on tiny FLUX, evaluated on `protocols` with every metric."""
    from personalize.train import fit, prepare_run

    run_root = tmp_path_factory.mktemp("flux-lora")
    cfg = compose("train", ["debug=default", "model=tiny_flux", "method=lora", "subject=sample_dog",
                            "method.stages.lora.steps=2", f"method.stages.lora.checkpoint_every={checkpoint_every}",
                            "method.stages.lora.lr=1e-2", f"eval.protocols=[{','.join(protocols)}]",
                            f"paths.class_image_dir={run_root / 'class_images'}", "eval.batch_size=16"],
                  output_dir=run_root / "run")
    run = fit(prepare_run(cfg), sample=False)  # evaluates every checkpoint x protocol after training
    return cfg, run.run_dir


def check_records_against_a_recomputation(cfg, run_dir: Path, protocols: list[str], steps_evaluated: list[int]):
    """Step 2's records against images made here by the stock FluxPipeline with the LoRA file loaded, scored here."""
    from diffusers import FluxPipeline

    records = read_records(run_dir)
    assert sorted((r["step"], r["protocol"]) for r in records) == sorted(
        (s, p) for s in steps_evaluated for p in protocols)
    ckpt = run_dir / "checkpoints" / "step-000002"
    e = cfg.eval
    steps, guidance, seed, batch = int(e.steps), float(e.guidance_scale), int(e.seed), int(e.batch_size)
    base = stock_pipeline("tiny_flux")
    pipe = FluxPipeline.from_pretrained(model_dir("tiny_flux"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(ckpt)  # diffusers' own FLUX LoRA loader, with the alpha in the file's metadata
    scorer = Scorer(cfg)
    photos = reference_photos(64)
    by_protocol = {r["protocol"]: r for r in records if r["step"] == 2}
    for name in protocols:
        prompts, clean = protocol_prompts(name)
        per_prompt = int(e.images_per_prompt[name])
        jobs = [(p, j) for p in range(len(prompts)) for j in range(per_prompt)]
        images = []
        for start in range(0, len(jobs), batch):  # the evaluation's batches: prompt-major, batch_size at a time
            chunk = jobs[start:start + batch]
            images.extend(sample_uint8(pipe, [prompts[p] for p, _ in chunk], [seed + j for _, j in chunk],
                                       steps, guidance, 64))
        stored = [png(run_dir / "eval" / "step-000002" / name / f"p{p:02d}_i{j:02d}.png") for p, j in jobs]
        assert_same_pixels(np.stack(stored), np.stack(images))
        generated = [Image.fromarray(a) for a in stored]
        if name == "prior":  # against the base model's images of the same prompt and seeds
            references = [Image.fromarray(a) for a in sample_uint8(base, prompts * per_prompt,
                                                                   [seed + j for j in range(per_prompt)],
                                                                   steps, guidance, 64)]
            stored_base = sorted(Path(by_protocol[name]["base_images"]).glob("*.png"))
            assert_same_pixels(np.stack([png(p) for p in stored_base]), np.stack([np.asarray(r) for r in references]))
        else:
            references = photos
        gen_clip, ref_clip = scorer.clip_images(generated), scorer.clip_images(references)
        texts = scorer.clip_texts([clean[p] for p, _ in jobs])
        clip_t = float((gen_clip * texts).sum(1).mean())
        logits = scorer.clip.logit_scale.exp().item() * gen_clip @ scorer.clip_texts(
            [f"a photo of a {noun}" for noun in CLASS_NOUNS]).T
        record = by_protocol[name]
        expected = {"clip_i": mean_cosine(gen_clip, ref_clip), "clip_t": clip_t, "clip_score": 100 * max(clip_t, 0.0),
                    "dino": mean_cosine(scorer.dino_images(generated), scorer.dino_images(references)),
                    "fid": frechet(gen_clip, ref_clip),
                    "is": inception_score(logits, record["metric_settings"]["is"]["splits"],
                                          record["metric_settings"]["is"]["split_seed"])}
        assert record["num_images"] == len(jobs) and record["references"] == ("base" if name == "prior" else "subject")
        # tolerances: PIL's bicubic resize here against torch's antialiased bicubic in the evaluation (64 -> 32 px),
        # measured at up to 5e-4 in a cosine mean and 0.2 % in FID
        for metric in ("clip_i", "clip_t", "dino"):
            assert record[metric] == pytest.approx(expected[metric], abs=2e-3), (name, metric)
        assert record["clip_score"] == pytest.approx(expected["clip_score"], abs=0.2), name
        assert record["fid"] == pytest.approx(expected["fid"], rel=0.02, abs=1e-3), name
        assert record["is"] == pytest.approx(expected["is"], rel=1e-2), name
    # the LoRA changed the samples: the prior protocol's images are not the base model's
    if "prior" in protocols:
        assert not np.array_equal(png(run_dir / "eval" / "step-000002" / "prior" / "p00_i00.png"),
                                  png(sorted(Path(by_protocol["prior"]["base_images"]).glob("*.png"))[0]))


def test_simple_and_prior_on_a_flux_lora_run_equal_a_recomputation(tmp_path_factory):
    """The two protocols with few images (simple x 2, prior x 2 and its 2 base images) in the default run; all
    four: the slow test below."""
    cfg, run_dir = trained_flux_lora(tmp_path_factory, ["simple", "prior"], checkpoint_every=2)
    check_records_against_a_recomputation(cfg, run_dir, ["simple", "prior"], [2])


@pytest.mark.slow  # ~2 min on 2 cores: 2 checkpoints x (25 + 2 + 20 + 2) images, then 49 + 2 again here
def test_every_protocol_on_a_flux_lora_run_equals_a_recomputation(tmp_path_factory):
    protocols = ["dreambooth", "simple", "jindal", "prior"]
    cfg, run_dir = trained_flux_lora(tmp_path_factory, protocols, checkpoint_every=1)  # checkpoints 1 and 2
    check_records_against_a_recomputation(cfg, run_dir, protocols, [1, 2])


# ---------------------------------------------------------------------------------- small photos


def test_a_photo_smaller_than_the_resolution_is_warned_about_once(make_cfg, tmp_path, caplog):
    """SDXL trains at 1024 px; a smaller photo is upscaled: one warning per run, naming the photo, its size and
    the resolution (here tiny SDXL's 64 px and a 40x48 photo beside photos larger than 64)."""
    from personalize.train import fit, prepare_run

    folder = tmp_path / "rex"
    folder.mkdir()
    for path in sorted(SAMPLE_DOG.glob("*.jpg"))[:3]:
        shutil.copy(path, folder / path.name)
    small = folder / "small.png"
    Image.open(SAMPLE_DOG / "00.jpg").convert("RGB").resize((40, 48)).save(small)
    cfg = make_cfg("model=tiny_sdxl", "method=lora", "subject=folder", f"subject.data_dir={folder}",
                   "subject.class_noun=dog", "method.stages.lora.steps=1", "method.stages.lora.checkpoint_every=1",
                   "eval.protocols=[simple]", "eval.images_per_prompt.simple=1", "eval.metrics=[clip_i]")
    with caplog.at_level(logging.WARNING):
        fit(prepare_run(cfg), sample=False)  # training and the evaluation, which reads the photos again
    warned = [r.getMessage() for r in caplog.records if "smaller than the training resolution" in r.getMessage()]
    assert warned == [f"'{small}' is 40x48, smaller than the training resolution 64: it will be upscaled and look soft"]


# ------------------------------------------------------------------------------------ the experiments


def compose_job(experiment: str, method: str, *overrides: str):
    return compose("train", [f"experiment={experiment}", f"+experiment/{experiment}@_global_={method}", *overrides],
                   output_dir="/unused")


METHODS = {"dreambench_sdxl": ("lora", "two_stage", "textual_inversion"), "dreambench_flux": ("lora", "two_stage")}


def test_dreambench_recipes_are_the_references():
    sdxl = {m: compose_job("dreambench_sdxl", m) for m in METHODS["dreambench_sdxl"]}
    flux = {m: compose_job("dreambench_flux", m) for m in METHODS["dreambench_flux"]}
    for jobs, model, size in ((sdxl, "stabilityai/stable-diffusion-xl-base-1.0", 1024),
                              (flux, "black-forest-labs/FLUX.1-dev", 1024)):
        for cfg in jobs.values():
            assert cfg.model.pretrained == model and cfg.model.resolution == size
            assert list(cfg.eval.protocols) == ["dreambooth"] and cfg.eval.images_per_prompt.dreambooth == 4
            assert set(cfg.eval.metrics) == {"dino", "clip_i", "clip_t"} and len(cfg.table.subjects) == 30
            assert cfg.table.selection == "last" and list(cfg.table.methods) == list(jobs)
            assert [c.metric for c in cfg.table.columns] == ["dino", "clip_i", "clip_t"]
    # SDXL DreamBooth-LoRA (README_sdxl.md): rank 4, 500 steps at 1e-4 constant, batch 1 x 4, no prior, 1024 px
    (lora,) = parse_stages(sdxl["lora"].method.stages)
    assert (lora.train, lora.steps, lora.lr, lora.prior_loss_weight, lora.checkpoint_steps()) == (
        ("lora",), 500, 1e-4, 0.0, [250, 500])
    for cfg in (sdxl["lora"], flux["lora"], flux["two_stage"]):
        assert (cfg.method.batch_size, cfg.method.gradient_accumulation_steps) == (1, 4)
        assert (cfg.method.lora.rank, cfg.method.lora.alpha) == (4, 4)
    # SDXL textual inversion (textual_inversion_sdxl README): 500 steps, 5e-4 x 4 with scale_lr, object templates
    ti = sdxl["textual_inversion"]
    (token,) = parse_stages(ti.method.stages)
    assert (token.steps, token.lr, ti.method.prompt_templates) == (500, 5e-4, "object")
    assert scaled_lr(token.lr, ti.method, world_size=1) == pytest.approx(2e-3)
    # two-stage on SDXL: Zeng et al.'s own numbers (our two_stage's defaults)
    default = compose("train", ["method=two_stage"], output_dir="/unused").method
    assert OmegaConf.to_container(sdxl["two_stage"].method, resolve=True) == OmegaConf.to_container(default, resolve=True)
    # FLUX: LoRA as train_dreambooth_lora_flux.py; two-stage = the token stage, then that LoRA stage
    (flux_lora,) = parse_stages(flux["lora"].method.stages)
    flux_token, flux_second = parse_stages(flux["two_stage"].method.stages)
    assert (flux_lora.steps, flux_lora.lr, flux_lora.prior_loss_weight) == (500, 1e-4, 0.0)
    assert (flux_token.train, flux_token.steps, flux_token.lr) == (("token",), 100, 5e-4)
    assert (flux_second.train, flux_second.steps, flux_second.lr) == (("lora",), 500, 1e-4)
    assert flux["lora"].method.loss.weighting_scheme == "none"
    assert (flux["lora"].eval.steps, flux["lora"].eval.guidance_scale) == (28, 3.5)  # FluxPipeline's defaults


def _shape(cfg) -> dict:
    """A job without its sizes (steps, checkpoints, image counts), model, hardware, subjects and logging."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    for stage in method["stages"].values():
        stage.pop("steps"), stage.pop("checkpoint_every", None)
    if method.get("new_token"):
        method["new_token"].pop("initializer")
    evaluation = {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items()
                  if k in ("protocols", "metrics", "real_images", "sampler", "guidance_scale", "seed", "every_checkpoint")}
    table = OmegaConf.to_container(cfg.table)
    table.pop("subjects")
    ci = {k: v for k, v in OmegaConf.to_container(cfg.class_images, resolve=True).items() if k in (
        "prompt", "negative_prompt", "sampler", "guidance_scale", "seed")}
    return dict(method=method, eval=evaluation, table=table, class_images=ci, seed=cfg.seed,
                experiment=cfg.group.removesuffix("_smoke"), backbone=cfg.model.backbone)


@pytest.mark.parametrize("experiment", list(METHODS))
def test_smoke_twin_changes_only_sizes(experiment):
    for method in METHODS[experiment]:
        full, small = compose_job(experiment, method), compose_job(f"{experiment}_smoke", method)
        assert _shape(small) == _shape(full), method
        assert small.model.name == f"tiny_{experiment.split('_')[1]}" and small.hardware.name == "cpu"
        assert [s.steps for s in parse_stages(small.method.stages)] == [
            max(1, round(s.steps / 100)) for s in parse_stages(full.method.stages)]
        assert list(small.table.subjects) == ["sample_dog", "sample_dog2"]


@pytest.mark.parametrize("experiment", [e for full in METHODS for e in (full, f"{full}_smoke")])
def test_each_file_is_a_global_override_naming_its_launch_and_report_commands(experiment):
    from personalize.config import CONF_DIR

    text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"personalize -m experiment={experiment}" in header and f"personalize-report experiment={experiment}" in header
    for method in METHODS[experiment.removesuffix("_smoke")]:  # each per-method file says where its numbers come from
        recipe = (CONF_DIR / "experiment" / experiment / f"{method}.yaml").read_text()
        assert recipe.startswith("# @package _global_\n") and recipe.count("\n#") >= 1, method


@pytest.mark.parametrize("experiment", [e for full in METHODS for e in (full, f"{full}_smoke")])
def test_the_sweep_is_methods_times_subjects_and_each_job_passes_the_config_checks(experiment):
    from tests.test_sweep import _cell, job_overrides
    from personalize.schema import check_config

    jobs = job_overrides(experiment)
    table = compose("train", [f"experiment={experiment}"], output_dir="/unused").table
    cells = {_cell(job) for job in jobs}
    assert len(cells) == len(jobs) and cells == {(m, s) for m in table.methods for s in table.subjects}
    for job in {_cell(j)[0]: j for j in jobs}.values():
        cfg = compose("train", [f"experiment={experiment}", *job], output_dir="/unused")
        check_config(cfg)
        assert cfg.group == experiment and experiment in cfg.tags


def smoke(experiment: str, outputs: Path, *overrides: str) -> sweeps.Sweep:
    """`personalize -m experiment=<experiment> <overrides>` into `outputs` (a second call adds its jobs there, as a
    user's rerun of the missing rows would), with that dir's own class-image cache."""
    sweep = sweeps.run("personalize", "-m", f"experiment={experiment}", "logger=none",
                       f"paths.class_image_dir={outputs / 'class_images'}", *overrides, outputs=outputs)
    assert sweep.returncode == 0, sweep.log[-4000:]
    return sweep




COLUMNS = ("dino", "clip_i", "clip_t")  # the table's, in its order


def check_rows(experiment: str, outputs: Path, methods: list[str], subjects: list[str]) -> sweeps.Sweep:
    """Some rows of a smoke twin through the sweep: every run evaluated at its last stage step on the 25
    DreamBooth prompts, checkpoint.json naming the tiny model; returns the sweep."""
    sweep = smoke(experiment, outputs, f"+experiment/{experiment}@_global_={','.join(methods)}",
                  f"subject={','.join(subjects)}")
    runs = [r for r in sweep.runs if r.name.split("_", 1)[1].rsplit("-", 2)[0] in methods]
    assert sorted(r.name.split("_", 1)[1] for r in runs) == sorted(
        f"{m}-{s}-s0" for m in methods for s in subjects)
    for run in runs:
        cfg = OmegaConf.load(run / "config.yaml")
        last = parse_stages(cfg.method.stages)[-1].steps
        assert [(r["stage_step"], r["protocol"], r["num_images"]) for r in read_records(run)] == [
            (last, "dreambooth", 25)], run.name
        (ckpt,) = (run / "checkpoints").iterdir()
        assert json.loads((ckpt / "checkpoint.json").read_text())["model"]["name"] == cfg.model.name
    return sweep


def check_report(sweep: sweeps.Sweep, experiment: str, methods: list[str], subjects: list[str]) -> str:
    """The report's rows are the mean over the subjects of each run's record (the last checkpoint), in the
    table's columns; table.csv holds the same numbers."""
    out, folder = sweeps.report(sweep, experiment, f"table.subjects=[{','.join(subjects)}]",
                         f"table.methods=[{','.join(methods)}]")
    assert "Setup: the DreamBooth protocol" in out and "## Missing (0 cell(s))" in out
    assert "Each cell: **ours** (no paper values for this table): the mean over" in out  # no paper prints these
    table = pd.read_csv(folder / "table.csv").set_index(["method", "metric"])
    for method in methods:
        records = [read_records(r)[0] for r in sweep.runs if r.name.split("_", 1)[1].rsplit("-", 2)[0] == method]
        expected = {m: sum(r[m] for r in records) / len(records) for m in COLUMNS}
        assert sweeps.markdown_row(out, method) == [f"{expected[m]:.3f}" for m in COLUMNS], method
        for metric, value in expected.items():
            assert math.isclose(table.ours[(method, metric)], value, abs_tol=1e-9)
    return out


def test_the_flux_smoke_lora_row_runs_through_the_sweep_and_the_report(tmp_path_factory):
    """One subject's LoRA row of dreambench_flux_smoke in the default run (~30 s); both smoke twins whole: the
    slow test below."""
    sweep = check_rows("dreambench_flux_smoke", tmp_path_factory.mktemp("flux-smoke"), ["lora"], ["sample_dog"])
    check_report(sweep, "dreambench_flux_smoke", ["lora"], ["sample_dog"])


@pytest.mark.slow  # 2 x 3 (SDXL) and 2 x 2 (FLUX) jobs: about 1.5 min per experiment on 2 cores
@pytest.mark.parametrize("experiment", [f"{full}_smoke" for full in METHODS])
def test_dreambench_smoke_runs_through_the_sweep_and_the_report(experiment, tmp_path_factory):
    methods = list(METHODS[experiment.removesuffix("_smoke")])
    subjects = ["sample_dog", "sample_dog2"]
    # the LoRA rows first, then the token methods' rows into the same outputs; the report reads them all
    outputs = tmp_path_factory.mktemp(experiment)
    check_rows(experiment, outputs, ["lora"], subjects)
    sweep = check_rows(experiment, outputs, [m for m in methods if m != "lora"], subjects)
    check_report(sweep, experiment, methods, subjects)
