"""Metrics on the tiny CLIP/DINO stand-ins: exactness, batch/order independence, identifier stripping, errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from personalize.errors import PersonalizeError
from personalize.eval import metrics as M
from personalize.eval.standins import ensure_tiny_clip, ensure_tiny_dino

DOG_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "dreambooth" / "dog"
if not DOG_DIR.is_dir():
    DOG_DIR = Path("/work/shared/dreambooth/dog")


@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("standins")
    return ensure_tiny_clip(root / "clip"), ensure_tiny_dino(root / "dino")


@pytest.fixture(scope="session")
def clip(standins) -> M.ClipEncoder:
    return M.ClipEncoder(standins[0])


@pytest.fixture(scope="session")
def dino(standins) -> M.DinoEncoder:
    return M.DinoEncoder(standins[1])


def synthetic(n: int, seed: int, size: tuple[int, int] = (40, 48)) -> torch.Tensor:
    """Smooth random colour images (low-res noise upsampled), uint8 [n,3,H,W]: never skips, no files."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 6, generator=g)
    return (F.interpolate(low, size=size, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def dog_images():
    from PIL import Image

    files = sorted(DOG_DIR.glob("*.jpg"))
    if not files:
        pytest.skip(f"no DreamBooth dog images at {DOG_DIR}")
    return [Image.open(f).convert("RGB") for f in files]


def brute_force(gen: torch.Tensor, ref: torch.Tensor) -> float:
    total = 0.0
    for g in gen:
        for r in ref:
            total += float(F.cosine_similarity(g.double(), r.double(), dim=0))
    return total / (len(gen) * len(ref))


# ---------------------------------------------------------------------------------------------------- CLIP-I / DINO


def _identical_checks(clip, dino, images) -> None:
    for encoder, cls in ((clip, M.CLIPImageSimilarity), (dino, M.DINOSimilarity)):
        # One image as reference and three copies of it as generated: every pair is (x, x) -> 1.
        for k in range(len(images)):
            one = images[k:k + 1]
            metric = cls(encoder)
            metric.set_reference_images(one)
            metric.update(list(one) * 3 if isinstance(one, list) else one.repeat(3, 1, 1, 1))
            assert float(metric.compute()) == pytest.approx(1.0, abs=1e-5)
        # The same multi-image set on both sides: the all-pairs mean is |mean feature|^2 (< 1), exactly.
        metric = cls(encoder)
        metric.set_reference_images(images)
        metric.update(images)
        feats = encoder.encode_images(images).double()
        assert float(metric.compute()) == pytest.approx(float(feats.mean(0).square().sum()), abs=1e-6)
        assert float(metric.compute()) == pytest.approx(brute_force(feats, feats), abs=1e-6)


def test_identical_sets_synthetic(clip, dino):
    _identical_checks(clip, dino, synthetic(6, seed=1))


def test_identical_sets_real_dog_images(clip, dino):
    _identical_checks(clip, dino, dog_images())


def test_all_pairs_mean_equals_double_loop(clip, dino):
    gen, ref = synthetic(7, seed=2), synthetic(5, seed=3, size=(64, 40))
    for encoder, cls in ((clip, M.CLIPImageSimilarity), (dino, M.DINOSimilarity)):
        metric = cls(encoder, reference_features=encoder.encode_images(ref))
        metric.update(gen)
        expected = brute_force(encoder.encode_images(gen), encoder.encode_images(ref))
        assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)


def test_reference_survives_reset_and_is_required(clip):
    ref, gen = synthetic(4, seed=4), synthetic(6, seed=5)
    metric = M.CLIPImageSimilarity(clip)
    metric.update(gen)
    with pytest.raises(PersonalizeError, match="reference"):
        metric.compute()
    metric.set_reference_images(ref)
    first = float(metric.compute())
    metric.reset()  # next checkpoint: generated side cleared, references kept
    metric.update(gen)
    assert float(metric.compute()) == pytest.approx(first, abs=1e-7)


def test_image_input_forms_agree(clip):
    from PIL import Image

    x = synthetic(3, seed=6)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]
    as_uint8 = clip.encode_images(x)
    assert torch.allclose(clip.encode_images(pil), as_uint8, atol=1e-6)
    assert torch.allclose(clip.encode_images(x.float() / 255), as_uint8, atol=1e-5)
    assert torch.allclose(clip.encode_images(list(x)), as_uint8, atol=1e-6)


