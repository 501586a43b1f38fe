"""Concept Ablation's objective (Kumari et al. 2023, "Ablating Concepts in Text-to-Image Diffusion Models").

On a noised anchor image x_t the target-conditioned prediction eps(x_t, c*, t) is regressed onto
- `model`: the anchor-conditioned prediction of the same network, under stop-gradient, sg(eps(x_t, c, t)) (Eq. 4's
  model-based loss; the paper's default), or
- `noise`: the noise that made x_t (the noise-based loss: plain fine-tuning of c* on anchor images).
An optional prior-preservation term is the ordinary diffusion loss of the anchor prompt on the same x_t,
||eps(x_t, c, t) - noise||^2, weighted by `prior_weight` (0 = off).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ABLATION_VARIANTS = ("model", "noise")


class AblationLoss(NamedTuple):
    total: Tensor      # ablation + prior_weight * prior: what is minimised
    ablation: Tensor   # the c* -> anchor regression
    prior: Tensor      # the anchor's diffusion loss (0 when prior_weight == 0)


def _mse(a: Tensor, b: Tensor, what: str) -> Tensor:
    if a.shape != b.shape:  # mse_loss would broadcast silently
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    # At least float32, like the released code's `.float()`: half-precision predictions are averaged in fp32.
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return F.mse_loss(a.to(dtype), b.to(dtype))


def concept_ablation_loss(eps_target_cond: Tensor, eps_anchor_cond: Tensor | None, noise: Tensor,
                          variant: str = "model", prior_weight: float = 0.0) -> AblationLoss:
    """Concept Ablation's loss on one batch of noised anchor latents (mean squared error over every element).

    eps_target_cond: eps(x_t, c*, t), carrying gradient. eps_anchor_cond: eps(x_t, c, t) on the same x_t and t; it is
    detached here when it serves as the `model` target, so the same tensor (with gradient) can also feed the prior
    term. It may be None when `variant="noise"` and `prior_weight == 0`. noise: the eps that made x_t.
    """
    if variant not in ABLATION_VARIANTS:
        raise ValueError(f"unknown variant={variant!r}; choose one of {ABLATION_VARIANTS}")
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0 (0 = off), got {prior_weight}")
    needs_anchor = variant == "model" or prior_weight > 0
    if needs_anchor and eps_anchor_cond is None:
        raise ValueError(f"variant={variant!r} with prior_weight={prior_weight} needs eps_anchor_cond")
    target = eps_anchor_cond.detach() if variant == "model" else noise
    ablation = _mse(eps_target_cond, target, "ablation")
    prior = _mse(eps_anchor_cond, noise, "prior") if prior_weight > 0 else ablation.new_zeros(())
    return AblationLoss(ablation + prior_weight * prior, ablation, prior)
