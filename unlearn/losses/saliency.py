"""SalUn's pieces as pure functions: the saliency mask, the two losses, the masked gradient.

SalUn (Fan et al., ICLR 2024) fine-tunes only the weights whose forgetting-loss gradient is largest in magnitude:
one threshold over every UNet entry together, not one per tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def saliency_mask(grads: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
    """Bool masks, one per gradient, True where |g| is among the largest floor(ratio x N) of all N entries.

    Exactly that many are kept: entries equal to the threshold are taken in order (the dict's order, then flat
    order) until the count is reached, so ties (zero gradients, most often) cannot push the fraction over.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    flat = torch.cat([g.detach().abs().float().flatten() for g in grads.values()])
    n, k = flat.numel(), int(flat.numel() * ratio)
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k > 0:
        threshold = torch.kthvalue(flat.cpu(), n - k + 1).values.to(flat.device)  # the k-th largest
        keep = flat > threshold
        ties = torch.nonzero(flat == threshold).flatten()[: k - int(keep.sum())]
        keep[ties] = True
    out, start = {}, 0
    for name, g in grads.items():
        out[name] = keep[start:start + g.numel()].view(g.shape)
        start += g.numel()
    return out


def guided_forget_loss(eps_cond: Tensor, eps_uncond: Tensor, noise: Tensor, guidance: float) -> Tensor:
    """The mask's forgetting loss: minus the MSE between the noise and the guided prediction
    (1 + w) eps(x_t, c) - w eps(x_t, "") (released generate_mask.py; only |its gradient| is used)."""
    return -F.mse_loss((1 + guidance) * eps_cond - guidance * eps_uncond, noise)


def random_label_loss(eps_forget: Tensor, eps_pseudo: Tensor) -> Tensor:
    """Forget images under their own prompt regressed onto the current model's answer, without gradient, for
    the same x_t under another prompt (the "random label")."""
    return F.mse_loss(eps_forget, eps_pseudo.detach())


@torch.no_grad()
def mask_gradients(named_parameters, mask: dict[str, Tensor]) -> None:
    """Zero every gradient entry outside the mask, in place; a parameter the mask does not name is left alone."""
    for name, p in named_parameters:
        if p.grad is not None and name in mask:
            p.grad.mul_(mask[name].to(device=p.grad.device, dtype=p.grad.dtype))
