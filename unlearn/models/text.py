"""Prompt -> text-encoder hidden states, exactly as StableDiffusionPipeline conditions the UNet."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(len(prompts), max_length, hidden) last hidden states, padded to the tokenizer's model_max_length."""
    device = next(text_encoder.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0])
    return torch.cat(out)
