"""Pure loss functions and gradient surgery, with explicit tensor arguments."""

from unlearn.losses.ablation import ABLATION_VARIANTS, AblationLoss, concept_ablation_loss
from unlearn.losses.diffusion import diffusion_loss
from unlearn.losses.distances import (
    CW_SAMPLES,
    cramer_wold_distance,
    cramer_wold_sets,
    cw_kernel,
    js_divergence,
    l2_distance,
    silverman_gamma,
)
from unlearn.losses.esd import ESD_FORMS, esd_target
from unlearn.losses.gradient_surgery import (
    concept_preserving_gradient,
    gradient_conflict_stats,
    gradient_conflict_tensors,
)

__all__ = [
    "ABLATION_VARIANTS",
    "CW_SAMPLES",
    "ESD_FORMS",
    "AblationLoss",
    "concept_ablation_loss",
    "concept_preserving_gradient",
    "cramer_wold_distance",
    "cramer_wold_sets",
    "cw_kernel",
    "diffusion_loss",
    "esd_target",
    "gradient_conflict_stats",
    "gradient_conflict_tensors",
    "js_divergence",
    "l2_distance",
    "silverman_gamma",
]
