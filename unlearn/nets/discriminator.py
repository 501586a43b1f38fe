"""PatchGAN discriminator over noise predictions in latent space (CDC paper, Sec. 4.1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

_KERNEL, _STRIDE, _PADDING = (
    4,
    2,
    1,
)  # the paper: 4x4 kernels, stride 2; padding 1 makes each conv halve the size


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"unknown norm {kind!r}; expected 'none', 'batch' or 'instance'")


def _activation(kind: str, negative_slope: float) -> nn.Module:
    if kind == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if kind == "relu":
        return nn.ReLU()
    if kind == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {kind!r}; expected 'leaky_relu', 'relu' or 'silu'")


class PatchDiscriminator(nn.Module):
    """``n_layers`` convolutions (4x4, stride 2, padding 1); the last one gives one logit per patch.

    Channels go ``base_channels * 2**i`` up to ``max_channels``. As in pix2pix, the first conv has no norm, and
    convs followed by a norm carry no bias (the norm's shift replaces it); ``norm_bias=True`` keeps that bias, as
    DoCo's released code does (gan.py: every ``nn.Conv2d`` has the default bias). ``last_stride`` is the last conv's
    stride: 2 (the paper's "stride 2" for every conv) or 1 (DoCo's code: ``nn.Conv2d(512, 1, 4, padding=1)``).

    Size rule: each stride-2 conv maps a side of length L to floor(L / 2), a stride-1 last conv maps M to M - 1. The
    output side is floor(L / 2**n_layers) (last stride 2) or floor(L / 2**(n_layers - 1)) - 1 (last stride 1);
    both are 0 for L < 2**n_layers (the toy world's 16x16 latents with 5 layers). Such inputs are zero-padded,
    centred, up to 2**n_layers on that side, giving a 1x1 output; zero is the mean of the noise-like maps this
    network judges, so the border adds no class signal. Larger inputs are untouched: 4x64x64 -> 1x2x2 (last
    stride 2) or 1x3x3 (last stride 1).
    """

    def __init__(
        self,
        in_channels: int = 4,
        base_channels: int = 64,
        n_layers: int = 5,
        max_channels: int = 512,
        norm: str = "none",
        activation: str = "leaky_relu",
        negative_slope: float = 0.2,
        last_stride: int = _STRIDE,
        norm_bias: bool = False,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if last_stride not in (1, 2):
            raise ValueError(f"discriminator.last_stride={last_stride!r}; expected 2 (paper) or 1 (DoCo's code)")
        if norm != "none":
            _norm(norm, 1)  # fail at construction on a bad name, even with n_layers < 3
        self.min_size = 2**n_layers
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(n_layers - 1):
            c_out = min(base_channels * 2**i, max_channels)
            normed = norm != "none" and i > 0
            layers.append(nn.Conv2d(c_in, c_out, _KERNEL, _STRIDE, _PADDING, bias=norm_bias or not normed))
            if normed:
                layers.append(_norm(norm, c_out))
            layers.append(_activation(activation, negative_slope))
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, _KERNEL, last_stride, _PADDING))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> patch logits (B, 1, h, w), h and w by the size rule above."""
        pad_h, pad_w = max(self.min_size - x.shape[-2], 0), max(self.min_size - x.shape[-1], 0)
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return self.net(x)
