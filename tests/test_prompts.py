"""Prompt sets and concept configs: every config loads, its prompt set is full, it derives pairs."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from unlearn.data.concepts import CONF_DIR, ConceptError, known_concepts, load_concept
from unlearn.data.derive import word_pattern
from unlearn.data.prompts import (
    CLASSES,
    PROMPT_DIR,
    PromptSetError,
    generate_prompt_sets,
    load_prompt_set,
    read_prompt_file,
    toy_prompts,
)
from unlearn.toy import world

CONCEPTS = known_concepts()
REAL = ["van_gogh", "picasso", "rembrandt", "andy_warhol", "caravaggio", "snoopy", "mickey", "spongebob",
        "pikachu", "grumpy_cat", "r2d2", "nudity"]
TOY = ["toy_stripes", "toy_checker", "toy_night", "toy_frame", "toy_ring", "toy_diamond", "toy_triangle",
       "toy_cross"]


def test_all_concepts_are_configured():
    assert set(REAL + TOY) <= set(CONCEPTS)


@pytest.mark.parametrize("name", CONCEPTS)
def test_concept_loads_with_full_prompt_set_and_pairs(name):
    c = load_concept(name)
    assert c.name == name
    prompts = c.prompts(200)
    assert len(prompts) == 200
    pairs = c.pairs(200)
    assert len(pairs) >= 1 and all(a != t for a, t in pairs)
    for n in c.neighbours:
        assert (CONF_DIR / f"{n}.yaml").exists(), f"{name}: neighbour {n} has no config"
    assert name not in c.neighbours
    assert [x.name for x in c.neighbour_concepts()] == c.neighbours
    if c.derive["mode"] == "replace":  # the eval templates fill in `anchor`: it must hold the word too
        assert word_pattern(c.derive["word"]).search(c.anchor), name
        assert len(pairs) == 200, f"{name}: shipped prompts without the word {c.derive['word']!r}"


def test_concept_from_dictconfig_matches_name():
    cfg = OmegaConf.load(CONF_DIR / "snoopy.yaml")
    assert load_concept(cfg) == load_concept("snoopy")
    assert load_concept(cfg).pairs(3)[0] == ("a dog running on a beach", "a Snoopy running on a beach")


def test_unknown_concept_lists_known_ones():
    with pytest.raises(ConceptError, match="unknown concept 'nope'.*van_gogh"):
        load_concept("nope")


def test_malformed_concept_is_named():
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "snoopy.yaml"))
    raw["colour"] = "red"
    with pytest.raises(ConceptError, match="unknown keys \\['colour'\\]"):
        load_concept(raw)


def test_classes_are_optional_words_and_give_the_top1_rivals():
    from unlearn.data.concepts import rival_captions

    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "snoopy.yaml"))
    assert "classes" not in raw and load_concept(raw).classes == []
    for bad in ("ring", ["ring", ""], [1]):
        with pytest.raises(ConceptError, match="classes must be a list"):
            load_concept({**raw, "classes": bad})
    ring = load_concept("toy_ring")
    assert ring.classes == ["circle", "ring", "square", "diamond", "triangle", "cross"]
    # the anchor first, then each class swapped in for the whole word only; the prompt itself left out
    assert rival_captions("a red circle", "a red ring", "ring", ring.classes) == [
        "a red circle", "a red square", "a red diamond", "a red triangle", "a red cross"]
    assert rival_captions("a plain ring", "a ring of rings", "ring", ["cross"]) == ["a plain ring", "a cross of rings"]
    style = load_concept("toy_stripes")
    anchor, target = style.pairs(1)[0]
    assert rival_captions(anchor, target, "stripes", style.classes) == [
        anchor, *(f"{anchor} in the style of {s}" for s in ("checker", "night", "frame"))]


@pytest.mark.parametrize("name", ["dog", "mouse", "cat", "robot", "sponge", "clothed_person"])
def test_instance_sets_hold_the_anchor_word_in_every_prompt(name):
    prompts = load_prompt_set(name)
    pattern = word_pattern(CLASSES[name]["word"])
    assert len(prompts) == 200 == len(set(prompts))
    assert all(pattern.search(p) for p in prompts)
    assert sum(len(pattern.findall(p)) == 2 for p in prompts) >= 2  # "a dog playing with another dog"


def test_shipped_files_match_the_generator():
    for name, prompts in generate_prompt_sets().items():
        assert read_prompt_file(PROMPT_DIR / f"{name}.txt") == prompts, name


def test_toy_sets():
    plain = toy_prompts("plain")
    assert len(plain) == len(world.SHAPES) * (len(world.COLOURS) + 1)
    assert plain[:2] == ["a red circle", "a red ring"] and "a circle" in plain
    assert not any("style" in p for p in plain)
    circle = toy_prompts("circle")
    assert len(circle) == len(world.STYLES) * (len(world.COLOURS) + 1)
    assert circle[:2] == ["a red circle", "a red circle in the style of stripes"]
    assert all("circle" in p for p in circle)
    cycled = load_prompt_set("toy:plain", 70)
    assert cycled[:30] == plain and cycled[30:60] == plain and cycled[60:] == plain[:10]


def test_unknown_toy_word_raises():
    with pytest.raises(PromptSetError, match="toy:hexagon"):
        load_prompt_set("toy:hexagon")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PromptSetError, match="nosuchset.txt"):
        load_prompt_set("nosuchset")
    with pytest.raises(PromptSetError, match=re.escape(str(tmp_path / "gone.txt"))):
        load_prompt_set(str(tmp_path / "gone.txt"))


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n# only a comment\n   \n")
    with pytest.raises(PromptSetError, match=re.escape(f"{path} is empty")):
        load_prompt_set(str(path))


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(PromptSetError, match=re.escape(str(path))):
        load_prompt_set(str(path))


def test_own_prompt_file_with_tricky_words(tmp_path):
    path = tmp_path / "dogs.txt"
    path.write_text("a dog and a hotdog\nthe dogma of a dog\na doghouse\n")
    assert load_prompt_set(str(path), None) == ["a dog and a hotdog", "the dogma of a dog", "a doghouse"]
    with pytest.warns(UserWarning, match="fewer than the 5"):
        assert len(load_prompt_set(str(path), 5)) == 5
