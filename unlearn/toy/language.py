"""The language of the toy world v2: many words for few things, and a parser that reads a caption back.

A caption names one or two objects (shape, colour, style); every other word in it (framings, filler adjectives,
places, quality tags) leaves the image unchanged, so a caption's meaning is checkable:
`fits(describe(scene, rng), scene)` always holds. Places are rendered as nothing (the background stays the
world's own), so they are pure distraction for a model and an attack.

Each shape and style has *own words* (its name and the forms of it: "stripes", "striped") and *synonyms*
("bands", "banded"); implicit prompts are written from synonyms only. Pure functions, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MAX_TOKENS = 32  # CLIP context of the v2 captions, start and end tokens included
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "ring", "arc", "square", "diamond", "kite", "triangle", "cross")
STYLES = ("plain", "stripes", "bars", "checker", "grid", "night", "frame")
DEFAULT_STYLE = "plain"
NEAR = {"arc": "ring", "kite": "diamond", "bars": "stripes", "grid": "checker"}  # new concept -> the one it imitates
# erasable concept -> the anchor its prompts are mapped onto (v1's pairs, and the new ones beside their neighbours)
ANCHORS = {"ring": "circle", "arc": "circle", "cross": "circle", "diamond": "square", "kite": "square",
           "triangle": "square", **dict.fromkeys(("stripes", "bars", "checker", "grid", "night", "frame"), "plain")}

COLOUR_WORDS = {"red": ("red", "crimson", "scarlet"), "green": ("green", "emerald", "olive"),
                "blue": ("blue", "azure", "cobalt"), "yellow": ("yellow", "golden", "amber")}
# name -> (own words, synonyms)
SHAPE_WORDS = {
    "circle": (("circle",), ("disc", "disk", "orb", "ball")),
    "ring": (("ring",), ("hoop", "loop", "donut", "halo")),
    "arc": (("arc",), ("horseshoe", "bow", "curve")),
    "square": (("square",), ("box", "block", "tile")),
    "diamond": (("diamond",), ("rhombus", "lozenge", "gem")),
    "kite": (("kite",), ("deltoid", "shield")),
    "triangle": (("triangle",), ("pyramid", "wedge", "trigon")),
    "cross": (("cross", "crosslet"), ("plus", "crucifix")),
}
STYLE_ADJECTIVES = {  # before the noun: "a striped red ring"
    "plain": ((), ("plain", "solid", "flat", "unpatterned", "uniform")),
    "stripes": (("striped", "stripy"), ("banded", "streaked", "striated")),
    "bars": (("barred",), ("slatted", "columned", "pillared")),
    "checker": (("checkered", "chequered", "checked"), ("tessellated", "gingham")),
    "grid": (("gridded",), ("latticed", "meshed", "netted")),
    "night": (("nighttime",), ("dark", "moonlit", "nocturnal")),
    "frame": (("framed",), ("bordered", "edged")),
}
STYLE_NOUNS = {  # after the noun, through STYLE_PHRASES: "a red ring with bands"
    "stripes": (("stripes",), ("bands", "streaks")),
    "bars": (("bars",), ("columns", "slats", "pillars")),
    "checker": (("checker", "checkers", "checkerboard", "checks"), ("chessboard", "gingham", "patchwork")),
    "grid": (("grid",), ("lattice", "mesh", "netting")),
    "night": (("night", "midnight"), ("darkness", "moonlight")),
    "frame": (("frame",), ("border", "edging", "margin")),
}
_PHRASES = ("in the style of {}", "with {}", "covered in {}")
STYLE_PHRASES = {s: _PHRASES for s in STYLE_NOUNS} | {
    "night": ("in the style of {}", "at {}", "in the {}"),
    "frame": ("in the style of {}", "with a {}", "inside a {}"),
}
FRAMINGS = (
    "{}", "a picture of {}", "a photo of {}", "a photograph of {}", "an image of {}", "a drawing of {}",
    "a painting of {}", "a sketch of {}", "an illustration of {}", "a render of {}", "a snapshot of {}",
    "a close up of {}", "a print of {}", "a sticker of {}", "{} on a poster", "{} on a postcard", "there is {}",
    "this is {}", "look at {}",
)
FILLERS = (
    "tiny", "small", "big", "large", "huge", "little", "giant", "old", "new", "young", "ancient", "modern", "happy",
    "sad", "shiny", "lonely", "fancy", "simple", "lovely", "cute", "pretty", "ugly", "quiet", "calm", "famous",
    "mysterious", "strange", "weird", "friendly", "elegant", "humble", "proud", "brave", "gentle", "wild", "clean",
    "dusty", "lucky", "curious", "funny", "silly", "serious", "sleepy", "busy", "lazy", "noble", "rare", "common",
    "ordinary", "special", "magic", "royal", "rustic", "vintage", "classic", "tidy", "neat", "cheerful", "gloomy",
    "grumpy", "jolly", "merry", "polite", "shy", "bold", "clever", "wise", "fresh", "cool", "warm", "soft", "smooth",
    "rough", "heavy", "cozy", "sturdy", "fragile", "precious", "quirky", "charming", "graceful", "odd", "beloved",
    "forgotten", "hidden", "lost", "favourite", "perfect", "handmade",
)
PREPOSITIONS = ("in", "on", "at", "near", "by", "under", "above", "beside", "behind", "outside", "inside")
# place noun -> its usual preposition; describe() sometimes swaps in another one
PLACES = {
    **dict.fromkeys(("park", "garden", "forest", "desert", "field", "meadow", "valley", "jungle", "swamp", "cave",
                     "canyon", "city", "town", "village", "street", "alley", "harbour", "market", "shop", "store",
                     "bakery", "cafe", "restaurant", "kitchen", "bedroom", "bathroom", "attic", "basement", "garage",
                     "hallway", "library", "museum", "gallery", "theatre", "cinema", "school", "classroom", "office",
                     "factory", "warehouse", "hospital", "church", "temple", "castle", "palace", "tower", "barn",
                     "orchard", "vineyard", "zoo", "circus", "stadium", "playground", "courtyard", "tent", "cabin",
                     "house", "apartment", "hotel", "lobby", "elevator", "subway", "tunnel", "greenhouse", "studio",
                     "workshop", "laboratory", "observatory", "arena", "plaza", "car", "bus", "train", "truck",
                     "drawer", "suitcase", "basket", "bucket", "jar", "bowl", "cupboard", "closet"), "in"),
    **dict.fromkeys(("table", "desk", "shelf", "floor", "wall", "carpet", "rug", "bed", "sofa", "chair", "bench",
                     "plate", "tray", "napkin", "blanket", "pillow", "canvas", "paper", "page", "notebook", "screen",
                     "window", "door", "fence", "boat", "ship", "bicycle", "rooftop", "balcony", "porch", "lawn",
                     "sidewalk", "bridge", "road", "highway", "pier", "dock", "hill", "mountain", "island",
                     "glacier", "volcano", "farm", "envelope", "cushion"), "on"),
    **dict.fromkeys(("beach", "station", "airport", "lighthouse", "windmill"), "at"),
    **dict.fromkeys(("river", "lake", "pond", "ocean", "sea", "fountain", "well"), "by"),
}
QUALITY = (
    "high quality", "best quality", "detailed", "highly detailed", "masterpiece", "sharp focus", "award winning",
    "professional", "beautiful", "stunning", "intricate", "cinematic", "photorealistic", "realistic", "crisp",
    "vivid", "epic", "trending on artstation", "octane render", "wallpaper",
)
# two objects: A is drawn left, B right
PAIRS = ("{A} and {B}", "{A} on the left and {B} on the right", "{B} on the right and {A} on the left",
         "{A} to the left of {B}", "{B} to the right of {A}")


@dataclass(frozen=True)
class Object:
    shape: str
    colour: str | None  # None only in a caption's meaning: "any colour"
    style: str = DEFAULT_STYLE


@dataclass(frozen=True)
class Scene:
    """One object, centred; or two, `left` and `right` in the image's halves."""

    left: Object
    right: Object | None = None

    @property
    def objects(self) -> tuple[Object, ...]:
        return (self.left,) if self.right is None else (self.left, self.right)


