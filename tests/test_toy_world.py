"""The built-in toy world: its renderer, tokenizer, a short rebuild, and the shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn.models.loading import TOY_PIPELINE
from unlearn.toy import world

shipped = pytest.mark.skipif(not (TOY_PIPELINE / "unet").exists(), reason="toy weights not built")


def test_render_is_deterministic_and_styles_differ():
    a = world.render(world.Scene("ring", "red", "stripes"), np.random.default_rng(1))
    b = world.render(world.Scene("ring", "red", "stripes"), np.random.default_rng(1))
    c = world.render(world.Scene("ring", "red", "night"), np.random.default_rng(1))
    assert a.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert c.mean() < a.mean() - 50  # night is dark


def test_captions_and_bad_scene():
    assert world.Scene("ring", "red", "stripes").caption() == "a red ring in the style of stripes"
    assert world.Scene("circle", "blue").caption(with_colour=False) == "a circle"
    with pytest.raises(ValueError, match="sepia"):
        world.render(world.Scene("ring", "red", "sepia"), np.random.default_rng(0))


def test_tokenizer_gives_every_world_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from unlearn.toy.tokenizer import write_tokenizer_files

    tok = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_path, world.vocabulary()), model_max_length=16)
    for w in world.vocabulary():
        assert tok.tokenize(w) == [w + "</w>"], w
    assert len(tok("a hotdog").input_ids) > 4  # unknown words still tokenize, byte by byte


def test_quick_rebuild_runs_and_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    from unlearn.metrics.clip_model import ClipEncoder
    from unlearn.toy.build import QUICK, Budget, build

    budget = Budget(**{**QUICK.__dict__, "clip_steps": 3, "vae_steps": 3, "unet_steps": 3, "bank": 64})
    out = build(tmp_path / "toy", budget, seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    img = pipe("a red ring", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert ClipEncoder.from_pretrained(out / "clip").text_features(["a red ring"]).shape[0] == 1


@shipped
def test_shipped_pipeline_samples_and_follows_the_prompt():
    from unlearn.metrics.clip_model import ClipEncoder
    from unlearn.models import generate, load_components
    from unlearn.toy.build import WEIGHTS
    from unlearn.toy.check import zero_shot

    comps = load_components("toy")
    scenes = [world.Scene(s, "red", st) for s in ("ring", "square") for st in ("plain", "stripes", "night")]
    images = generate(comps, [s.caption() for s in scenes], list(range(len(scenes))))
    enc = ClipEncoder.from_pretrained(WEIGHTS / "clip")
    assert zero_shot(enc, images, "shape") == [s.shape for s in scenes]
    assert zero_shot(enc, images, "style") == [s.style for s in scenes]


@shipped
def test_shipped_clip_reads_clean_images():
    from unlearn.metrics.clip_model import ClipEncoder
    from unlearn.toy.build import WEIGHTS
    from unlearn.toy.check import zero_shot

    images, _, scenes = world.sample_batch(60, np.random.default_rng(7))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    enc = ClipEncoder.from_pretrained(WEIGHTS / "clip")
    for attr in ("shape", "style"):
        acc = np.mean([p == getattr(s, attr) for p, s in zip(zero_shot(enc, x, attr), scenes)])
        assert acc >= 0.9, (attr, acc)
