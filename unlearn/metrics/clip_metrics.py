"""CLIP-based erasure metrics as torchmetrics `Metric`s (sum states, so they reduce under DDP).

All three take one shared `ClipEncoder`, so a suite of metrics loads CLIP once. Images are (B, 3, H, W) float in
[0, 1] (uint8 also accepted). Text arguments are a list with one string per image, or a single string for all.

- `CLIPScore`: mean image-prompt agreement. `convention="clipscore"` is Hessel et al.'s CLIP-S,
  w * max(cos, 0) per image with w = 2.5, averaged, reported x100; `convention="torchmetrics"` is what
  torchmetrics' own CLIPScore computes: max(mean(100 * cos), 0), the clamp applied once, after averaging.
- `CLIPAccuracy`: share of images closer to the target text than to the anchor text (Concept Ablation's
  binary CLIP accuracy; after erasure, lower is better on target prompts and higher on anchors).
- `CLIPTopOne`: share of images closer to their own text than to every rival text (a zero-shot classifier over
  the concept's classes, as ESD reads erasure with a classifier: an image that shows neither the target nor the
  anchor, which the binary accuracy may still call the target, counts as erased here).
- `DirectionalCLIP`: mean cos(E_I(after) - E_I(before), E_T(anchor) - E_T(target)) over image pairs made
  with the same prompt and seed: does the edit move images the way the text says it should?
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from unlearn.metrics.clip_model import ClipEncoder

CLIPSCORE_WEIGHTS = {"clipscore": 2.5, "torchmetrics": 1.0}


def broadcast_texts(texts: str | Sequence[str], n: int, name: str) -> list[str]:
    if isinstance(texts, str):
        return [texts] * n
    texts = list(texts)
    if len(texts) != n:
        raise ValueError(f"{name}: expected one string or {n} strings (one per image), got {len(texts)}")
    return texts


class _ClipMetric(Metric):
    is_differentiable = False
    full_state_update = False

    def __init__(self, encoder: ClipEncoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.add_state("value_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, values: Tensor) -> None:
        self.value_sum += values.sum().to(self.value_sum)
        self.count += values.numel()

    def compute(self) -> Tensor:
        return (self.value_sum / self.count).float()


class CLIPScore(_ClipMetric):
    higher_is_better = True

    def __init__(self, encoder: ClipEncoder, convention: str = "clipscore", **kwargs):
        if convention not in CLIPSCORE_WEIGHTS:
            raise ValueError(f"convention must be one of {sorted(CLIPSCORE_WEIGHTS)}, got {convention!r}")
        super().__init__(encoder, **kwargs)
        self.convention = convention
        self.weight = CLIPSCORE_WEIGHTS[convention]

    def update(self, images: Tensor, prompts: str | Sequence[str]) -> None:
        img = self.encoder.image_features(images)
        txt = self.encoder.text_features(broadcast_texts(prompts, img.shape[0], "prompts"))
        cos = (img * txt).sum(-1)
        # Hessel clamps each image's cosine; torchmetrics sums raw cosines and clamps the mean (in compute).
        self._accumulate(100.0 * self.weight * (cos.clamp(min=0) if self.convention == "clipscore" else cos))

    def compute(self) -> Tensor:
        return super().compute().clamp(min=0)


class CLIPAccuracy(_ClipMetric):
    higher_is_better = None  # depends on whether the images should show the target (retained) or not (erased)

    def update(self, images: Tensor, target_texts: str | Sequence[str], anchor_texts: str | Sequence[str]) -> None:
        img = self.encoder.image_features(images)
        n = img.shape[0]
        target = self.encoder.text_features(broadcast_texts(target_texts, n, "target_texts"))
        anchor = self.encoder.text_features(broadcast_texts(anchor_texts, n, "anchor_texts"))
        # Strictly greater: a tie does not count as showing the target.
        self._accumulate(((img * target).sum(-1) > (img * anchor).sum(-1)).double())


class CLIPTopOne(_ClipMetric):
    higher_is_better = None  # as CLIPAccuracy: lower on target prompts after erasure, higher on neighbours

    def update(self, images: Tensor, texts: str | Sequence[str], rivals: Sequence[Sequence[str]]) -> None:
        """rivals[i]: image i's competing captions (any number, at least one); ties do not count as its own."""
        img = self.encoder.image_features(images)
        n = img.shape[0]
        own = self.encoder.text_features(broadcast_texts(texts, n, "texts"))
        if len(rivals) != n or not all(len(r) for r in rivals):
            raise ValueError(f"rivals: expected a non-empty list of captions per image ({n}), got {len(rivals)}")
        flat = self.encoder.text_features([c for r in rivals for c in r])
        scores = (flat * img.repeat_interleave(torch.tensor([len(r) for r in rivals], device=img.device), 0)).sum(-1)
        best = torch.stack([s.max() for s in scores.split([len(r) for r in rivals])])
        self._accumulate(((img * own).sum(-1) > best).double())


class DirectionalCLIP(_ClipMetric):
    higher_is_better = True

    def update(self, images_before: Tensor, images_after: Tensor,
               anchor_texts: str | Sequence[str], target_texts: str | Sequence[str]) -> None:
        if images_before.shape[0] != images_after.shape[0]:
            raise ValueError(f"before/after batches differ in size: {images_before.shape[0]} vs "
                             f"{images_after.shape[0]}")
        before = self.encoder.image_features(images_before)
        after = self.encoder.image_features(images_after)
        n = before.shape[0]
        anchor = self.encoder.text_features(broadcast_texts(anchor_texts, n, "anchor_texts"))
        target = self.encoder.text_features(broadcast_texts(target_texts, n, "target_texts"))
        self._accumulate(F.cosine_similarity(after - before, anchor - target, dim=-1))