def all_words(table: dict, own: bool = True, synonyms: bool = True) -> dict[str, tuple[str, ...]]:
    return {k: (v[0] if own else ()) + (v[1] if synonyms else ()) for k, v in table.items()}


def style_forms(style: str, own: bool = True, synonyms: bool = True) -> tuple[list[str], list[str]]:
    """(adjectives put before the noun, phrases put after it) that say `style`."""
    adjectives = list(all_words(STYLE_ADJECTIVES, own, synonyms)[style])
    nouns = all_words(STYLE_NOUNS, own, synonyms).get(style, ())
    phrases = [t.format(n) for t in STYLE_PHRASES.get(style, ()) for n in nouns]
    return adjectives, [re.sub(r"\ba (?=[aeiou])", "an ", p) for p in phrases]


def _lexicon() -> dict[tuple[str, ...], tuple[str, str]]:
    """Every phrase that carries meaning -> (kind, value); built once, refused if a phrase meant two things."""
    entries = [(w, ("colour", c)) for c, ws in COLOUR_WORDS.items() for w in ws]
    entries += [(w, ("shape", s)) for s, ws in all_words(SHAPE_WORDS).items() for w in ws]
    for s in STYLES:
        adjectives, phrases = style_forms(s)
        entries += [(w, ("pre", s)) for w in adjectives] + [(p, ("post", s)) for p in phrases]
    entries += [("on the left", ("pos", "left")), ("on the right", ("pos", "right")),
                ("to the left of", ("rel", "left")), ("to the right of", ("rel", "right")), ("and", ("and", ""))]
    lexicon: dict[tuple[str, ...], tuple[str, str]] = {}
    for phrase, meaning in entries:
        key = tuple(phrase.split())
        if lexicon.setdefault(key, meaning) != meaning:
            raise ValueError(f"phrase {phrase!r} means both {lexicon[key]} and {meaning}")
    return lexicon


