"""What a UNet predicts, turned into the noise ε that every loss in unlearn/ is written for.

SD-1.x and SD-2.1-base predict ε; SD-2.1 (768) predicts the velocity v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0
(Salimans & Ho 2022). With x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, solving the two for ε gives

    ε = sqrt(ᾱ_t) v + sqrt(1 − ᾱ_t) x_t,

affine in v with x_t fixed, so classifier-free guidance, ESD's negatively guided target and any other combination
whose weights sum to one mean the same in either parametrisation; a distance between two predictions does not
(‖ε̂ − ε‖² = ᾱ_t ‖v̂ − v‖², and JS / Cramér–Wold are not even scaled copies). The model's scheduler says which it is
(`scheduler.config.prediction_type`); `sample` (x0-predicting) models are not supported.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_type_of(scheduler) -> str:
    """The scheduler's `prediction_type` (diffusers' default, epsilon, when its config has none), checked."""
    return check_prediction_type(getattr(scheduler, "config", {}).get("prediction_type", "epsilon"))


def check_prediction_type(value) -> str:
    if value not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={value!r} is not supported: the losses are written for ε and a model "
                         f"must predict one of {' | '.join(PREDICTION_TYPES)}")
    return value


def eps_from_prediction(pred: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """ε from the UNet's output `pred` at the noisy latents `x_t`; `alpha_bar` is ᾱ_t, a scalar or one per sample
    (B,). Returned in `pred`'s dtype; an ε model's output is returned as it is."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return pred
    a = alpha_bar.to(device=pred.device, dtype=float_type(pred))
    if a.dim() == 1:
        a = a.view(-1, *([1] * (pred.dim() - 1)))
    return (a.sqrt() * pred + (1 - a).sqrt() * x_t).to(pred.dtype)


def float_type(t: Tensor) -> torch.dtype:
    """float32 for the half types (ᾱ_t's square roots near t = 0 lose digits in fp16), else t's own."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
