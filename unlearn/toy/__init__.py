"""The built-in toy world: procedural images with captions, and a tiny Stable Diffusion + CLIP trained on it.

Two worlds ship: `toy` (v1, `world.py`: 20 words) and `toy2` (v2, `world2.py` + `language.py`: synonyms, near
neighbours, two-object scenes, 394 words). A model path or CLIP of one of these names is its shipped folder.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILT_IN = {"toy": HERE / "weights", "toy2": HERE / "weights_v2"}  # name -> folder with pipeline/ and clip/


def built_in(name) -> Path | None:
    """The shipped folder of a built-in model name, else None."""
    return BUILT_IN.get(str(name))
