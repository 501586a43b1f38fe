"""Speed switches for the UNets a method runs (conf/speed/*.yaml); `UnlearnModule.configure_speed` applies them.

Mixed precision is the trainer's (`trainer.precision=bf16-mixed | 16-mixed`): Lightning autocasts the training step
and keeps the weights, their gradients and Adam's state in float32, which lr 4e-6 needs (in pure bf16 an update
that small is below half an ulp of most weights and rounds away).
"""

from __future__ import annotations

import torch

ATTENTION = ("sdpa", "eager")


def apply_speed(unet: torch.nn.Module, trainable: bool, attention: str = "sdpa", gradient_checkpointing: bool = False,
                channels_last: bool = False, compile: bool = False, compile_backend: str = "inductor",
                compile_mode: str | None = None) -> torch.nn.Module:
    """Configure one diffusers UNet in place.

    attention: `sdpa` = torch's fused scaled_dot_product_attention (diffusers' AttnProcessor2_0, its default on
    torch >= 2) | `eager` = the explicit softmax(QK^T)V of AttnProcessor (a reference, and what old code ran).
    gradient_checkpointing: recompute block activations in backward (only where gradients flow: `trainable`).
    channels_last: NHWC weights, what cuDNN's fastest convolutions use. compile: `Module.compile` in place (the
    parameter names, hence checkpoints and export, are unchanged).
    """
    if attention not in ATTENTION:
        raise ValueError(f"unknown speed.attention={attention!r}; choose one of {ATTENTION}")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    if gradient_checkpointing and trainable:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile(backend=compile_backend, mode=compile_mode)
    return unet
