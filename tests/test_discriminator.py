import pytest
import torch
from torch import nn

from unlearn.nets import PatchDiscriminator


def test_five_convs_with_4x4_kernels_stride_2():
    disc = PatchDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    for conv in convs:
        assert conv.kernel_size == (4, 4) and conv.stride == (2, 2) and conv.padding == (1, 1)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert convs[0].in_channels == 4


@pytest.mark.parametrize(
    ("size", "expected"),
    [((64, 64), (2, 2)), ((16, 16), (1, 1)), ((40, 24), (1, 1)), ((96, 64), (3, 2))],
)
def test_output_shapes(size, expected):
    disc = PatchDiscriminator(base_channels=8)
    out = disc(torch.randn(2, 4, *size))
    assert out.shape == (2, 1, *expected)


@pytest.mark.parametrize("norm", ["none", "batch", "instance"])
def test_gradient_reaches_input_and_every_parameter(norm):
    disc = PatchDiscriminator(base_channels=8, norm=norm)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    disc(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in disc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_channel_cap_and_bad_names():
    disc = PatchDiscriminator(base_channels=64, n_layers=6, max_channels=256)
    assert [m.out_channels for m in disc.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 256, 256, 1]
    with pytest.raises(ValueError, match="group"):
        PatchDiscriminator(norm="group")
    with pytest.raises(ValueError, match="gelu"):
        PatchDiscriminator(activation="gelu")
