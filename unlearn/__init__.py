"""unlearn: make text-to-image diffusion models forget concepts, and measure that they did."""

__version__ = "0.1.0"
