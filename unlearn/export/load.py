"""Rebuild a pipeline from base + delta, and give `evaluate`, `compare` and `attack` the UNet of what they name."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from unlearn.export import DELTA_FILE, read_header, resolve_model
from unlearn.export.delta import apply_delta, check_base, read_delta
from unlearn.models import sdxl
from unlearn.models.loading import Components, load_components, resolve_path


def delta_file(delta: str | Path) -> Path:
    """A delta file, or the one in a run folder."""
    p = Path(delta).expanduser()
    return p / DELTA_FILE if p.is_dir() else p


def load_pipeline(base: str | Path, delta: str | Path | None = None, **from_pretrained):
    """The pipeline a run's `export=pipeline` folder holds, rebuilt from its base and its delta.

    `base`: a pipeline folder, a Hub id or `toy`, loaded with StableDiffusionPipeline.from_pretrained (an SDXL
    folder with StableDiffusionXLPipeline's; in the delta's dtype and revision unless given); `delta`: a delta
    file or a run folder holding one (None: the base alone). The delta's base fingerprint must be the loaded base's (else DeltaError naming both); its tensors are
    then copied into the UNet. As in the exported folder: DDIM on the base's schedule, no safety checker.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    meta = None
    if delta is not None:
        delta = delta_file(delta)
        meta = read_header(delta)
        from_pretrained.setdefault("torch_dtype", getattr(torch, meta["base_dtype"].removeprefix("torch.")))
        if meta.get("base_revision"):
            from_pretrained.setdefault("revision", meta["base_revision"])
    path = resolve_path(base)
    if sdxl.is_sdxl_folder(path, from_pretrained.get("revision")):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False, **from_pretrained)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, **from_pretrained)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if delta is not None:
        parts = as_components(pipe, path)  # SDXL: SPM's transport reads the prompt through both encoders
        check_base(meta, parts, str(base), delta)
        apply_to(pipe.unet, delta, meta, parts.tokenizer, parts.text_encoder)
    return pipe


def as_components(pipe, source: str):
    """A loaded pipeline's parts as `load_components` holds them (SDXL: the encoders and tokenizers paired), so its
    fingerprint is the one a delta records."""
    if not hasattr(pipe, "text_encoder_2"):
        return pipe
    te = sdxl.TextEncoders(pipe.text_encoder, pipe.text_encoder_2)
    return Components(unet=pipe.unet, vae=pipe.vae, text_encoder=te, tokenizer=sdxl.Tokenizers(pipe.tokenizer,
                      pipe.tokenizer_2), scheduler=pipe.scheduler, source=source)


def apply_to(unet, path, meta: dict, tokenizer, text_encoder):
    """`unet` (in place) with the file at `path`: a delta's tensors copied in, or SPM's adapter with its
    prompt-dependent strength (unlearn/methods/spm_adapter.py), which reads the prompt through `text_encoder`."""
    if meta.get("component") == "spm":
        from unlearn.methods.spm_adapter import read_adapter, transport_unet

        return transport_unet(unet, *read_adapter(path), tokenizer, text_encoder, path)
    apply_delta(unet, read_delta(path)[1], path)
    return unet


def unet_of(source: str | Path, base: Components | str, dtype: str = "float32"):
    """The UNet of `source` (a pipeline folder or Hub id, a delta file, or a run folder) for a model whose other
    parts are `base`'s: a pipeline's own UNet, or a copy of base's UNet with the delta applied. A delta must have
    been made from `base` (given loaded, or as a path loaded here in the delta's dtype)."""
    kind, path = resolve_model(source)
    if kind == "pipeline":
        return load_components(path, dtype=dtype).unet
    meta = read_header(path)
    if not isinstance(base, Components):
        base = load_components(str(base), revision=meta.get("base_revision") or None,
                               dtype=meta["base_dtype"].removeprefix("torch."))
    check_base(meta, base, base.source, path)
    unet = apply_to(copy.deepcopy(base.unet), path, meta, base.tokenizer, base.text_encoder)
    return unet.requires_grad_(False).eval()


def check_deltas(sources, base: Components) -> None:
    """Every delta among `sources` made from `base`: checked before any measurement, so a wrong one fails in
    seconds, not after the original model's images."""
    for source in sources or []:
        kind, path = resolve_model(source)
        if kind == "delta":
            check_base(read_header(path), base, base.source, path)
