"""What identifies a model's outputs: architecture configs, a cheap weights checksum and the tokenizer.

Caches key on these (prepared data sets, the original model's evaluation images), so a fine-tuned or swapped
model never reuses another model's samples.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

CHECKSUM_VALUES = 1024  # values sampled per weight tensor for the cheap checksum


def sha_of(obj: Any) -> str:
    """sha256 of bytes, or of any JSON-able object (keys sorted)."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()


def weights_checksum(module: torch.nn.Module, values: int = CHECKSUM_VALUES) -> str:
    """sha256 over names, shapes, dtypes and up to `values` evenly strided entries of every tensor: catches
    any fine-tune that touches a tensor, in well under a second even for SD's 860M-parameter UNet."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // values)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::step][:values].float().cpu().numpy().tobytes())
    return h.hexdigest()


def model_config(model) -> dict:
    """The architecture part of a diffusers/transformers config: no load path, library version or dtype."""
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    return {k: v for k, v in cfg.items()
            if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}


def model_fingerprint(components) -> dict:
    """Configs, weights and tokenizer of a pipeline's parts."""
    parts = {"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoder}
    return {"dtype": str(next(components.unet.parameters()).dtype),
            "configs_sha": sha_of({name: model_config(m) for name, m in parts.items()}),
            "weights_sha": sha_of([weights_checksum(m) for m in parts.values()]),
            "tokenizer_sha": sha_of([components.tokenizer.model_max_length,
                                     sorted(components.tokenizer.get_vocab().items())])}
