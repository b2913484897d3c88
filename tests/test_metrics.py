"""Metrics on the tiny CLIP/DINO stand-ins: exactness, batch/order independence, identifier stripping, errors;
the explicit Inception resize of FID/IS and the settings each metrics record carries."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
import torchmetrics.image.fid as tm_fid
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.inception import InceptionScore

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


# ---------------------------------------------------------------------------------------------------- Inception resize


def tf1_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 `resize_bilinear(align_corners=False)` from its definition, in float64: output pixel (i, j)
    reads input position (i * H / out_h, j * W / out_w) and weighs its four neighbours bilinearly (the
    far neighbour clamped to the last row/column)."""
    h, w = image.shape[-2:]

    def axis(n_in, n_out):
        position = np.arange(n_out) * (n_in / n_out)
        low = np.floor(position).astype(int)
        return low, np.minimum(low + 1, n_in - 1), position - low

    y0, y1, wy = axis(h, out_h)
    x0, x1, wx = axis(w, out_w)
    wy, wx = wy[:, None], wx[None, :]

    def at(ys, xs):
        return image[..., ys[:, None], xs[None, :]]

    return (1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x1)) + wy * ((1 - wx) * at(y1, x0) + wx * at(y1, x1))


def detailed(n: int, seed: int, size: int = 512, scale: float = 1.0) -> torch.Tensor:
    """uint8 [n,3,size,size]: smooth colour plus fine noise, the detail that an unfiltered downscale aliases."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 24, 24, generator=g)
    smooth = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    images = (smooth.clamp(0, 1) + 0.15 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1) * scale
    return (images * 255).round().to(torch.uint8)


@pytest.mark.parametrize("shape", [(512, 512), (64, 80), (300, 300), (100, 1000)])
def test_inception_resize_is_tf1_bilinear(shape):
    """Down, up, nearly-same and mixed scales, on noise (the worst case for any resize error)."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(0, 256, (2, 3, *shape), generator=g, dtype=torch.uint8)
    expected = tf1_reference(x.double().numpy(), 299, 299)
    ours = M.resize_bilinear_tf1(x.float(), 299)
    assert ours.shape == (2, 3, 299, 299)
    # TF (and we) compute positions in float32: an error of ~6e-8 * 1000 pixels in a position times a
    # step of at most 255 between neighbours stays below 0.02 grey levels.
    assert np.abs(ours.double().numpy() - expected).max() < 0.02
    # what the metric gets: that, rounded to uint8 (within half a level, plus the tolerance above)
    quantised = M.inception_input(x)
    assert quantised.dtype == torch.uint8 and quantised.shape == (2, 3, 299, 299)
    assert np.abs(quantised.double().numpy() - expected).max() <= 0.5 + 0.02


