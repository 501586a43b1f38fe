"""Target-prompt derivation: suffix, whole-word replacement, case, drops and errors."""

from __future__ import annotations

import pytest

from unlearn.data.derive import derive_target_prompts, replace_word


def test_suffix_appends_to_every_prompt():
    pairs = derive_target_prompts(["a painting of a bridge", "a red ring"], "suffix",
                                  suffix=", in the style of X")
    assert pairs == [("a painting of a bridge", "a painting of a bridge, in the style of X"),
                     ("a red ring", "a red ring, in the style of X")]


def test_replace_every_whole_word_occurrence():
    pairs = derive_target_prompts(["a dog chasing another dog", "a dog's bone"], "replace", word="dog",
                                  replacement="Snoopy")
    assert pairs == [("a dog chasing another dog", "a Snoopy chasing another Snoopy"),
                     ("a dog's bone", "a Snoopy's bone")]


@pytest.mark.parametrize("prompt", ["a hotdog on a plate", "dogma and doghouses", "underdog_story", "dog2"])
def test_replace_leaves_the_word_inside_other_words(prompt):
    assert replace_word(prompt, "dog", "Snoopy") == prompt


def test_replace_mixed_prompt_keeps_inner_words():
    pairs = derive_target_prompts(["a dog eating a hotdog"], "replace", word="dog", replacement="Snoopy")
    assert pairs == [("a dog eating a hotdog", "a Snoopy eating a hotdog")]


def test_replace_is_case_insensitive_and_keeps_a_leading_capital():
    assert replace_word("Dog and DOG and dog", "dog", "Snoopy") == "Snoopy and Snoopy and Snoopy"
    assert replace_word("Clothed woman next to a Clothed man", "clothed", "nude") == \
        "Nude woman next to a nude man"
    assert replace_word("a CIRCLE", "circle", "ring") == "a ring"


def test_replace_multi_word_and_punctuated_words():
    assert replace_word("a Mickey Mouse toy", "mickey mouse", "mouse") == "a mouse toy"
    assert replace_word("an R2-D2 droid", "R2-D2", "robot") == "an robot droid"


def test_prompts_without_the_word_are_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="dropped 2 of 3 anchor prompts without the word 'dog'"):
        pairs = derive_target_prompts(["a cat", "a dog", "a hotdog"], "replace", word="dog",
                                      replacement="Snoopy")
    assert pairs == [("a dog", "a Snoopy")]


def test_word_in_no_prompt_raises_naming_it():
    with pytest.raises(ValueError, match="'hexagon'"):
        derive_target_prompts(["a red circle", "a hotdog"], "replace", word="hexagon", replacement="ring")


@pytest.mark.parametrize("kwargs", [{"mode": "suffix"}, {"mode": "replace", "word": "dog"},
                                    {"mode": "replace", "replacement": "x"}, {"mode": "swap", "suffix": "x"}])
def test_incomplete_or_unknown_derivations_raise(kwargs):
    with pytest.raises(ValueError):
        derive_target_prompts(["a dog"], **kwargs)


def test_empty_prompt_list_raises():
    with pytest.raises(ValueError, match="no anchor prompts"):
        derive_target_prompts([], "suffix", suffix="x")
