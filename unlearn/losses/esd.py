"""The ESD regression target (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models", Eq. 7)."""

from __future__ import annotations

from torch import Tensor


def esd_target(eps_uncond: Tensor, eps_cond: Tensor, negative_guidance: float = 1.0) -> Tensor:
    """eps*(x_t, "", t) - eta (eps*(x_t, c, t) - eps*(x_t, "", t)), the frozen model's answers.

    Classifier-free guidance with the sign flipped: the fine-tuned model learns to answer the concept prompt c as
    the original would if guided *away* from c with strength eta (`negative_guidance`). The two predictions follow
    torch broadcasting, e.g. one unconditional (1, C, H, W) against a batch of conditional ones (B, C, H, W).
    Pass detached tensors: the target is a constant of the fine-tuning.
    """
    return eps_uncond - negative_guidance * (eps_cond - eps_uncond)
