"""The ESD regression target (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models", Eq. 7)."""

from __future__ import annotations

from torch import Tensor

# Where the negative guidance starts: the unconditional answer (the paper's Eq. 7 and train-esd.py) or the
# conditional one (the diffusers script esd_sd.py: eps_c - eta (eps_c - eps_0), i.e. the paper's form with eta - 1).
ESD_FORMS = ("paper", "diffusers")


def esd_target(eps_uncond: Tensor, eps_cond: Tensor, negative_guidance: float = 1.0, form: str = "paper") -> Tensor:
    """eps*(x_t, "", t) - eta (eps*(x_t, c, t) - eps*(x_t, "", t)), the frozen model's answers (`form="paper"`);
    eps*(x_t, c, t) - eta (eps*(x_t, c, t) - eps*(x_t, "", t)) with `form="diffusers"`.

    Classifier-free guidance with the sign flipped: the fine-tuned model learns to answer the concept prompt c as
    the original would if guided *away* from c with strength eta (`negative_guidance`). The two predictions follow
    torch broadcasting, e.g. one unconditional (1, C, H, W) against a batch of conditional ones (B, C, H, W).
    Pass detached tensors: the target is a constant of the fine-tuning.
    """
    if form not in ESD_FORMS:
        raise ValueError(f"unknown form={form!r}; choose one of {ESD_FORMS}")
    base = eps_uncond if form == "paper" else eps_cond
    return base - negative_guidance * (eps_cond - eps_uncond)