def test_preprocessing_sizes(dino):
    x = torch.rand(2, 3, 100, 200)
    out = M.resize_center_crop(x, 256, 224)  # the DINO protocol on the real model
    assert out.shape == (2, 3, 224, 224) and out.min() >= 0 and out.max() <= 1
    # The stand-in keeps the 256/224 ratio at its own size.
    assert (dino.crop_size, dino.resize_size) == (32, round(32 * 256 / 224))


# ---------------------------------------------------------------------------------------------------- batch / order


def _run(metrics_factory, images, prompts, order, splits):
    metrics = metrics_factory()
    idx = list(order)
    start = 0
    for n in splits:
        part = idx[start:start + n]
        M.update_metrics(metrics, images[part], [prompts[i] for i in part])
        start += n
    return M.compute_metrics(metrics)


def test_independent_of_batch_split_and_order(standins):
    clip_path, dino_path = standins
    ref, gen = synthetic(40, seed=7), synthetic(40, seed=8)
    prompts = [f"a <rare> dog {place}" for place in ("in the snow", "on the beach", "in the jungle", "red")] * 10

    def factory():
        metrics = M.build_metrics(["clip_i", "clip_t", "dino", "clip_score", "fid"], clip_path, dino_path, "dino")
        M.set_references(metrics, ref)
        return metrics

    whole = _run(factory, gen, prompts, range(40), [40])
    order = list(range(40))
    random.Random(0).shuffle(order)
    for splits in ([7, 13, 1, 19], [3] * 13 + [1]):
        other = _run(factory, gen, prompts, order, splits)
        for name in ("clip_i", "clip_t", "dino", "clip_score"):
            assert other[name] == pytest.approx(whole[name], abs=1e-5), name
        assert other["fid"] == pytest.approx(whole["fid"], rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- FID / IS


@pytest.mark.parametrize("features", ["clip", "dino"])
def test_fid_zero_for_identical_sets(standins, features):
    images = synthetic(48, seed=9)
    metrics = M.build_metrics(["fid"], *standins, fid_features=features)
    M.set_references(metrics, images)
    M.update_metrics(metrics, images)
    same = M.compute_metrics(metrics)["fid"]
    M.reset_metrics(metrics)  # real features survive reset
    M.update_metrics(metrics, synthetic(48, seed=10, size=(48, 40)) // 3)  # darker: another distribution
    different = M.compute_metrics(metrics)["fid"]
    assert abs(same) < 1e-6 and different > 0.05


def test_inception_score_with_clip_logits(standins):
    metrics = M.build_metrics(["is"], *standins, fid_features="clip", is_splits=2)
    M.update_metrics(metrics, synthetic(8, seed=11))
    scores = M.compute_metrics(metrics)
    assert 1.0 <= scores["is"] <= len(M.CLASS_NOUNS)
    with pytest.raises(PersonalizeError, match="fid_features=clip"):
        M.build_metrics(["is"], *standins, fid_features="dino")


@pytest.mark.parametrize("name", ["fid", "is"])
def test_missing_torch_fidelity_is_a_clear_error(monkeypatch, standins, name):
    monkeypatch.setattr(M, "_has_torch_fidelity", lambda: False)
    with pytest.raises(PersonalizeError) as info:
        M.build_metrics([name], *standins, fid_features="inception")
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'personalize[fidelity]'" in message and "eval.fid_features=clip" in message


def test_metric_state_dict_holds_no_model_weights(standins):
    metrics = M.build_metrics(["clip_i", "clip_t", "dino", "fid"], *standins, fid_features="clip")
    for metric in metrics.values():
        assert not any(p.numel() for p in metric.parameters())
        assert not metric.state_dict()


def test_unknown_names_are_clear_errors(standins):
    with pytest.raises(PersonalizeError, match="unknown metric"):
        M.build_metrics(["clip-i"], *standins)
    with pytest.raises(PersonalizeError, match="missing' does not exist"):
        M.ClipEncoder(standins[0].parent / "missing")


# ---------------------------------------------------------------------------------------------------- CLIP-T / CLIP score


@pytest.mark.parametrize(
    ("prompt", "clean"),
    [
        ("a <rare> dog in the snow", "a dog in the snow"),
        ("a photo of sks dog", "a photo of dog"),
        ("a <sks> on the beach", "a on the beach"),
        ("a sks dog doing tasks", "a dog doing tasks"),  # whole words only
        ("  a   <rare>  dog ", "a dog"),
        ("<rare> dog, sks", "dog,"),
    ],
)
def test_strip_identifier(prompt, clean):
    assert M.strip_identifier(prompt) == clean


def test_strip_configured_identifier():
    assert M.strip_identifier("a zwx backpack", "zwx") == "a backpack"
    assert M.strip_identifier("a <v*> cat", ["<v*>"]) == "a cat"


class _TokenizerSpy:
    """Records every text list the CLIP tokenizer is asked to encode, then delegates."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.seen.append(list(texts))
        return self.tokenizer(texts, **kwargs)


def test_clip_t_strips_identifiers_before_encoding(standins, monkeypatch):
    encoder = M.ClipEncoder(standins[0])
    spy = _TokenizerSpy(encoder.tokenizer)
    monkeypatch.setattr(encoder, "tokenizer", spy)
    images = synthetic(4, seed=12)
    prompts = ["a <rare> dog in the snow", "a sks dog on the beach", "a <sks> dog in the jungle", "a <rare> dog in the snow"]
    metric = M.CLIPTextSimilarity(encoder)
    metric.update(images, prompts)
    encoded = [t for call in spy.seen for t in call]
    assert encoded == ["a dog in the snow", "a dog on the beach", "a dog in the jungle"]
    assert not any(ident in t for t in encoded for ident in ("<rare>", "sks", "<sks>"))
    clean = ["a dog in the snow", "a dog on the beach", "a dog in the jungle", "a dog in the snow"]
    expected = (encoder.encode_images(images) * encoder.encode_text(clean)).sum(-1).mean()
    assert float(metric.compute()) == pytest.approx(float(expected), abs=1e-6)


def test_clip_score_matches_torchmetrics_formula(standins):
    """Our CLIP score == torchmetrics CLIPScore on the same model, on images already at the model size.

    torchmetrics 1.9's CLIPScore cannot use a transformers-5 CLIPModel directly (get_*_features now
    return ModelOutputs), hence the small adapter.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class Adapter(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    path = str(standins[0])
    reference = CLIPScore(model_name_or_path=lambda: (Adapter(CLIPModel.from_pretrained(path)),
                                                      CLIPProcessor.from_pretrained(path)))
    images = synthetic(6, seed=13, size=(32, 32))
    prompts = ["a dog in the snow", "a red dog", "a dog on the beach"] * 2
    reference.update(list(images), prompts)
    ours = M.ClipScore(M.ClipEncoder(path))
    ours.update(images, prompts)
    assert float(ours.compute()) == pytest.approx(float(reference.compute()), abs=1e-3)


# ---------------------------------------------------------------------------------------------------- stand-ins


def test_standins_are_deterministic_and_built_once(standins, tmp_path):
    from safetensors.torch import load_file

    clip_path, _ = standins
    stamp = (clip_path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_clip(clip_path) == clip_path
    assert (clip_path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    again = ensure_tiny_clip(tmp_path / "clip")
    a, b = load_file(clip_path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind


# ---------------------------------------------------------------------------------------------------- DDP


def test_ddp_sync_equals_one_process(standins):
    """Two 'ranks' with half the images each, synced through torchmetrics' gather hook, give the 1-rank value."""
    ref, gen = synthetic(6, seed=14), synthetic(20, seed=15)
    prompts = ["a <rare> dog in the snow", "a sks dog on the beach"] * 10
    names = ["clip_i", "clip_t", "dino", "fid"]
    single = M.build_metrics(names, *standins, fid_features="clip")
    M.set_references(single, ref)
    M.update_metrics(single, gen, prompts)
    expected = M.compute_metrics(single)

    rank0 = M.build_metrics(names, *standins, fid_features="clip")
    rank1 = M.build_metrics(names, *standins, fid_features="clip")
    M.set_references(rank0, ref)
    M.set_references({k: v for k, v in rank1.items() if k != "fid"}, ref)  # FID reals: rank 0 only
    M.update_metrics(rank0, gen[:10], prompts[:10])
    M.update_metrics(rank1, gen[10:], prompts[10:])
    gathered: list[str] = []
    for name, metric in rank0.items():
        peer = rank1[name]

        def gather(tensor, group=None, metric=metric, peer=peer):
            state = next(k for k in metric._defaults if getattr(metric, k) is tensor)
            gathered.append(state)
            return [tensor, getattr(peer, state)]

        metric.dist_sync_fn, metric.distributed_available_fn = gather, lambda: True
    synced = M.compute_metrics(rank0)
    assert {"gen_sum", "n_gen", "cos_sum", "fake_features_sum", "real_features_num_samples"} <= set(gathered)
    for name in names:
        assert synced[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
