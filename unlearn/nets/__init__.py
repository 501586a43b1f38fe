"""Small networks trained alongside the diffusion model."""

from unlearn.nets.discriminator import PatchDiscriminator

__all__ = ["PatchDiscriminator"]