def test_inception_resize_exact_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 598, 598), generator=g).float()
    # exactly half size: TF1 bilinear reads input pixel 2i, weight 0 for its neighbour
    assert torch.equal(M.resize_bilinear_tf1(x, 299), x[..., ::2, ::2])
    same = x[..., :299, :299].contiguous()
    assert torch.equal(M.resize_bilinear_tf1(same, 299), same)
    assert torch.equal(M.inception_input(same.to(torch.uint8)), same.to(torch.uint8))
    # float [0,1] input is quantised as a saved PNG would be, then resized like the uint8 image
    x512 = detailed(2, seed=1)
    assert torch.equal(M.inception_input(x512.float() / 255), M.inception_input(x512))
    # and it is not what torchmetrics >= 1.8 does inside its Inception (antialiased bilinear)
    antialiased = F.interpolate(x512.float(), size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    assert (M.resize_bilinear_tf1(x512.float(), 299) - antialiased).abs().max() > 10


class _Scale(nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return x * self.gain


class _Recorder(nn.Module):
    """A layer that remembers the last tensor it was given, then applies `inner`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.inner(x)


@pytest.fixture
def torchmetrics_inception(monkeypatch):
    """torchmetrics' own Inception module (`NoTrainInceptionV3`: its forward, with its input resize) on
    four small random layers in place of the Inception weights (a download we cannot make here); feature
    "64" stops after the fourth (`gain` scales it: IS needs logits that are not all near zero).
    Where torch-fidelity is not installed (it needs torchvision), the two helpers of it that this forward
    calls are stood in for: an assert, and our TF1 resize, which is bit-identical to torch-fidelity 0.4's
    `interpolate_bilinear_2d_like_tensorflow1x` on CPU (measured when this was written; the tests above
    check it against the definition)."""
    if tm_fid.vassert is None:
        def vassert(condition, message):
            if not condition:
                raise ValueError(message)

        monkeypatch.setattr(tm_fid, "vassert", vassert)
    if tm_fid.interpolate_bilinear_2d_like_tensorflow1x is None:
        monkeypatch.setattr(tm_fid, "interpolate_bilinear_2d_like_tensorflow1x",
                            lambda x, size, align_corners: M.resize_bilinear_tf1(x, size))

    def build(antialias: bool, gain: float = 1.0) -> NoTrainInceptionV3:
        torch.manual_seed(0)
        net = NoTrainInceptionV3.__new__(NoTrainInceptionV3)  # its __init__ downloads the weights
        nn.Module.__init__(net)
        net.INPUT_IMAGE_SIZE, net.features_list, net.num_features = 299, ["64"], 16
        net.use_antialias = antialias  # torchmetrics >= 1.8 reads it; older versions always use TF1 bilinear
        net.Conv2d_1a_3x3 = _Recorder(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU()))
        net.Conv2d_2a_3x3 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU())
        net.Conv2d_2b_3x3 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), _Scale(gain))
        net.MaxPool_1 = nn.MaxPool2d(3, stride=2)
        return net.eval()

    return build


# Only torchmetrics >= 1.8 has the antialiased resize whose effect we remove.
RESIZE_CHANGED = "antialias" in inspect.signature(NoTrainInceptionV3.__init__).parameters


def test_torchmetrics_inception_gets_our_299_image_and_does_not_resize_it(torchmetrics_inception):
    images = detailed(3, seed=2)
    expected = (M.inception_input(images).float() - 128) / 128  # torchmetrics' scaling, after its resize
    first_layer_inputs = []
    for antialias in (False, True):
        net = torchmetrics_inception(antialias)
        fid = M.FID(feature=net)  # "auto": torchmetrics' Inception gets our resize
        assert fid.resize_to == 299
        fid.update(images, real=True)
        assert net.Conv2d_1a_3x3.seen.shape == (3, 3, 299, 299)
        assert torch.equal(net.Conv2d_1a_3x3.seen, expected)  # its own resize left our 299 image alone
        plain = FrechetInceptionDistance(feature=net)  # torchmetrics alone, given the 512 images
        plain.update(images, real=True)
        first_layer_inputs.append(net.Conv2d_1a_3x3.seen)
    if RESIZE_CHANGED:  # the probe does exercise torchmetrics' resize: its two methods differ at 512
        assert (first_layer_inputs[0] - first_layer_inputs[1]).abs().max() > 0.05


def test_fid_and_is_do_not_depend_on_torchmetrics_resize(torchmetrics_inception):
    real, fake = detailed(16, seed=3), detailed(16, seed=4, scale=0.8)
    plain, ours, is_plain, is_ours = {}, {}, {}, {}
    for antialias in (False, True):
        metric = FrechetInceptionDistance(feature=torchmetrics_inception(antialias))
        metric.update(real, True)
        metric.update(fake, False)
        plain[antialias] = float(metric.compute())
        metric = M.FID(feature=torchmetrics_inception(antialias))
        metric.set_real_images(real)
        metric.update(list(fake), real=False)  # a list of [3,H,W], as evaluation passes images
        ours[antialias] = float(metric.compute())
        metric = InceptionScore(feature=torchmetrics_inception(antialias, gain=300.0), splits=2)
        metric.update(fake)
        torch.manual_seed(M.IS_SPLIT_SEED)
        is_plain[antialias] = float(metric.compute()[0])
        metric = M.IS(feature=torchmetrics_inception(antialias, gain=300.0), splits=2)
        metric.update(fake)
        is_ours[antialias] = float(metric.compute()[0])
    # ours: the same number whichever resize torchmetrics would apply (same operations on the same shapes)
    assert ours[False] == ours[True] and is_ours[False] == is_ours[True]
    assert ours[True] > 0 and is_ours[True] > 1.001  # not degenerate: the two sets differ, the logits spread
    # and the same as feeding torchmetrics images we resized ourselves
    metric = FrechetInceptionDistance(feature=torchmetrics_inception(True))
    metric.update(M.inception_input(real), True)
    metric.update(M.inception_input(fake), False)
    assert float(metric.compute()) == ours[True]
    if RESIZE_CHANGED:
        assert plain[False] != plain[True] and is_plain[False] != is_plain[True]
        # ours is the legacy (TF1) number up to the uint8 rounding of the 299 image: much nearer to it
        # than torchmetrics' antialiased default is (a quarter of that gap; measured well under a tenth)
        assert abs(ours[True] - plain[False]) < 0.25 * abs(plain[True] - plain[False])


# ---------------------------------------------------------------------------------------------------- settings


def test_metric_settings_name_implementation_features_and_resize(standins, clip, torchmetrics_inception):
    version = torchmetrics.__version__
    fid = M.FID(feature=torchmetrics_inception(True)).settings()
    assert fid == {"impl": f"torchmetrics {version} FrechetInceptionDistance", "features": "inception-v3-compat:64",
                   "extractor": fid["extractor"], "resize": "tf1-bilinear-299"}
    assert fid["extractor"].startswith("torch-fidelity ")
    inception_is = M.IS(feature=torchmetrics_inception(True), splits=3).settings()
    assert inception_is == {"impl": f"torchmetrics {version} InceptionScore", "features": "inception-v3-compat:64",
                            "extractor": fid["extractor"], "resize": "tf1-bilinear-299", "splits": 3, "split_seed": 0}

    names = ["clip_i", "clip_t", "dino", "clip_score", "fid", "is"]
    settings = M.metric_settings(M.build_metrics(names, *standins, fid_features="clip", is_splits=2))
    clip_path, dino_path = map(str, standins)
    clip_resize = f"shortest-edge-{clip.resize_size}-bicubic-antialias-center-crop-{clip.crop_size}"
    dino = M.DinoEncoder(dino_path)
    dino_resize = f"shortest-edge-{dino.resize_size}-bicubic-antialias-center-crop-{dino.crop_size}"
    assert settings == {
        "clip_i": {"impl": "personalize CLIPImageSimilarity", "features": f"clip:{clip_path}", "resize": clip_resize},
        "clip_t": {"impl": "personalize CLIPTextSimilarity", "features": f"clip:{clip_path}", "resize": clip_resize,
                   "identifiers_removed": list(M.DEFAULT_IDENTIFIERS)},
        "dino": {"impl": "personalize DINOSimilarity", "features": f"dino:{dino_path}", "resize": dino_resize},
        "clip_score": {"impl": "personalize ClipScore", "features": f"clip:{clip_path}", "resize": clip_resize,
                       "identifiers_removed": list(M.DEFAULT_IDENTIFIERS)},
        "fid": {"impl": f"torchmetrics {version} FrechetInceptionDistance", "features": f"clip:{clip_path}",
                "resize": clip_resize},
        "is": {"impl": f"torchmetrics {version} InceptionScore", "resize": clip_resize, "splits": 2, "split_seed": 0,
               "features": f"clip:{clip_path} zero-shot logits over {len(M.CLASS_NOUNS)} labels"},
    }
    assert json.loads(json.dumps(settings)) == settings  # goes into metrics.jsonl as is


def test_metrics_record_carries_the_settings_and_readers_ignore_them(make_cfg):
    """A real (one-step, tiny) run's metrics.jsonl: the record names how each number was computed, and
    the evaluation's and the report's readers still read the record."""
    from personalize.eval.publish import format_table
    from personalize.rundir import current_records, is_done, metric_names, read_records
    from personalize.train import fit, prepare_run

    cfg = make_cfg("method=textual_inversion", "subject=sample_dog", "method.stages.token.steps=1",
                   "method.stages.token.checkpoint_every=1", "eval.protocols=[simple]", "eval.metrics=[clip_i,fid,is]")
    run = fit(prepare_run(cfg))
    [record] = read_records(run.run_dir)
    clip = M.ClipEncoder(record["spec"]["clip_model"])
    clip_resize = f"shortest-edge-{clip.resize_size}-bicubic-antialias-center-crop-{clip.crop_size}"
    features = f"clip:{record['spec']['clip_model']}"
    assert record["metric_settings"] == {
        "clip_i": {"impl": "personalize CLIPImageSimilarity", "features": features, "resize": clip_resize},
        "fid": {"impl": f"torchmetrics {torchmetrics.__version__} FrechetInceptionDistance", "features": features,
                "resize": clip_resize},
        "is": {"impl": f"torchmetrics {torchmetrics.__version__} InceptionScore", "resize": clip_resize,
               "features": f"{features} zero-shot logits over {len(M.CLASS_NOUNS)} labels", "splits": 10,
               "split_seed": 0},
    }
    assert is_done([record], 1, "simple", record["key"], ["clip_i", "fid", "is"]) is record
    assert format_table([record]).splitlines()[0].split() == ["step", "stage", "protocol", "clip_i", "fid", "is"]
    [read] = current_records(read_records(run.run_dir))
    assert set(metric_names(read)) == {"clip_i", "fid", "is", "is_std"}


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
