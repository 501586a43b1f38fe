"""What identifies a model's outputs: architecture configs, a hash of every weight byte and the tokenizer.

Caches key on these (prepared data sets, the original model's evaluation images), so a fine-tuned or swapped
model never reuses another model's samples, however sparse the edit (one embedding row, one bias).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

HASH_THREADS = 8  # at most; hashlib releases the GIL on large buffers, so tensors hash in parallel


def sha_of(obj: Any) -> str:
    """sha256 of bytes, or of any JSON-able object (keys sorted)."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()


def tensor_sha(t: torch.Tensor) -> bytes:
    """sha256 of a tensor's shape, dtype and raw bytes (any dtype, bfloat16 included: read as bytes)."""
    h = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def weights_checksum(module: torch.nn.Module) -> str:
    """sha256 over every state_dict entry's name and tensor_sha, in state_dict order: every value counts (SD-1.4's
    4.3 GB of fp32 weights take seconds, against minutes of sampling they save or spoil)."""
    state = module.state_dict()
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, os.cpu_count() or 1))) as pool:
        digests = pool.map(tensor_sha, state.values())  # results in input order: the hash does not depend on timing
        h = hashlib.sha256()
        for name, digest in zip(state, digests):
            h.update(name.encode() + b"\0" + digest)
    return h.hexdigest()


def model_config(model) -> dict:
    """The architecture part of a diffusers/transformers config: no load path, library version or dtype."""
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    return {k: v for k, v in cfg.items()
            if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}


def model_fingerprint(components) -> dict:
    """Configs, weights and tokenizer of a pipeline's parts."""
    parts = {"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoder}
    out = {"dtype": str(next(components.unet.parameters()).dtype),
           "configs_sha": sha_of({name: model_config(m) for name, m in parts.items()}),
           "weights_sha": sha_of([weights_checksum(m) for m in parts.values()]),
           "tokenizer_sha": sha_of([components.tokenizer.model_max_length,
                                    sorted(components.tokenizer.get_vocab().items())])}
    if hasattr(components.tokenizer, "parts"):  # SDXL's pair (unlearn/models/sdxl.py): the second one's too
        second = components.tokenizer.parts()[1]
        out["tokenizer_2_sha"] = sha_of([second.model_max_length, second.pad_token, sorted(second.get_vocab().items())])
    # The same weights read as v sample other images; an ε model's fingerprint (and its caches) stays as it was.
    prediction = getattr(getattr(components, "scheduler", None), "config", {}).get("prediction_type", "epsilon")
    if prediction != "epsilon":
        out["prediction_type"] = prediction
    return out
