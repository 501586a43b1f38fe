"""Toy world v2: the v1 world's pictures, near neighbours of its concepts, and scenes of two objects.

New concepts are drawn close to old ones, so keeping a neighbour is not free: the arc is a ring open at the bottom,
the kite a diamond whose crossbar sits high, bars are wide vertical stripes, grid thin white lines where checker has
blocks. A scene of one object of a v1 shape and style is drawn exactly as `world.render` draws it (same random
draws, same pixels); two objects share the image, one per half, each with its own style (a night or frame style
darkens or borders its half only). Captions come from `language.describe`; staged beside v1 until weights exist.
"""

from __future__ import annotations

import numpy as np

from unlearn.toy import world
from unlearn.toy.language import (
    COLOURS,
    DEFAULT_STYLE,
    MAX_TOKENS,
    NEAR,
    SHAPES,
    STYLES,
    Object,
    Scene,
    agrees,
    describe,
    fits,
    meaning_of,
    vocabulary,
)

__all__ = ["COLOURS", "DEFAULT_STYLE", "IMAGE_SIZE", "MAX_TOKENS", "NEAR", "SHAPES", "STYLES", "Object", "Scene",
           "all_scenes", "caption_matches", "describe", "fits", "meaning_of", "render", "sample_batch", "vocabulary"]

IMAGE_SIZE = world.IMAGE_SIZE
ARC_GAP = 2 * np.pi / 3  # the arc is the ring less 120 degrees at the bottom
GRID_PERIOD = 5  # one white line every 5 px, each way: 36 % white where checker has 50 %
HALF_RADIUS = (0.18, 0.22)  # of the image size, for an object in a half (one object alone: v1's 0.30-0.38)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    if shape not in ("arc", "kite"):
        return world._shape_mask(shape, cx, cy, r, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "arc":
        angle = np.arctan2(dy, dx)  # image y grows downwards: +pi/2 points to the bottom
        return world._shape_mask("ring", cx, cy, r, size) & (np.abs(angle - np.pi / 2) > ARC_GAP / 2)
    bar, top, bottom, half = cy - 0.35 * r, cy - 0.95 * r, cy + 1.25 * r, 0.9 * r  # kite: crossbar high
    upper = (y <= bar) & (np.abs(dx) / half + (bar - y) / (bar - top) <= 1)
    lower = (y > bar) & (np.abs(dx) / half + (y - bar) / (bottom - bar) <= 1)
    return upper | lower


def style_fill(style: str, rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Where the object shows its colour (elsewhere white); v1's stripes and checker, drawn as v1 draws them."""
    if style == "stripes":
        return ((y + int(rng.integers(0, 4))) // 2) % 2 == 0
    if style == "checker":
        ox, oy = rng.integers(0, 8, size=2)
        return (((x + ox) // 4) + ((y + oy) // 4)) % 2 == 0
    if style == "bars":
        return ((x + int(rng.integers(0, 8))) // 4) % 2 == 0
    if style == "grid":
        ox, oy = rng.integers(0, GRID_PERIOD, size=2)
        return ((x + ox) % GRID_PERIOD != 0) & ((y + oy) % GRID_PERIOD != 0)
    return np.ones(y.shape, bool)


def _check(o: Object) -> None:
    if o.shape not in SHAPES:
        raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")
    if o.style not in STYLES:
        raise ValueError(f"unknown style {o.style!r}; known: {STYLES}")
    if o.colour not in COLOURS:
        raise ValueError(f"unknown colour {o.colour!r}; known: {COLOURS}")


def _draw(img: np.ndarray, o: Object, rng: np.random.Generator, x0: int, x1: int, alone: bool) -> None:
    size = img.shape[0]
    if alone:  # v1's draws, in v1's order
        c = size / 2 + rng.uniform(-2, 2, size=2)
        r = size * rng.uniform(0.30, 0.38)
    else:
        c = np.array([(x0 + x1) / 2, size / 2]) + rng.uniform(-1, 1, size=2)
        r = size * rng.uniform(*HALF_RADIUS)
    y, x = np.mgrid[0:size, 0:size]
    inside = (x >= x0) & (x < x1)
    mask = shape_mask(o.shape, c[0], c[1], r, size) & inside
    img[:, x0:x1] = np.array(world.NIGHT_BACKGROUND if o.style == "night" else world.BACKGROUND, np.float32)
    fg = np.array(world.COLOURS[o.colour], np.float32) + rng.normal(0, 8, size=3)
    fill = style_fill(o.style, rng, y, x)
    img[mask & fill] = fg
    img[mask & ~fill] = 255.0
    if o.style == "frame":
        b = 3 if alone else 2
        img[:b, x0:x1], img[-b:, x0:x1], img[:, x0:x0 + b], img[:, x1 - b:x1] = 20.0, 20.0, 20.0, 20.0


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One uint8 HxWx3 image of `scene`; positions, sizes and small colour jitter come from `rng`."""
    for o in scene.objects:
        _check(o)
    img = np.empty((size, size, 3), np.float32)
    alone = scene.right is None
    regions = [(0, size)] if alone else [(0, size // 2), (size // 2, size)]
    for o, (x0, x1) in zip(scene.objects, regions):
        _draw(img, o, rng, x0, x1, alone)
    img += rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def random_object(rng: np.random.Generator) -> Object:
    return Object(SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))],
                  STYLES[rng.integers(len(STYLES))])


def all_scenes() -> list[Scene]:
    """Every one-object scene (shape x colour x style)."""
    return [Scene(Object(s, c, st)) for s in SHAPES for c in COLOURS for st in STYLES]


def sample_batch(n: int, rng: np.random.Generator, two_objects: float = 0.3,
                 colour_dropout: float = 0.2) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n random scenes (two objects with probability `two_objects`): images (n,H,W,3 uint8), captions, scenes."""
    scenes = []
    for _ in range(n):
        left = random_object(rng)
        scenes.append(Scene(left, random_object(rng)) if rng.random() < two_objects else Scene(left))
    images = np.stack([render(s, rng) for s in scenes])
    captions = [describe(s, rng, colour_dropout) for s in scenes]
    return images, captions, scenes


def caption_matches(scenes: list[Scene], captions: list[str]) -> list[list[bool]]:
    """M[i][j] = caption j describes scene i (each caption parsed once)."""
    meant = [meaning_of(c) for c in captions]
    return [[agrees(m, s) for m in meant] for s in scenes]