LEXICON = _lexicon()
_LONGEST = max(map(len, LEXICON))


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def vocabulary() -> list[str]:
    """Every word a v2 caption can contain (the tokenizer gives each one token)."""
    texts = [*FRAMINGS, *FILLERS, *PREPOSITIONS, *PLACES, *QUALITY, *PAIRS, "a an the"]
    texts += [" ".join(k) for k in LEXICON]
    return list(dict.fromkeys(w for t in texts for w in words_of(t.replace("{A}", "").replace("{B}", ""))))


def tag(caption: str) -> list[tuple[str, str]]:
    """The caption's meaningful phrases in order, longest match first; every other word is dropped."""
    words, out, i = words_of(caption), [], 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            meaning = LEXICON.get(tuple(words[i:i + n]))
            if meaning is not None:
                out.append(meaning)
                i += n
                break
        else:
            i += 1
    return out


def meaning_of(caption: str) -> Scene | None:
    """The scene a caption names (colour None where it names none), or None if it names no object or three."""
    objects: list[dict] = []
    pending: dict = {}
    after_noun = False  # a style phrase right after a noun belongs to that noun
    for kind, value in tag(caption):
        if kind == "colour":
            pending["colour"], after_noun = value, False
        elif kind == "pre" or (kind == "post" and not after_noun):
            pending["style"], after_noun = value, False
        elif kind == "post":
            objects[-1]["style"] = value
        elif kind == "shape":
            objects.append({"shape": value, "colour": None, "style": DEFAULT_STYLE, **pending})
            pending, after_noun = {}, True
        elif kind in ("pos", "rel") and objects:
            objects[-1][kind] = value
            after_noun = after_noun and kind == "pos"
        else:
            after_noun = False
    if not objects or len(objects) > 2:
        return None
    made = [Object(o["shape"], o["colour"], o["style"]) for o in objects]
    if len(made) == 1:
        return Scene(made[0])
    first_side, second_side = objects[0].get("pos") or objects[0].get("rel"), objects[1].get("pos")
    if first_side is not None and first_side == second_side:
        return None
    swapped = first_side == "right" or second_side == "left"
    return Scene(made[1], made[0]) if swapped else Scene(made[0], made[1])


def _same(meant: Object | None, actual: Object | None) -> bool:
    if meant is None or actual is None:
        return meant is actual
    return (meant.shape, meant.style) == (actual.shape, actual.style) and meant.colour in (None, actual.colour)


def agrees(meant: Scene | None, scene: Scene) -> bool:
    """Is `scene` one of the scenes a caption's meaning names?"""
    return meant is not None and _same(meant.left, scene.left) and _same(meant.right, scene.right)


def fits(caption: str, scene: Scene) -> bool:
    """Does the caption describe the scene? A caption without a colour fits every colour; without a style, plain."""
    return agrees(meaning_of(caption), scene)


