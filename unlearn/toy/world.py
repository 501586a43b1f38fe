"""Procedural image-caption world.

Images are 32x32 RGB: one large, roughly centred shape of one colour, rendered in one style. Captions read
"a red ring in the style of stripes"; the default style ("plain") has no suffix, so "a red ring" is the anchor of
every style concept, as "painting" is the anchor of artist styles. Instance concepts come in close pairs
(ring ~ circle, diamond ~ square), as Snoopy ~ dog; the other shapes and styles are their neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "ring", "square", "diamond", "triangle", "cross")
STYLES = ("plain", "stripes", "checker", "night", "frame")
DEFAULT_STYLE = "plain"
BACKGROUND = (235, 235, 230)
NIGHT_BACKGROUND = (25, 25, 40)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    style: str = DEFAULT_STYLE

    def caption(self, with_colour: bool = True) -> str:
        noun = f"{self.colour} {self.shape}" if with_colour else self.shape
        text = f"a {noun}"
        if self.style != DEFAULT_STYLE:
            text += f" in the style of {self.style}"
        return text


def all_scenes() -> list[Scene]:
    return [Scene(s, c, st) for s in SHAPES for c in COLOURS for st in STYLES]


def vocabulary() -> list[str]:
    """Every word a toy caption can contain (the tokenizer gives each one token)."""
    words = ["a", "in", "the", "style", "of", *COLOURS, *SHAPES, *STYLES]
    return list(dict.fromkeys(words))


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        s = 0.85 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":
        # apex up; base at cy + 0.8r
        top, base = cy - r, cy + 0.8 * r
        half = (y - top) / (base - top) * r
        return (y >= top) & (y <= base) & (np.abs(dx) <= half)
    if shape == "cross":
        arm, w = r, 0.38 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= w) & (np.abs(dx) <= arm))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One uint8 HxWx3 image of `scene`; position, size and small colour jitter come from `rng`."""
    if scene.style not in STYLES:
        raise ValueError(f"unknown style {scene.style!r}; known: {STYLES}")
    if scene.colour not in COLOURS:
        raise ValueError(f"unknown colour {scene.colour!r}; known: {tuple(COLOURS)}")
    c = size / 2 + rng.uniform(-2, 2, size=2)
    r = size * rng.uniform(0.30, 0.38)
    mask = _shape_mask(scene.shape, c[0], c[1], r, size)
    bg = np.array(NIGHT_BACKGROUND if scene.style == "night" else BACKGROUND, np.float32)
    fg = np.array(COLOURS[scene.colour], np.float32) + rng.normal(0, 8, size=3)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    y, x = np.mgrid[0:size, 0:size]
    fill = np.ones((size, size), bool)
    if scene.style == "stripes":
        fill = ((y + int(rng.integers(0, 4))) // 2) % 2 == 0
    elif scene.style == "checker":
        ox, oy = rng.integers(0, 8, size=2)
        fill = (((x + ox) // 4) + ((y + oy) // 4)) % 2 == 0
    img[mask & fill] = fg
    img[mask & ~fill] = 255.0
    if scene.style == "frame":
        b = 3
        img[:b], img[-b:], img[:, :b], img[:, -b:] = 20.0, 20.0, 20.0, 20.0
    img += rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_batch(
    n: int, rng: np.random.Generator, colour_dropout: float = 0.2
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n random scenes: images (n,H,W,3 uint8), captions (colour left out with probability `colour_dropout`)."""
    scenes = [
        Scene(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
              STYLES[rng.integers(len(STYLES))])
        for _ in range(n)
    ]
    images = np.stack([render(s, rng) for s in scenes])
    captions = [s.caption(with_colour=rng.random() >= colour_dropout) for s in scenes]
    return images, captions, scenes
