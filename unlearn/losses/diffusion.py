"""The standard denoising objective."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def diffusion_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between the predicted and the true target (epsilon, v or x0, per the scheduler)."""
    if pred.shape != target.shape:
        # mse_loss would broadcast silently, e.g. (B, C, H, W) against (C, H, W).
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return F.mse_loss(pred, target)
