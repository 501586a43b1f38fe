"""What a run hands over (`export=`): the pipeline folder, a delta of the tensors the method changed, or both.

`delta.py` writes and reads the delta: one safetensors file of the changed UNet tensors, under their diffusers
names, with the base model's id and fingerprint in its metadata. `load.py` rebuilds a pipeline from base + delta
(`unlearn.load_pipeline`) and gives `evaluate`, `compare` and `attack` the UNet of what they are handed: a pipeline
folder or Hub id, a delta file, or a run folder (its `pipeline/`, else its delta). Reading a delta's header here
needs neither torch nor safetensors, so a command line is checked before any model loads.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from unlearn.models.loading import ModelLoadError

EXPORTS = ("pipeline", "delta", "both")
DELTA_FILE = "delta.safetensors"
ADAPTER_FILE = "spm.safetensors"  # SPM's adapter (unlearn/methods/spm_adapter.py): a delta header, component spm
FORMAT = "unlearn-delta"
FORMAT_VERSION = "1"
HEADER_MAX = 100_000_000  # safetensors' own bound on a header's size


class DeltaError(ModelLoadError):
    """A delta that is not one, or that was made from another base model; the message names the file and both
    models."""


def read_header(path: str | Path) -> dict[str, str]:
    """A delta's metadata, read from the safetensors header alone (8 bytes of length, then JSON)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > HEADER_MAX:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise DeltaError(f"delta {path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise DeltaError(f"delta {path}: a safetensors file but not an unlearn delta (its metadata has no "
                         f"format={FORMAT}; write one with export=delta)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DeltaError(f"delta {path}: format version {meta.get('format_version')!r}; this version of unlearn "
                         f"reads {FORMAT_VERSION}")
    return meta


def resolve_model(source: str | Path) -> tuple[str, str]:
    """("pipeline", folder or Hub id) or ("delta", file) for what a user names: a pipeline folder, a Hub id, a
    delta file, or a run folder (its pipeline/ when there is one, else its delta)."""
    p = Path(str(source)).expanduser()
    if p.is_file():
        return "delta", str(p)
    if not p.is_dir():
        return "pipeline", str(source)  # a Hub id, `toy`, or a missing folder the loader names
    if (p / "model_index.json").is_file() or (p / "unet").is_dir():
        return "pipeline", str(p)
    if (p / "pipeline").is_dir():
        return "pipeline", str(p / "pipeline")
    for name in (DELTA_FILE, ADAPTER_FILE):
        if (p / name).is_file():
            return "delta", str(p / name)
    raise ModelLoadError(f"{source}: neither a pipeline folder nor a run folder (no model_index.json, pipeline/, "
                         f"{DELTA_FILE} or {ADAPTER_FILE} in it)")
