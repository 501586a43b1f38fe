"""Fréchet distance between image sets, on CLIP features by default (torchmetrics' `FrechetInceptionDistance`).

The toy world and every offline run use CLIP image embeddings, not Inception: Inception needs torch-fidelity (which
pulls torchvision) and a weight download, so it is an opt-in (`feature="inception"`, extra `unlearn[fid]`). Numbers
from the two are not comparable; the metric's `feature_name` attribute says which one produced a value.

CLIP features are L2-normalised by default (unit-sphere embeddings, the space CLIP compares in); pass
`l2_normalize=False` for raw projections. Pass float images in [0, 1] to either feature; the CLIP one also takes uint8.

The metric keeps the real (reference, e.g. original-model) statistics across `reset()` (`reset_real_features=False`),
so one reference pass serves several edited models. FID needs at least 2 images per side, and the covariance is
rank-deficient (and the distance biased and noisy) while a side has fewer images than feature dimensions: use many
more images than `num_features` (768 for CLIP ViT-L/14, 2048 for Inception) before trusting a value.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from unlearn.metrics.clip_model import ClipEncoder


class ClipFeatureExtractor(nn.Module):
    """The `feature=` module for torchmetrics FID: images (uint8 or float in [0, 1]) -> CLIP image embeddings."""

    def __init__(self, encoder: ClipEncoder, l2_normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.l2_normalize = l2_normalize
        # torchmetrics reads `num_features` to size its states instead of probing with a dummy image.
        self.num_features = encoder.embed_dim
        norm = "normalised" if l2_normalize else "raw"
        self.feature_name = f"clip:{encoder.source} ({norm}, {self.num_features}-d)"

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.image_features(images, normalize=self.l2_normalize)


def make_fid(feature: str = "clip", encoder: ClipEncoder | None = None, *, l2_normalize: bool = True,
             inception_dims: int = 2048, reset_real_features: bool = False, **kwargs) -> FrechetInceptionDistance:
    """FID metric on CLIP (`encoder` required) or Inception-v3 features. Update with `fid.update(images, real=...)`."""
    if feature == "clip":
        if encoder is None:
            raise ValueError("make_fid(feature='clip') needs the shared ClipEncoder as `encoder`")
        extractor = ClipFeatureExtractor(encoder, l2_normalize)
        fid = FrechetInceptionDistance(feature=extractor, reset_real_features=reset_real_features, normalize=True,
                                       **kwargs)
        fid.feature_name = extractor.feature_name
    elif feature == "inception":
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ModuleNotFoundError(
                "make_fid(feature='inception') needs torch-fidelity (pip install 'unlearn[fid]', which also installs "
                "torchvision) and downloads the Inception weights on first use; use feature='clip' offline")
        # normalize=True: inputs are float images in [0, 1], as for the CLIP feature.
        fid = FrechetInceptionDistance(feature=inception_dims, reset_real_features=reset_real_features,
                                       normalize=True, **kwargs)
        fid.feature_name = f"inception-v3-compat ({inception_dims}-d)"
    else:
        raise ValueError(f"feature must be 'clip' or 'inception', got {feature!r}")
    return fid
