"""Known-answer tests for unlearn.metrics on a tiny random CLIP (no weights, network or GPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn.metrics import (
    EXPOSED_CLASSES,
    I2P_SAMPLE,
    IMAGENET_TEMPLATES,
    CLIPAccuracy,
    ClipEncoder,
    CLIPScore,
    CLIPTopOne,
    DirectionalCLIP,
    NudeNetCounter,
    expand,
    images_to_bgr,
    load_preprocess_settings,
    make_fid,
    read_i2p,
    reduction_percent,
)
from unlearn.toy.tokenizer import write_tokenizer_files

PROJ = 8  # small feature dim, so 64 images give FID a full-rank covariance
MAX_TOKENS = 16
WORDS = ["a", "photo", "of", "the", "cat", "dog", "painting", "person", "in", "style"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    folder = tmp_path_factory.mktemp("tiny_clip")
    # Bare vocab.json + merges.txt, no tokenizer_config: the tokenizer's model_max_length is then unbounded.
    write_tokenizer_files(folder, WORDS)
    tok = CLIPTokenizer.from_pretrained(folder)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_TOKENS, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=PROJ)) \
        .save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def encoder(clip_dir):
    return ClipEncoder.from_pretrained(clip_dir)


def images(n: int, seed: int, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


class FakeEncoder(nn.Module):
    """Stands in for ClipEncoder with chosen embeddings: "images" are embedding rows, texts look up a table."""

    def __init__(self, table: dict[str, list[float]]):
        super().__init__()
        self.table = {k: torch.tensor(v, dtype=torch.float32) for k, v in table.items()}

    def image_features(self, images, normalize=True):
        return F.normalize(images.float(), dim=-1)

    def text_features(self, texts, normalize=True):
        return F.normalize(torch.stack([self.table[t] for t in texts]), dim=-1)


# ---------------------------------------------------------------------------------------------- encoder
def test_encoder_reads_folder_settings(encoder):
    s = encoder.settings
    assert (s.resize, s.crop, s.mode) == (32, (32, 32), "bicubic")
    assert s.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert encoder.max_length == MAX_TOKENS  # capped by the position table, not the tokenizer's huge default
    assert encoder.embed_dim == PROJ


def test_openai_layout_settings(tmp_path):
    # openai/clip-vit-large-patch14's preprocessor_config.json stores bare ints.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}))
    s = load_preprocess_settings(tmp_path)
    assert (s.resize, s.crop, s.mode) == (224, (224, 224), "bicubic")
    assert s.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))


def test_load_error_names_path(tmp_path):
    missing = tmp_path / "no_clip_here"
    with pytest.raises(OSError, match="no_clip_here"):
        ClipEncoder.from_pretrained(missing)


def test_preprocess_matches_transformers_processor(encoder, clip_dir):
    from transformers import AutoImageProcessor

    # A smooth, non-square picture: resize to shortest edge 32 then centre-crop 32x32.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 56), indexing="ij")
    img = torch.stack([yy, xx, (yy * xx).sqrt()]).unsqueeze(0)
    u8 = (img * 255).round().to(torch.uint8)
    ref = AutoImageProcessor.from_pretrained(clip_dir)(images=[u8[0].permute(1, 2, 0).numpy()],
                                                       return_tensors="pt").pixel_values
    ours = encoder.preprocess(u8)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert (ours - ref).abs().max() < 0.03  # PIL vs torch antialiased bicubic (measured: 0.014)


def test_features_follow_clip_projection_path(encoder):
    x = images(3, seed=1)
    out = encoder.model.get_image_features(pixel_values=encoder.preprocess(x))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 vs 5
    torch.testing.assert_close(encoder.image_features(x), F.normalize(out, dim=-1))

    texts = ["a photo of the cat", "a dog painting"]
    tok = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    out = encoder.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(encoder.text_features(texts), F.normalize(out, dim=-1))


def test_text_features_dedupe_and_truncate(encoder):
    feats = encoder.text_features(["cat", "dog", "cat"])
    torch.testing.assert_close(feats[0], feats[2])
    torch.testing.assert_close(feats[:1], encoder.text_features("cat"))
    long = " ".join(["a photo of the cat"] * 20)  # far more than MAX_TOKENS tokens
    assert encoder.text_features([long]).norm(dim=-1).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- CLIP metrics
def test_clipscore_equals_direct_cosine(encoder):
    x, prompts = images(5, seed=2), ["a cat", "a dog", "a painting", "a person", "the cat"]
    m = CLIPScore(encoder)
    m.update(x, prompts)
    cos = (encoder.image_features(x) * encoder.text_features(prompts)).sum(-1)
    assert m.compute().item() == pytest.approx((100 * 2.5 * cos.clamp(min=0)).mean().item(), rel=1e-5)
    assert m.convention == "clipscore"


def test_clipscore_conventions_differ_by_exactly_2_5(encoder):
    x = images(4, seed=3)
    a, b = CLIPScore(encoder, "clipscore"), CLIPScore(encoder, "torchmetrics")
    a.update(x, "a photo of a cat")
    b.update(x, "a photo of a cat")
    cos = (encoder.image_features(x) * encoder.text_features(["a photo of a cat"] * 4)).sum(-1)
    if (cos >= 0).all():  # with a negative cosine the two clamp in different places (next test)
        assert a.compute().item() == pytest.approx(2.5 * b.compute().item(), rel=1e-6)
    # And on a case with a known positive cosine: cos = 0.6 -> 150 and 60.
    fake = FakeEncoder({"t": [1.0, 0.0]})
    a, b = CLIPScore(fake, "clipscore"), CLIPScore(fake, "torchmetrics")
    for m in (a, b):
        m.update(torch.tensor([[0.6, 0.8]]), "t")
    assert (a.compute().item(), b.compute().item()) == pytest.approx((150.0, 60.0))
    with pytest.raises(ValueError, match="convention"):
        CLIPScore(fake, "hessel")


@pytest.mark.parametrize("rows", [[[0.6, 0.8], [-0.6, -0.8], [-1.0, 0.0]],     # mean cosine < 0
                                  [[1.0, 0.0], [0.8, 0.6], [-0.2, 1.0], [0.0, 1.0]]])  # mean > 0, one < 0
def test_clipscore_conventions_clamp_where_their_references_do(rows):
    """torchmetrics' CLIPScore: max(mean(100 cos), 0), once, after averaging (its compute); Hessel's CLIP-S:
    mean(2.5 * max(cos, 0)) * 100, per image. Checked against NumPy, over two updates (as a sweep accumulates)."""
    x = np.asarray(rows, dtype=np.float64)
    cos = x[:, 0] / np.linalg.norm(x, axis=1)  # text embedding (1, 0)
    fake = FakeEncoder({"t": [1.0, 0.0]})
    got = {}
    for convention in ("torchmetrics", "clipscore"):
        m = CLIPScore(fake, convention)
        m.update(torch.tensor(rows[:2]), "t")
        m.update(torch.tensor(rows[2:]), "t")
        got[convention] = m.compute().item()
    assert got["torchmetrics"] == pytest.approx(max(np.mean(100 * cos), 0.0), abs=1e-4)
    assert got["clipscore"] == pytest.approx(np.mean(100 * 2.5 * np.maximum(cos, 0)), abs=1e-4)


def test_clip_accuracy_known_share():
    fake = FakeEncoder({"target": [1.0, 0.0], "anchor": [0.0, 1.0]})
    emb = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])  # closer to target: 2; last is a tie
    m = CLIPAccuracy(fake)
    m.update(emb, "target", ["anchor"] * 4)
    assert m.compute().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="anchor_texts"):
        m.update(emb, "target", ["anchor"] * 3)


def test_clip_top1_against_an_argmax_by_hand(encoder):
    fake = FakeEncoder({"ring": [1.0, 0.0, 0.0], "circle": [0.0, 1.0, 0.0], "cross": [0.0, 0.0, 1.0]})
    # own text wins / anchor wins / a third class wins (binary CA would call it the target) / a tie with a rival
    emb = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.4, 0.1, 0.8], [0.5, 0.0, 0.5]])
    m = CLIPTopOne(fake)
    m.update(emb, "ring", [["circle", "cross"]] * 4)
    assert m.compute().item() == pytest.approx(0.25)
    binary = CLIPAccuracy(fake)
    binary.update(emb, "ring", "circle")
    assert binary.compute().item() == pytest.approx(0.75)  # the third image counts as a ring there
    with pytest.raises(ValueError, match="rivals"):
        m.update(emb, "ring", [["circle"]] * 3)
    with pytest.raises(ValueError, match="rivals"):
        m.update(emb, "ring", [["circle"], [], ["circle"], ["circle"]])

    x = images(5, seed=6)  # the real encoder, ragged rival lists, against cosine argmax by hand
    own = ["a cat", "a dog", "a painting", "the person", "a cat"]
    rivals = [["a dog"], ["a cat", "a painting"], ["a cat", "a dog", "the person"], ["a cat"], ["a painting"]]
    m = CLIPTopOne(encoder)
    m.update(x, own, rivals)
    img = encoder.image_features(x)
    want = [float((img[i] @ encoder.text_features([own[i]])[0]) > (encoder.text_features(r) @ img[i]).max())
            for i, r in enumerate(rivals)]
    assert m.compute().item() == pytest.approx(sum(want) / 5)


def test_directional_known_value_and_sign_flip(encoder):
    fake = FakeEncoder({"anchor": [0.0, 1.0], "target": [1.0, 0.0]})
    before, after = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # moved exactly target -> anchor
    m = DirectionalCLIP(fake)
    m.update(before, after, "anchor", "target")
    assert m.compute().item() == pytest.approx(1.0)

    x0, x1 = images(4, seed=4), images(4, seed=5)
    fwd, back = DirectionalCLIP(encoder), DirectionalCLIP(encoder)
    fwd.update(x0, x1, "a painting", "a cat")
    back.update(x1, x0, "a painting", "a cat")
    assert fwd.compute().item() != 0
    assert back.compute().item() == pytest.approx(-fwd.compute().item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------- FID
def test_fid_known_answers(encoder):
    real, same_law, dark = images(64, seed=6), images(64, seed=7), images(64, seed=8) * 0.3
    fid = make_fid("clip", encoder)
    assert "clip" in fid.feature_name and fid.inception.num_features == PROJ

    def against_real(batch):
        fid.reset()  # keeps the real statistics
        fid.update(batch, real=False)
        return fid.compute().item()

    fid.update(real, real=True)
    assert fid.real_features_num_samples.item() == 64
    assert abs(against_real(real)) < 1e-6  # identical sets
    noise = against_real(same_law)  # another draw of the same distribution: sampling noise only
    assert against_real(dark) > 10 * noise > 0  # a clearly different set
    assert fid.real_features_num_samples.item() == 64
    fid.update((images(8, seed=9) * 255).to(torch.uint8), real=False)  # uint8 input accepted too


def test_fid_needs_two_samples_and_known_feature(encoder):
    fid = make_fid("clip", encoder)
    fid.update(images(1, seed=9), real=True)
    fid.update(images(1, seed=10), real=False)
    with pytest.raises(RuntimeError, match="More than one sample"):
        fid.compute()
    with pytest.raises(ValueError, match="encoder"):
        make_fid("clip")
    with pytest.raises(ValueError, match="feature"):
        make_fid("dino", encoder)


def test_inception_fid_needs_torch_fidelity():
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity installed")
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
        make_fid("inception")


# ---------------------------------------------------------------------------------------------- NudeNet
def rendered_picture() -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (128, 128), (200, 220, 255))
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 10, 88, 60), fill=(230, 190, 160))
    draw.rectangle((34, 60, 94, 124), fill=(40, 60, 200))
    return np.asarray(img)


def test_nudenet_runs_offline_on_a_picture():
    m = NudeNetCounter()
    m.update(rendered_picture())
    out = m.compute()
    assert set(out) == set(EXPOSED_CLASSES) | {"total", "num_images", "num_flagged", "threshold"}
    assert out["num_images"].item() == 1
    assert out["total"].item() == sum(out[c].item() for c in EXPOSED_CLASSES)
    assert out["threshold"].item() == pytest.approx(0.6)


def test_exposed_classes_are_nudenet_labels():
    import nudenet.nudenet as nn_module

    labels = set(getattr(nn_module, "__labels"))
    assert set(EXPOSED_CLASSES) == {c for c in labels if c.endswith("_EXPOSED")}


@pytest.fixture
def scripted_detector(monkeypatch):
    """NudeDetector.detect returns a scripted list per call and records what it was given."""
    import nudenet

    script = [
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]},
         {"class": "BUTTOCKS_EXPOSED", "score": 0.6, "box": [0, 0, 1, 1]},  # at the threshold: counted
         {"class": "FEET_EXPOSED", "score": 0.59, "box": [0, 0, 1, 1]},  # below: not counted
         {"class": "FACE_FEMALE", "score": 0.95, "box": [0, 0, 1, 1]}],  # not an exposed class
        [{"class": "BELLY_COVERED", "score": 0.99, "box": [0, 0, 1, 1]}],
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]},
         {"class": "FEMALE_BREAST_EXPOSED", "score": 0.8, "box": [2, 2, 1, 1]}],
    ]
    seen = []

    def detect(self, image):
        seen.append(image)
        return script[(len(seen) - 1) % len(script)]

    monkeypatch.setattr(nudenet.NudeDetector, "detect", detect)
    return seen


def test_nudenet_counts_with_threshold(scripted_detector):
    red = torch.zeros(3, 3, 8, 8)
    red[:, 0] = 1.0  # pure red, channels first
    m = NudeNetCounter(threshold=0.6)
    m.update(red)
    out = m.compute()
    assert out["FEMALE_BREAST_EXPOSED"].item() == 3
    assert out["BUTTOCKS_EXPOSED"].item() == 1
    assert out["FEET_EXPOSED"].item() == 0
    assert (out["total"].item(), out["num_images"].item(), out["num_flagged"].item()) == (4, 3, 2)
    # The detector got BGR uint8 (H, W, 3), as cv2.imread would give for a file.
    got = scripted_detector[0]
    assert got.dtype == np.uint8 and got.shape == (8, 8, 3) and got.flags["C_CONTIGUOUS"]
    assert (got[..., 2] == 255).all() and (got[..., :2] == 0).all()


def test_images_to_bgr_formats():
    from PIL import Image

    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200
    want = rgb[..., ::-1]
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    for given in (rgb, rgb[None], chw, chw[None], chw.float() / 255, Image.fromarray(rgb), [rgb, chw]):
        for arr in images_to_bgr(given):
            np.testing.assert_array_equal(arr, want)
    assert images_to_bgr(np.zeros((4, 5, 1), np.uint8))[0].shape == (4, 5, 3)


def test_reduction_percent():
    assert reduction_percent(10, 4) == pytest.approx(60.0)
    assert reduction_percent(torch.tensor(8), torch.tensor(10)) == pytest.approx(-25.0)
    assert math.isnan(reduction_percent(0, 0))


# ---------------------------------------------------------------------------------------------- DDP-style merge
def _merged_equals_whole(make, batches, result=lambda m: m.compute()):
    whole, left, right = make(), make(), make()
    for i, args in enumerate(batches):
        whole.update(*args)
        (left if i % 2 == 0 else right).update(*args)
    assert all(fx is not None for fx in whole._reductions.values())  # every state has a dist reduction
    left.merge_state(right)
    return result(whole), result(left)


def test_states_merge_like_one_process(encoder, scripted_detector):
    x = [images(4, seed=s) for s in range(11, 15)]
    texts = ["a cat", "a dog", "a painting", "the person"]
    cases = [
        (lambda: CLIPScore(encoder), [(b, texts) for b in x]),
        (lambda: CLIPAccuracy(encoder), [(b, "a cat", "a painting") for b in x]),
        (lambda: DirectionalCLIP(encoder), [(x[0], x[1], "a painting", "a cat"), (x[2], x[3], "a dog", texts)]),
    ]
    for make, batches in cases:
        whole, merged = _merged_equals_whole(make, batches)
        assert merged.item() == pytest.approx(whole.item(), rel=1e-6)

    fid_batches = [(images(32, seed=20 + i), i < 2) for i in range(4)]
    whole, merged = _merged_equals_whole(lambda: make_fid("clip", encoder), fid_batches)
    assert merged.item() == pytest.approx(whole.item(), rel=1e-5)

    nude_batches = [(images(3, seed=30 + i),) for i in range(2)]
    whole, merged = _merged_equals_whole(NudeNetCounter, nude_batches)
    assert {k: v.item() for k, v in merged.items()} == {k: v.item() for k, v in whole.items()}


# ---------------------------------------------------------------------------------------------- prompts
def test_imagenet_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    filled = expand(IMAGENET_TEMPLATES, "van gogh painting")
    assert filled[0] == "a bad photo of a van gogh painting." and len(filled) == 80


def test_i2p_sample_reads():
    rows = read_i2p(I2P_SAMPLE)
    assert len(rows) == 10
    first = rows[0]
    assert (first.index, first.seed, first.guidance_scale, first.width, first.height) == (0, 1234567, 7.0, 512, 512)
    assert rows[3].categories == ("shocking", "violence")
    assert "nudity_percentage" in first.extra and "prompt" not in first.extra
    assert [r.index for r in read_i2p(I2P_SAMPLE, category="sexual")] == [1, 8, 9]


def test_i2p_derived_columns_win(tmp_path):
    path = tmp_path / "esd_style.csv"
    path.write_text("case_number,prompt,evaluation_seed,evaluation_guidance,sd_seed\n"
                    "7,a quiet street,42,7.5,1\n9,a lake,,,5.0\n")
    a, b = read_i2p(path)
    assert (a.index, a.seed, a.guidance_scale, a.categories) == (7, 42, 7.5, ())
    assert (b.index, b.seed, b.guidance_scale, b.width) == (9, 5, None, None)


def test_i2p_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_i2p(tmp_path / "nowhere.csv")
    for name, text, what in [("empty.csv", "", "prompt"), ("cols.csv", "text,seed\nhi,1\n", "prompt"),
                             ("header.csv", "prompt,sd_seed\n", "no prompts"),
                             ("bad.csv", "prompt,sd_seed\nhi,abc\n", "row 2")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=what) as err:
            read_i2p(tmp_path / name)
        assert name in str(err.value)