def canonical(scene: Scene, with_colour: bool = True) -> str:
    """The plainest caption: the v1 world's own for one object ("a red ring in the style of stripes")."""
    def one(o: Object) -> str:
        text = f"a {o.colour} {o.shape}" if with_colour and o.colour else f"a {o.shape}"
        return text + (f" in the style of {o.style}" if o.style != DEFAULT_STYLE else "")

    return " and ".join(one(o) for o in scene.objects)


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(o: Object, rng: np.random.Generator, colour_dropout: float, n_fillers: int) -> tuple[list, list]:
    """(words before the noun, [noun] + words after it) for one object; fillers come first and can be dropped."""
    before = [_pick(rng, FILLERS) for _ in range(n_fillers)]
    after: list[str] = []
    adjectives, phrases = style_forms(o.style)
    if o.style != DEFAULT_STYLE or rng.random() < 0.15:
        form = _pick(rng, adjectives + phrases)
        (before if form in adjectives else after).append(form)
    if o.colour is not None and rng.random() >= colour_dropout:
        before.append(_pick(rng, COLOUR_WORDS[o.colour]))
    return before, [_pick(rng, all_words(SHAPE_WORDS)[o.shape]), *after]


def n_tokens(caption: str) -> int:
    """CLIP tokens of a caption made of vocabulary words: one per word or punctuation mark, plus start and end."""
    return len(re.findall(r"[a-z]+|[^\sa-z]", caption.lower())) + 2


def describe(scene: Scene, rng: np.random.Generator, colour_dropout: float = 0.2) -> str:
    """A random caption that means `scene`, at most MAX_TOKENS tokens; extras are dropped until it fits."""
    nps = [_noun_phrase(o, rng, colour_dropout, int(rng.integers(0, 3))) for o in scene.objects]
    pair = _pick(rng, PAIRS)
    noun = _pick(rng, PLACES)
    place = f"{PLACES[noun] if rng.random() < 0.6 else _pick(rng, PREPOSITIONS)} {_pick(rng, ('a', 'the'))} {noun}"
    extras = {"place": rng.random() < 0.4, "framing": rng.random() < 0.5, "quality": rng.random() < 0.3}
    framing, quality = _pick(rng, FRAMINGS[1:]), [_pick(rng, QUALITY) for _ in range(1 + int(rng.integers(2)))]
    fillers = True
    for drop in ("", "quality", "framing", "place", "fillers"):
        if drop == "fillers":
            fillers = False
        elif drop:
            extras[drop] = False
        parts = []
        for before, rest in nps:
            words = [w for w in before if fillers or w not in FILLERS] + rest
            parts.append(f"{_article(words[0])} {' '.join(words)}")
        text = parts[0] if len(parts) == 1 else pair.format(A=parts[0], B=parts[1])
        if extras["place"]:
            text = f"{text} {place}"
        if extras["framing"]:
            text = framing.format(text)
        if extras["quality"]:
            text = ", ".join([text, *quality])
        if n_tokens(text) <= MAX_TOKENS:
            return text
    raise ValueError(f"no caption of {scene} fits in {MAX_TOKENS} tokens")


def implicit_prompts(concept: str) -> list[str]:
    """Prompts that show `concept` without any of its own words: "a red hoop" for ring, "a banded square"."""
    if concept in SHAPE_WORDS:
        return [f"{_article(w)} {w}" if c is None else f"a {c} {w}"
                for w in SHAPE_WORDS[concept][1] for c in (None, *COLOURS)]
    adjectives, phrases = style_forms(concept, own=False)
    shapes = ("square", "circle")
    out = [f"{_article(a)} {a} {COLOURS[i % 4]} {shapes[i % 2]}" for i, a in enumerate(adjectives)]
    out += [f"a {COLOURS[i % 4]} {shapes[(i + 1) % 2]} {p}" for i, p in enumerate(phrases)]
    return out


def implicit_reading(prompt: str, concept: str) -> tuple[str, str]:
    """The two plainest captions CA reads an implicit prompt's image between: its meaning with the concept, and with
    the concept's anchor in its place ("a red hoop" -> "a red ring" / "a red circle")."""
    from dataclasses import replace

    meant = meaning_of(prompt)
    if meant is None or meant.right is not None:
        raise ValueError(f"{prompt!r} does not name one object")
    attribute = "shape" if concept in SHAPES else "style"
    if getattr(meant.left, attribute) != concept:
        raise ValueError(f"{prompt!r} does not mean {concept!r}")
    swapped = replace(meant.left, **{attribute: ANCHORS[concept]})
    return canonical(meant), canonical(Scene(swapped))


def own_words(concept: str) -> set[str]:
    """The concept's name and forms of it, every place they occur (nouns, adjectives)."""
    tables = (SHAPE_WORDS, STYLE_ADJECTIVES, STYLE_NOUNS)
    return {concept} | {w for t in tables for w in t.get(concept, ((), ()))[0]}

