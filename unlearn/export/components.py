"""The model a run handed over, whole: its UNet and, for a pipeline folder, its own text encoder.

`unet_of` gives the UNet alone, which is the whole change for a method that trains the UNet; a method that trains
the text encoder (AdvUnlearn) saves it in the pipeline folder, and a measurement with the base's text encoder would
measure the untouched model. `components_of` is what an evaluation generates with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from unlearn.export import resolve_model
from unlearn.export.load import unet_of
from unlearn.models.loading import Components, load_components


def components_of(source: str | Path, base: Components, dtype: str = "float32") -> Components:
    """`base`'s parts with the UNet and text encoder of `source`: a pipeline folder's own two (loaded once), or, for
    a delta (UNet tensors only), base's text encoder and base's UNet with the delta applied (`unet_of`)."""
    kind, path = resolve_model(source)
    if kind == "pipeline":
        own = load_components(path, dtype=dtype)
        # An untouched text encoder stays the base's own object: callers may then tell "same text" by identity.
        text = base.text_encoder if same_weights(own.text_encoder, base.text_encoder) else own.text_encoder
        return dataclasses.replace(base, unet=own.unet, text_encoder=text)
    return dataclasses.replace(base, unet=unet_of(source, base, dtype=dtype))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k].to(sb[k].dtype), sb[k])
                                          for k in sa)
