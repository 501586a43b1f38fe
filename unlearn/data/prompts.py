"""Anchor prompt sets: shipped text files for real anchors, enumerated captions for the toy world.

Real sets (`unlearn/data/prompts/<name>.txt`, 200 prompts each) would ideally come from clip-retrieval or an
LLM, as in Concept Ablation; neither is reachable offline, so they are written by the *deterministic*
generator below (subjects x scenes x modifiers, picked with a fixed stride: no randomness) and shipped.
Regenerate them with

    python -m unlearn.data.prompts            # rewrites unlearn/data/prompts/*.txt
    python -m unlearn.data.prompts --check    # exit 1 if the shipped files differ from the generator

Every prompt of an instance set (dog, mouse, cat, robot, sponge) and of `clothed_person` contains its anchor
word as a whole word, so `derive.replace` keeps all of them; a few contain it twice ("a dog playing with
another dog").

Spec strings accepted by `load_prompt_set`:
- `<name>`: `unlearn/data/prompts/<name>.txt` (one prompt a line; blank lines and `#` comments are skipped);
- a path to a `.txt` file;
- `toy:plain`: every plain-style toy caption (with and without colour), e.g. "a red circle", "a circle";
- `toy:<word>`: every toy caption, in every style, that contains <word> as a word (`toy:circle`, `toy:red`,
  `toy:stripes`). Toy captions are enumerated colour-major (red, green, blue, yellow, no colour) -> style ->
  shape, so the first few prompts already span the shapes/styles; every set is cycled (repeated from its
  start) up to the requested count;
- `toy2:<word>`: the same for the v2 world (`unlearn/toy/language.py`): its plainest one-object captions
  (`language.canonical`), in every v2 shape and style, that contain <word>.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import warnings
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
SET_SIZE = 200
GOLDEN = (5 ** 0.5 - 1) / 2  # stride fraction of the generator (see _stride)
TOY_PREFIX = "toy:"
TOY2_PREFIX = "toy2:"


class PromptSetError(ValueError):
    """A prompt set that cannot be used (missing, unreadable or empty file, unknown toy word); names it."""


# ------------------------------------------------------------------------------------------------ loading
def load_prompt_set(spec: str, n: int | None = SET_SIZE, prompt_dir: str | Path = PROMPT_DIR) -> list[str]:
    """The first `n` prompts of the set named by `spec` (cycled if the set is shorter; None: all of it)."""
    if n is not None and n < 1:
        raise ValueError(f"prompt count must be >= 1, got {n}")
    spec = str(spec)
    if spec.startswith(TOY_PREFIX):
        prompts = toy_prompts(spec[len(TOY_PREFIX):])
    elif spec.startswith(TOY2_PREFIX):
        prompts = toy_prompts(spec[len(TOY2_PREFIX):], world=2)
    else:
        path = _resolve_file(spec, Path(prompt_dir))
        prompts = read_prompt_file(path)
        if n is not None and len(prompts) < n:
            warnings.warn(f"prompt file {path} has {len(prompts)} prompts, fewer than the {n} asked for: "
                          f"they are repeated in order", stacklevel=2)
    return cycle_to(prompts, n)


def _resolve_file(spec: str, prompt_dir: Path) -> Path:
    if spec.endswith(".txt") or "/" in spec or "\\" in spec:
        return Path(spec).expanduser()
    path = prompt_dir / f"{spec}.txt"
    if not path.exists():
        known = sorted(p.stem for p in prompt_dir.glob("*.txt"))
        raise PromptSetError(f"no prompt file {path} for prompt set {spec!r}; known sets: {', '.join(known)} "
                             f"(or toy:<word>, or a path to a .txt file)")
    return path


def read_prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptSetError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptSetError(f"cannot read prompt file {path}: {type(e).__name__}: {e}") from e
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise PromptSetError(f"prompt file {path} is empty (no prompt lines)")
    return prompts


def cycle_to(prompts: list[str], n: int | None) -> list[str]:
    if n is None:
        return list(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


def toy_prompts(word: str, world: int = 1) -> list[str]:
    """Toy captions for `toy:<word>` (`toy2:<word>`: world 2) in the fixed enumeration order (module docstring)."""
    if world == 1:
        from unlearn.toy import world as w

        def caption(shape, colour, style):
            return w.Scene(shape, colour or next(iter(w.COLOURS)), style).caption(with_colour=colour is not None)
    else:
        from unlearn.toy import language as w

        def caption(shape, colour, style):
            return w.canonical(w.Scene(w.Object(shape, colour, style)))
    captions = [(style, caption(shape, colour, style))
                for colour in (*w.COLOURS, None) for style in w.STYLES for shape in w.SHAPES]
    if word == w.DEFAULT_STYLE:
        return [c for style, c in captions if style == w.DEFAULT_STYLE]
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")
    found = [c for _, c in captions if pattern.search(c)]
    if not found or not word:
        words = ", ".join((*w.SHAPES, *w.COLOURS, *w.STYLES))
        prefix = TOY_PREFIX if world == 1 else TOY2_PREFIX
        raise PromptSetError(f"no toy caption contains {word!r} (prompt set {prefix}{word}); "
                             f"use a shape, colour or style: {words}")
    return found


# ------------------------------------------------------------------------------------------------ generator
def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[:1] in "aeiou" else "a ") + noun_phrase


# Shared endings: photographic and drawn renderings, so the anchor set covers the looks a target can take.
MODIFIERS = ("", ", high quality photo", ", close-up", ", watercolor illustration", ", cartoon drawing",
             ", at sunset")

# name -> anchor word, subject noun phrases, scenes, endings, and prompts with the anchor word twice
CLASSES: dict[str, dict] = {
    "painting": {
        "word": "painting",
        "subjects": [f"{lead} of {x}" for lead in ("a painting", "an oil painting") for x in (
            "a lighthouse on a cliff", "a village street", "a bowl of fruit", "a woman reading a letter",
            "an old man with a pipe", "a field of wheat", "boats in a harbour", "a vase of flowers",
            "a city at night", "a mountain lake", "a farmhouse in winter", "a horse in a meadow",
            "a bridge over a river", "a cafe terrace", "a cathedral", "children playing on a beach",
            "a sunflower field", "a portrait of a young girl", "a still life with bottles", "a ship at sea",
            "a windmill", "a garden with a pond", "a street market", "a dancer on a stage")],
        "scenes": ["", " at dawn", " in the rain", " under a cloudy sky", " on a summer afternoon",
                   " by moonlight"],
        "endings": ("",),
        "twice": ["a painting of a painter working on a painting",
                  "a painting of a visitor looking at a painting in a museum"],
    },
    "dog": {
        "word": "dog",
        "subjects": [_a(f"{a}dog") for a in ("", "happy ", "sleepy ", "small ", "big ", "fluffy ", "old ",
                                             "young ", "wet ", "curious ", "playful ", "loyal ", "spotted ")],
        "scenes": [" running on a beach", " sleeping on a sofa", " playing in the snow",
                   " sitting in a garden", " chasing a ball in a park", " lying by the fireplace",
                   " swimming in a lake", " walking in a forest", " looking out of a car window",
                   " waiting at the front door", " resting under a tree", " eating a hotdog at a picnic"],
        "endings": MODIFIERS,
        "twice": ["a dog playing with another dog in a park", "a big dog and a small dog sleeping together",
                  "a dog looking at a dog in a mirror", "a dog sharing a hotdog with another dog"],
    },
    "mouse": {  # the animal: the scenes keep "mouse" from meaning the computer kind
        "word": "mouse",
        "subjects": [_a(f"{a}mouse") for a in ("", "small ", "grey ", "white ", "brown ", "tiny ", "curious ",
                                               "cute ", "hungry ", "sleepy ", "field ", "young ")],
        "scenes": [" eating a piece of cheese", " hiding in a wall", " running across a kitchen floor",
                   " sitting in a teacup", " climbing a stalk of wheat", " peeking out of a hole",
                   " sleeping in a nest of straw", " standing on its hind legs", " in a vegetable garden",
                   " near a barn", " on a bookshelf", " in the snow"],
        "endings": MODIFIERS,
        "twice": ["a mouse sharing a piece of cheese with another mouse",
                  "a mouse chasing a mouse through a barn", "a big mouse and a little mouse on a windowsill"],
    },
    "cat": {
        "word": "cat",
        "subjects": [_a(f"{a}cat") for a in ("", "fluffy ", "black ", "white ", "ginger ", "tabby ",
                                             "sleepy ", "curious ", "old ", "young ", "grey ", "siamese ")],
        "scenes": [" sleeping on a windowsill", " playing with a ball of yarn", " sitting on a sofa",
                   " looking out of a window", " lying in the sun", " hiding in a cardboard box",
                   " walking on a fence", " drinking milk from a bowl", " sitting in a garden",
                   " curled up on a bed", " on a bookshelf", " stretching on a rug"],
        "endings": MODIFIERS,
        "twice": ["a cat watching another cat from a windowsill",
                  "a black cat and a white cat sitting together", "a cat grooming a cat on the sofa"],
    },
    "robot": {
        "word": "robot",
        "subjects": [_a(f"{a}robot") for a in ("", "small ", "tall ", "old ", "rusty ", "shiny ", "friendly ",
                                               "white ", "blue ", "toy ", "futuristic ", "round ")],
        "scenes": [" standing in a workshop", " walking down a city street", " in a spaceship corridor",
                   " rolling across a desert", " sitting on a bench", " in a science museum",
                   " carrying a box", " in a laboratory", " on a factory floor", " in a garden",
                   " on the surface of Mars", " in a living room"],
        "endings": MODIFIERS,
        "twice": ["a robot repairing another robot", "a small robot and a tall robot talking",
                  "a robot playing chess against a robot"],
    },
    "sponge": {  # real sponges (sea and kitchen), no cartoon faces: no SpongeBob leaks into the anchor images
        "word": "sponge",
        "subjects": [_a(f"{a}sponge") for a in ("", "yellow ", "pink ", "soft ", "wet ", "natural ", "round ",
                                                "large ", "small ", "dry ", "orange ", "square ")],
        "scenes": [" on the ocean floor", " on a coral reef", " on a kitchen counter", " next to a bathtub",
                   " in a bucket of soapy water", " on a rock underwater", " among seaweed",
                   " on a white background", " in a sink", " floating in the sea", " in a tide pool",
                   " on a wooden table"],
        "endings": MODIFIERS,
        "twice": ["a sponge next to another sponge on a shelf",
                  "a yellow sponge and a pink sponge on a counter"],
    },
    "clothed_person": {
        "word": "clothed",
        "subjects": [f"a clothed {p}" for p in ("woman", "man", "young woman", "young man", "old woman",
                                                "old man", "person", "dancer", "model", "athlete", "couple",
                                                "swimmer")],
        "scenes": [" standing on a beach", " sitting on a sofa", " walking in a park",
                   " posing in a photo studio", " relaxing by a pool", " lying on the grass",
                   " sitting on a bed", " standing by a window", " in a sauna", " at a lake", " in a bedroom",
                   " under a waterfall"],
        "endings": ("", ", full body photo", ", portrait", ", oil painting", ", charcoal drawing",
                    ", renaissance painting"),
        "twice": ["a clothed woman standing next to a clothed man on a beach",
                  "a clothed painter drawing a clothed model in a studio"],
    },
}


def _stride(total: int) -> int:
    """A step coprime to `total` near total / golden ratio: successive picks land far apart in the product
    (every factor changes from one prompt to the next) and never repeat before `total` picks."""
    step = round(total * GOLDEN)
    while math.gcd(step, total) != 1:
        step += 1
    return step


def generate_prompt_set(name: str, size: int = SET_SIZE) -> list[str]:
    """`size` distinct prompts for class `name`: the `twice` prompts spread evenly, the rest picked with a
    fixed golden-ratio stride from subjects x scenes x endings (a deterministic walk, no random numbers)."""
    spec = CLASSES[name]
    parts = itertools.product(spec["subjects"], spec["scenes"], spec["endings"])
    combos = [f"{s}{sc}{e}" for s, sc, e in parts]
    twice = list(spec["twice"])
    n_single = size - len(twice)
    if len(combos) < n_single:
        raise ValueError(f"class {name!r}: only {len(combos)} combinations for {n_single} prompts")
    step = _stride(len(combos))
    singles = [combos[(i * step) % len(combos)] for i in range(n_single)]
    every = size // (len(twice) + 1)
    out = []
    for i, p in enumerate(singles):
        out.append(p)
        if twice and (i + 1) % every == 0:
            out.append(twice.pop(0))
    out.extend(twice)
    assert len(out) == size and len(set(out)) == size, name
    return out


def generate_prompt_sets(size: int = SET_SIZE) -> dict[str, list[str]]:
    return {name: generate_prompt_set(name, size) for name in CLASSES}


def write_prompt_sets(folder: str | Path = PROMPT_DIR, size: int = SET_SIZE) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, prompts in generate_prompt_sets(size).items():
        path = folder / f"{name}.txt"
        path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PROMPT_DIR)
    p.add_argument("--check", action="store_true", help="compare the files in --out with the generator")
    a = p.parse_args(argv)
    if a.check:
        stale = [n for n, ps in generate_prompt_sets().items()
                 if not (a.out / f"{n}.txt").exists() or read_prompt_file(a.out / f"{n}.txt") != ps]
        if stale:
            raise SystemExit(f"out of date in {a.out}: {', '.join(stale)}")
        print(f"{len(CLASSES)} prompt sets in {a.out} match the generator")
        return
    for path in write_prompt_sets(a.out):
        print(path)


if __name__ == "__main__":
    main()
