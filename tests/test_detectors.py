"""Detectors: settings validation, the CA rule of the CLIP detector, NudeNet's class/threshold filter, the HF hook."""

from __future__ import annotations

import math

import pytest
import torch

from unlearn.data.concepts import load_concept
from unlearn.metrics.detectors import (
    ClipDetector,
    HFClassifierDetector,
    NudeNetDetector,
    check_threshold,
    make_detector,
)


class StubEncoder:
    """Image features given per test; text features from a fixed table (unit vectors)."""

    source = "stub"

    def __init__(self, image_feats, table):
        self.image_feats, self.table = image_feats, table

    def image_features(self, images):
        return self.image_feats

    def text_features(self, texts):
        return torch.stack([self.table[t] for t in texts])


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, "high"])
def test_threshold_outside_unit_interval_is_refused_with_its_value(bad):
    with pytest.raises(ValueError, match=r"detector\.threshold=.*(outside \[0, 1\]|not a number)") as err:
        check_threshold(bad)
    assert repr(bad) in str(err.value)


def test_threshold_bounds_are_accepted():
    assert check_threshold(0) == 0.0 and check_threshold(1) == 1.0


def test_make_detector_checks_threshold_before_building_anything():
    # name=clip never uses the threshold, but a bad value is still refused (and no CLIP is loaded: encoder=None).
    with pytest.raises(ValueError, match="detector.threshold=2"):
        make_detector({"name": "clip", "threshold": 2}, load_concept("toy_stripes"))
    with pytest.raises(ValueError, match="detector.name='yolo'"):
        make_detector({"name": "yolo"}, load_concept("toy_stripes"))


def test_clip_detector_is_the_ca_rule():
    e1, e2 = torch.eye(2)
    imgs = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]), dim=-1)
    det = ClipDetector(encoder=StubEncoder(imgs, {"target": e1, "anchor": e2}))
    # Hand computation: cos to target = x[0], to anchor = x[1]; strictly greater counts, so the tie is False.
    assert det(torch.zeros(3, 3, 4, 4), "target", "anchor").tolist() == [True, False, False]
    assert det.settings["detector"] == "clip" and det.settings["clip"] == "stub"


def test_auto_picks_nudenet_for_nudity_and_clip_otherwise():
    enc = StubEncoder(None, {})
    assert make_detector({"name": "auto"}, load_concept("nudity")).name == "nudenet"
    assert make_detector({"name": "auto"}, load_concept("toy_ring"), encoder=enc).name == "clip"


def test_nudenet_detector_settings_and_a_blank_image():
    with pytest.raises(ValueError, match="unknown.*FACE_FEMALE"):
        NudeNetDetector(classes=["FACE_FEMALE"])
    det = NudeNetDetector(threshold=0.3, classes=["BELLY_EXPOSED"])
    assert det.settings["threshold"] == 0.3 and det.settings["classes"] == ["BELLY_EXPOSED"]
    assert det(torch.full((1, 3, 64, 64), 0.5)).tolist() == [False]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=16, num_labels=3, id2label={0: "plain", 1: "stripes", 2: "checker"},
                    label2id={"plain": 0, "stripes": 1, "checker": 2})
    path = tmp_path_factory.mktemp("clf")
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def test_hf_detector_unknown_label_names_the_labels(tiny_classifier):
    with pytest.raises(ValueError, match=r"detector.label='van gogh'.*\['checker', 'plain', 'stripes'\]"):
        HFClassifierDetector(tiny_classifier, "van gogh")
    with pytest.raises(ValueError, match="detector.path"):
        make_detector({"name": "hf", "label": "x"}, load_concept("toy_ring"))


def test_hf_detector_flags_images_whose_top_class_is_the_label(tiny_classifier):
    from transformers import ViTForImageClassification

    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = ViTForImageClassification.from_pretrained(tiny_classifier).eval()
    # Independent path: quantise to uint8 as the detector does, normalise with ViT's defaults (mean = std = 0.5).
    x = (images * 255).round() / 255
    with torch.no_grad():
        top = model(pixel_values=(x - 0.5) / 0.5).logits.argmax(-1)
    for label, idx in (("plain", 0), ("stripes", 1)):
        det = HFClassifierDetector(tiny_classifier, label)
        assert det(images).tolist() == (top == idx).tolist()
        assert det.settings == {"detector": "hf", "path": str(tiny_classifier), "label": label, "top_k": 1}
    assert HFClassifierDetector(tiny_classifier, "plain", top_k=3)(images).all()
