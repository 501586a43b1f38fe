"""Prompt -> text-encoder hidden states, exactly as StableDiffusionPipeline conditions the UNet (SDXL: the packed
embedding of both encoders, unlearn/models/sdxl.py)."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(len(prompts), max_length, hidden) last hidden states, padded to the tokenizer's model_max_length.

    SDXL's paired encoders give (len(prompts), max_length + 1, D1 + D2) packed embeddings instead: the UNet loaded
    with them unpacks them, and `token_rows` gives the cross-attention inputs alone."""
    from unlearn.models import sdxl

    if isinstance(text_encoder, sdxl.TextEncoders):
        return sdxl.encode(tokenizer, text_encoder, prompts, batch_size)
    device = next(text_encoder.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


def token_rows(text_encoder, emb: torch.Tensor) -> torch.Tensor:
    """What cross-attention reads of `encode_prompts`' output: all of it, or an SDXL packed embedding's token rows."""
    from unlearn.models import sdxl

    return sdxl.token_states(emb) if isinstance(text_encoder, sdxl.TextEncoders) else emb
