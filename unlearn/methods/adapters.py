"""LoRA on a method's trainable subset (`method.adapter=lora`), through peft; merging it back; its diffusers file.

Every Linear and Conv2d whose weight the method's `trainable` rule selects gets a LoRA (W + (alpha / rank) B A,
B zero at the start, so training starts from the original model); the base weights, biases and norms stay frozen.
After training the LoRA is merged into the weights in place (`merge_lora`), so the exported UNet, its delta and
what the evaluation measures are a plain diffusers UNet.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTERS = ("none", "lora")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' `load_lora_weights(folder)` looks for
ADAPTER_NAME = "default"  # peft's


def lora_targets(unet: nn.Module, names: list[str]) -> list[str]:
    """The modules a LoRA can wrap (Linear, Conv2d) whose `weight` is among the trainable parameter `names`."""
    chosen = set(names)
    return [n for n, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and f"{n}.weight" in chosen]


def add_lora(unet: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float) -> list[str]:
    """Wrap `targets` of `unet` in place with a LoRA, freeze everything else; returns the LoRA parameters' names."""
    from peft import LoraConfig, inject_adapter_in_model

    if not targets:
        raise ValueError("adapter=lora: the trainable subset holds no Linear or Conv2d weight to adapt")
    # Full module names; peft matches a name or a dotted suffix of one, and no full name is another's suffix.
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets)
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    names = []
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)
        if ".lora_" in name:
            names.append(name)
    return names


def lora_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]


def has_lora(unet: nn.Module) -> bool:
    return bool(lora_layers(unet))


@torch.no_grad()
def lora_state(unet: nn.Module, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The LoRA in diffusers' file layout (`unet.<module>.lora_A.weight` / `.lora_B.weight`), with alpha / rank
    folded into B: a loader that reads no alpha (diffusers assumes alpha = rank then) gets the same weights."""
    out = {}
    for name, layer in lora_layers(unet):
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        out[f"{prefix}{name}.lora_A.weight"] = a.detach().cpu().clone()
        out[f"{prefix}{name}.lora_B.weight"] = (b * layer.scaling[ADAPTER_NAME]).detach().cpu().contiguous()
    return out


@torch.no_grad()
def merge_lora(unet: nn.Module) -> list[str]:
    """Merge every LoRA of `unet` into its base layer and put the base layer back in its place: a plain UNet again,
    under its own parameter names. Returns the names of the weights that changed."""
    changed = []
    for name, layer in lora_layers(unet):
        layer.merge(adapter_names=[ADAPTER_NAME])
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, layer.get_base_layer())
        changed.append(f"{name}.weight")
    return changed


def write_lora_file(folder, tensors: dict[str, torch.Tensor]):
    """`<folder>/pytorch_lora_weights.safetensors`, written beside and renamed."""
    from pathlib import Path

    from unlearn.utils.files import save_tensors_atomic

    path = Path(folder) / LORA_FILE
    save_tensors_atomic(tensors, path, metadata={"format": "pt"})
    return path
