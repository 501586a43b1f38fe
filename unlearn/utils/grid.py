"""Image grids without torchvision: a tensor grid, and a labelled PNG readable even for 32-pixel images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from unlearn.utils.files import atomic_path

MIN_CELL = 128  # saved cells are upscaled (nearest) to at least this many pixels, so toy images stay legible


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> (3, rows*(H+p)+p, nrow*(W+p)+p), `nrow` images per row, row-major."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B,3,H,W), got shape {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, c, h, w = images.shape
    nrow = max(1, min(nrow, b))
    rows = math.ceil(b / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(b):
        r, k = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, labels: list[str] | None = None,
              min_cell: int = MIN_CELL) -> Path:
    """Write a PNG grid. `labels`: one per image (caption under each cell) or one per row (at its left)."""
    from PIL import Image, ImageDraw, ImageFont

    b, _, h, w = images.shape
    nrow = max(1, min(nrow, b))
    rows = math.ceil(b / nrow)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    if scale > 1:
        images = torch.nn.functional.interpolate(images.detach().float().cpu(), scale_factor=scale,
                                                 mode="nearest")
    pad = 2 * scale if scale > 1 else 2
    grid = make_grid(images, nrow=nrow, padding=pad)
    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if labels:
        labels = [str(s) for s in labels]
        if len(labels) not in (b, rows):
            raise ValueError(f"got {len(labels)} labels for {b} images in {rows} rows: "
                             "give one per image or one per row")
        font = ImageFont.load_default()
        line = 12
        cell_w, cell_h = w * scale + pad, h * scale + pad
        if len(labels) == b and nrow > 1:  # one caption per image, under it
            chars = max(4, cell_w // 6)
            wrapped = [_wrap(s, chars) for s in labels]
            lines = max(len(x) for x in wrapped)
            band = lines * line + 4
            canvas = Image.new("RGB", (img.width, img.height + rows * band), "white")
            draw = ImageDraw.Draw(canvas)
            for r in range(rows):
                row = img.crop((0, r * cell_h, img.width, (r + 1) * cell_h + pad))
                canvas.paste(row, (0, r * (cell_h + band)))
            for i, text in enumerate(wrapped):
                r, k = divmod(i, nrow)
                y0 = r * (cell_h + band) + cell_h + pad
                for j, t in enumerate(text):
                    draw.text((pad + k * cell_w, y0 + j * line), t, fill="black", font=font)
        else:  # one label per row, on its left
            margin = min(240, max(6 * len(s) for s in labels) + 8)
            canvas = Image.new("RGB", (img.width + margin, img.height), "white")
            canvas.paste(img, (margin, 0))
            draw = ImageDraw.Draw(canvas)
            for r, text in enumerate(labels):
                y = pad + r * cell_h + (h * scale) // 2 - line // 2
                draw.text((4, y), text[: margin // 6], fill="black", font=font)
        img = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    return path


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for word in words:
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + [cur] if cur else lines or [""]
