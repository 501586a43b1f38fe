"""Cross-attention without gradient through the start-of-text token's key and value (DoCo's released code).

DoCo's attention processor (model_pipeline.py, `CustomDiffusionAttnProcessor`, inherited from Custom Diffusion)
computes the cross-attention key and value as usual but detaches their first token. CLIP's text encoder is causal,
so that token's hidden state is the same for every prompt: it is the attention sink every prompt shares. Detaching
it means the trained `to_k`/`to_v` weights learn only from the prompt's own tokens; the forward pass is unchanged.

Done here with forward hooks on every cross-attention `to_k`/`to_v` linear layer instead of a replacement processor:
their only input is the text embedding, so the hook is exactly the processor's rule, and it works with whichever
attention processor (SDPA, xformers, ...) diffusers runs.
"""

from __future__ import annotations

import torch
from torch import nn


def _detach_first_token(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    # output: (batch, tokens, dim). Same values; no gradient through token 0.
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def detach_first_token(unet: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook every cross-attention (`attn2`) key and value projection of `unet`; returns the handles.

    Raises ValueError if the UNet has no `attn2.to_k`/`attn2.to_v` module (nothing would be detached).
    """
    handles = [m.register_forward_hook(_detach_first_token) for name, m in unet.named_modules()
               if name.endswith(("attn2.to_k", "attn2.to_v"))]
    if not handles:
        raise ValueError("detach_first_token: this UNet has no cross-attention attn2.to_k / attn2.to_v layer")
    return handles
