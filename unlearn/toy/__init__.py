"""The built-in toy world: procedural images with captions, and a tiny Stable Diffusion + CLIP trained on it."""
