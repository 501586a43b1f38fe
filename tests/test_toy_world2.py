"""The staged toy world v2: its language (describe / meaning_of), implicit prompts, renderer, and v1 left as it was.

Fast: no model is loaded, and the one model trained is a one-step CLIP.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from unlearn.toy import language as lang
from unlearn.toy import world, world2
from unlearn.toy.language import Object, Scene

ROOT = Path(__file__).resolve().parent.parent


def random_scenes(n: int, seed: int = 0, two_objects: float = 0.5) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [Scene(world2.random_object(rng), world2.random_object(rng) if rng.random() < two_objects else None)
            for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from unlearn.toy.tokenizer import write_tokenizer_files

    folder = write_tokenizer_files(tmp_path_factory.mktemp("tok2"), lang.vocabulary())
    return CLIPTokenizer.from_pretrained(folder, model_max_length=lang.MAX_TOKENS)


def test_vocabulary_is_large_and_every_word_is_one_token(tokenizer):
    words = lang.vocabulary()
    assert len(words) >= 300 and len(set(words)) == len(words)
    assert [w for w in words if tokenizer.tokenize(w) != [w + "</w>"]] == []
    assert set(world.vocabulary()) <= set(words)  # v2 speaks v1's language too


def test_describe_reads_back_to_its_scene():
    rng = np.random.default_rng(1)
    for scene in random_scenes(1500):
        exact = lang.describe(scene, rng, colour_dropout=0.0)
        assert lang.meaning_of(exact) == scene, exact
        loose = lang.describe(scene, rng)  # colours sometimes left out: then any colour fits
        assert lang.fits(loose, scene), loose


def test_captions_use_only_vocabulary_and_fit_in_max_tokens(tokenizer):
    rng = np.random.default_rng(2)
    captions = [lang.describe(s, rng) for s in random_scenes(1500, seed=2, two_objects=0.8)]
    vocab = set(lang.vocabulary())
    assert {w for c in captions for w in lang.words_of(c)} <= vocab
    lengths = [len(tokenizer(c).input_ids) for c in captions]
    assert max(lengths) <= lang.MAX_TOKENS == 32
    assert lengths == [lang.n_tokens(c) for c in captions]
    assert len(set(captions)) > 0.95 * len(captions)  # a real space of prompts, not a handful


def test_synonyms_framings_fillers_and_places_keep_the_meaning():
    ring = Scene(Object("ring", "red"))
    for caption in ("a red hoop", "a photo of a tiny crimson loop in a park, high quality", "a scarlet donut on a table",
                    "look at an ancient red halo beside the river, trending on artstation"):
        assert lang.meaning_of(caption) == ring, caption
    stripes = Scene(Object("square", "blue", "stripes"))
    for caption in ("a banded blue square", "a blue box with bands", "a cobalt tile covered in streaks",
                    "a blue square in the style of stripes", "a striped azure block"):
        assert lang.meaning_of(caption) == stripes, caption
    assert lang.meaning_of("a hoop") == Scene(Object("ring", None))
    meaning_words = {k[0] for k in lang.LEXICON if len(k) == 1}
    extras = [*lang.FILLERS, *lang.PLACES, *lang.PREPOSITIONS, *(w for t in (*lang.FRAMINGS, *lang.QUALITY)
                                                                  for w in lang.words_of(t))]
    assert meaning_words.isdisjoint(extras)


def test_two_object_phrasings_place_each_object_on_its_side():
    want = Scene(Object("ring", "red"), Object("square", "blue"))
    for caption in ("a red ring and a blue square", "a red ring on the left and a blue square on the right",
                    "a blue square on the right and a red ring on the left", "a red ring to the left of a blue square",
                    "a blue square to the right of a red ring", "a picture of a red hoop and a blue box in a garden"):
        assert lang.meaning_of(caption) == want, caption
    assert lang.meaning_of("a striped red ring and a blue square at night") == Scene(
        Object("ring", "red", "stripes"), Object("square", "blue", "night"))
    assert lang.meaning_of("a red ring on the left and a blue square on the left") is None
    assert lang.meaning_of("a ring and a square and a cross") is None
    assert lang.meaning_of("a photo of a park") is None
    assert not lang.fits("a red ring", want) and not lang.fits("a blue square and a red ring", want)


def test_canonical_captions_are_v1_captions():
    for s in world.all_scenes():
        scene = Scene(Object(s.shape, s.colour, s.style))
        assert lang.canonical(scene) == s.caption()
        assert lang.canonical(scene, with_colour=False) == s.caption(with_colour=False)
        assert lang.meaning_of(s.caption()) == scene


@pytest.mark.parametrize("concept", list(lang.ANCHORS))
def test_implicit_prompts_never_name_the_concept_and_read_back_to_it(concept):
    prompts = lang.implicit_prompts(concept)
    assert len(prompts) >= 9
    attribute = "shape" if concept in lang.SHAPES else "style"
    for p in prompts:
        words = lang.words_of(p)
        assert not lang.own_words(concept) & set(words) and not any(concept in w for w in words), p
        meant = lang.meaning_of(p)
        assert meant is not None and meant.right is None and getattr(meant.left, attribute) == concept, p


def test_toy2_concepts_hold_the_implicit_prompts_and_their_readings():
    configs = sorted((ROOT / "conf" / "concept").glob("toy2_*.yaml"))
    assert [d.stem for d in configs] == sorted(f"toy2_{c}" for c in lang.ANCHORS)
    for d in configs:
        cfg = yaml.safe_load(d.read_text())
        target, anchor = cfg["target"], cfg["anchor"]
        assert anchor == lang.ANCHORS[target] and cfg["kind"] == ("style" if target in lang.STYLES else "instance")
        assert [e["prompt"] for e in cfg["implicit_prompts"]] == lang.implicit_prompts(target)
        for e in cfg["implicit_prompts"]:  # the target caption names the concept, the anchor caption its anchor
            t, a = e["ca"]
            assert lang.meaning_of(t).left == lang.meaning_of(e["prompt"]).left, e
            assert getattr(lang.meaning_of(a).left, "shape" if target in lang.SHAPES else "style") == anchor, e
        near = {**lang.NEAR, **{v: k for k, v in lang.NEAR.items()}}
        assert target not in near or f"toy2_{near[target]}" in cfg["neighbours"]


def test_check_word_prompts_mean_their_class():
    from unlearn.toy.check2 import word_prompts

    prompts = word_prompts(2)
    for attribute, cls, _, prompt in prompts:
        assert getattr(lang.meaning_of(prompt).left, attribute) == cls, prompt
    assert {w for _, _, w, _ in prompts} >= set(lang.all_words(lang.SHAPE_WORDS)["ring"])


@pytest.mark.parametrize("scene", [Scene(Object(s, "red")) for s in lang.NEAR if s in lang.SHAPES]
                         + [Scene(Object("square", "blue", st)) for st in lang.NEAR if st in lang.STYLES]
                         + [Scene(Object("arc", "green", "grid"), Object("kite", "yellow", "night"))], ids=str)
def test_new_scenes_render_deterministically_and_apart_from_their_near_neighbour(scene):
    a, b = (world2.render(scene, np.random.default_rng(3)) for _ in range(2))
    assert a.shape == (world2.IMAGE_SIZE, world2.IMAGE_SIZE, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    if scene.right is not None:
        return
    o = scene.left
    near = Scene(Object(lang.NEAR.get(o.shape, o.shape), o.colour, lang.NEAR.get(o.style, o.style)))
    c = world2.render(near, np.random.default_rng(3))  # same seed: same place, size and colour
    differ = (np.abs(a.astype(int) - c.astype(int)).max(-1) > 60).sum()
    assert differ >= 40, (scene, near, differ)


def test_near_shapes_overlap_but_are_not_their_neighbours():
    for new, old in (("arc", "ring"), ("kite", "diamond")):
        m_new, m_old = (world2.shape_mask(s, 16.0, 16.0, 11.0, 32) for s in (new, old))
        iou = (m_new & m_old).sum() / (m_new | m_old).sum()
        assert 0.4 < iou < 0.85, (new, iou)  # close, as a neighbour should be, never the same


def test_two_object_styles_stay_in_their_half():
    img = world2.render(Scene(Object("ring", "red", "night"), Object("square", "blue")), np.random.default_rng(0))
    half = world2.IMAGE_SIZE // 2
    assert img[:, :half].mean() < img[:, half:].mean() - 50
    with pytest.raises(ValueError, match="hexagon"):
        world2.render(Scene(Object("ring", "red"), Object("hexagon", "blue")), np.random.default_rng(0))


def test_sampler_gives_images_captions_and_matching_scenes():
    images, captions, scenes = world2.sample_batch(64, np.random.default_rng(4))
    assert images.shape == (64, 32, 32, 3) and len(captions) == len(scenes) == 64
    assert any(s.right is not None for s in scenes) and any(s.right is None for s in scenes)
    match = np.array(world2.caption_matches(scenes, captions))
    assert match.diagonal().all() and match.sum() < 64 * 4


def test_v1_world_is_unchanged():
    assert world.vocabulary() == ["a", "in", "the", "style", "of", "red", "green", "blue", "yellow", "circle", "ring",
                                  "square", "diamond", "triangle", "cross", "plain", "stripes", "checker", "night",
                                  "frame"]
    img = world.render(world.Scene("ring", "red", "stripes"), np.random.default_rng(1))
    assert hashlib.sha256(img.tobytes()).hexdigest() == \
        "6cc4b14a97070165f66227c64c02efaecb2402a0882a0731351ed7d660b83e51"
    captions = "\n".join(s.caption(w) for s in world.all_scenes() for w in (True, False))
    assert hashlib.sha256(captions.encode()).hexdigest() == \
        "19089c660d6c3aef383fdcf416fe04a5b41ca64d98bafd309219f3b4df544434"
    for i, s in enumerate(world.all_scenes()):  # v2 draws every v1 scene exactly as v1 does
        v2 = world2.render(Scene(Object(s.shape, s.colour, s.style)), np.random.default_rng(i))
        assert np.array_equal(v2, world.render(s, np.random.default_rng(i))), s


def test_build_refuses_v2_without_an_out_folder(capsys):
    from unlearn.toy.build import main

    with pytest.raises(SystemExit) as stop:
        main(["--world", "v2"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"--world v2 needs --out (the shipped weights in {ROOT / 'unlearn/toy/weights'} are v1's)"]


def test_clean_check_reads_rendered_images_with_a_one_step_clip(tmp_path):
    from unlearn.toy import build, check2

    tok = build.build_tokenizer(tmp_path, world2)
    build.train_clip(tmp_path, tok, build.Budget(clip_steps=1, clip_batch=8), seed=0, w=world2)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "clip" / name).write_bytes((tmp_path / "tokenizer" / name).read_bytes())
    report = check2.main(["--clean", "--clip", str(tmp_path / "clip"), "--scenes", "224", "--per-word", "1",
                          "--implicit", "1", "--pairs", "8", "--out", str(tmp_path / "check")])
    assert report["images"] == "rendered" and report["n_images"] == 232
    assert set(report["implicit"]) == set(lang.ANCHORS) and len(report["per_word"]) > 100
    assert set(report["near"]) == {f"{a}->{b}" for n, o in lang.NEAR.items() for a, b in ((n, o), (o, n))}
    assert (tmp_path / "check" / "report.json").exists()
    with pytest.raises(SystemExit) as stop:
        check2.main(["--clip", str(tmp_path / "clip")])  # neither a model nor --clean
    assert stop.value.code == 2
