"""Target prompts from anchor prompts: the (anchor, target) pairs every method trains on.

- `suffix`: target = anchor + suffix ("a painting of a bridge" -> "a painting of a bridge, in the style of Van
  Gogh").
- `replace`: every whole-word, case-insensitive occurrence of `word` becomes `replacement` ("a dog chasing
  another dog" -> "a Snoopy chasing another Snoopy"; "hotdog" and "dogma" are untouched). "Whole word" means
  no letter, digit or underscore on either side, so multi-word and punctuated words ("Mickey Mouse", "R2-D2")
  work too. The replacement is inserted as written, except that a capitalised first word keeps its capital
  ("Clothed woman on a beach" -> "Nude woman on a beach"). Anchor prompts without the word are dropped with a
  warning (a target that equals its anchor would teach nothing); if no prompt has it, ValueError names the
  word.

Both modes return a list of (anchor, target) pairs, so anchors and targets stay aligned after any drop.
"""

from __future__ import annotations

import re
import warnings

MODES = ("suffix", "replace")


def word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def replace_word(prompt: str, word: str, replacement: str) -> str:
    """`prompt` with every whole-word occurrence of `word` replaced (see the module docstring for case)."""
    def sub(m: re.Match) -> str:
        if m.start() == 0 and m.group(0)[:1].isupper() and replacement[:1].islower():
            return replacement[:1].upper() + replacement[1:]
        return replacement

    return word_pattern(word).sub(sub, prompt)


def derive_target_prompts(prompts: list[str], mode: str, suffix: str | None = None, word: str | None = None,
                          replacement: str | None = None) -> list[tuple[str, str]]:
    """(anchor, target) pairs for `prompts` under derivation `mode` (suffix | replace)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no anchor prompts to derive target prompts from")
    if mode == "suffix":
        if not suffix:
            raise ValueError("derive mode 'suffix' needs a non-empty `suffix`")
        return [(p, p + suffix) for p in prompts]
    if mode != "replace":
        raise ValueError(f"unknown derive mode {mode!r}; choose one of {MODES}")
    if not word or replacement is None or not str(replacement).strip():
        raise ValueError(f"derive mode 'replace' needs `word` and `replacement` (got word={word!r}, "
                         f"replacement={replacement!r})")
    pattern = word_pattern(word)
    pairs = [(p, replace_word(p, word, replacement)) for p in prompts if pattern.search(p)]
    if not pairs:
        raise ValueError(f"replace word {word!r} occurs as a whole word in none of the {len(prompts)} anchor "
                         f"prompts (first: {prompts[0]!r})")
    dropped = [p for p in prompts if not pattern.search(p)]
    if dropped:
        warnings.warn(f"dropped {len(dropped)} of {len(prompts)} anchor prompts without the word {word!r} "
                      f"(e.g. {dropped[0]!r})", stacklevel=2)
    return pairs
