"""unlearn: make text-to-image diffusion models forget concepts, and measure that they did."""

__version__ = "0.1.0"


def load_pipeline(base, delta=None, **from_pretrained):
    """A StableDiffusionPipeline from a base model (pipeline folder, Hub id or `toy`) and a run's delta
    (`export=delta`: a delta.safetensors file or its run folder), checked against the base's fingerprint; the
    exported pipeline folder's model, bit for bit. Keywords go to StableDiffusionPipeline.from_pretrained."""
    from unlearn.export.load import load_pipeline as load

    return load(base, delta, **from_pretrained)
