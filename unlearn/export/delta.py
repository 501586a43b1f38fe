"""The delta: the UNet tensors a method changed, as one safetensors file, and the base model it applies to.

Metadata (safetensors metadata is text): `format`, `format_version`, `component` (unet: the tensors carry the
UNet's own state-dict names), `base` (model.path as configured: a Hub id, a folder or `toy`), `base_revision`,
`base_dtype`, `base_fingerprint` (JSON of unlearn.models.fingerprint.model_fingerprint of the base, taken before the
method changed anything), `method`, `method_class`, `trainable` (the subset's name, unlearn.methods.base.TRAINABLE),
`concept`, `tensors`, `unlearn_version`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from unlearn.export import DELTA_FILE, FORMAT, FORMAT_VERSION, DeltaError, read_header
from unlearn.models.fingerprint import model_fingerprint, tensor_sha

log = logging.getLogger("unlearn.export")
COMPONENT = "unet"


def base_record(model_cfg, components) -> dict:
    """What a delta of this run applies to, taken before the method edits anything: the model as configured, its
    revision and dtype, its fingerprint, and each UNet tensor's sha (so the export finds any tensor that changed
    outside the method's trainable subset)."""
    return {"path": str(model_cfg.path), "revision": model_cfg.get("revision"), "dtype": str(model_cfg.dtype),
            "fingerprint": model_fingerprint(components),
            "unet_tensors": {n: tensor_sha(t) for n, t in components.unet.state_dict().items()}}


def subset_name(unet: torch.nn.Module, names: list[str]) -> str:
    """The TRAINABLE rule that selects exactly `names` (`custom` if none does)."""
    from unlearn.methods.base import TRAINABLE

    every = [n for n, _ in unet.named_parameters()]
    for key, keep in TRAINABLE.items():
        if [n for n in every if keep(n)] == list(names):
            return key
    return "custom"


def changed_names(unet: torch.nn.Module, names: list[str], base: dict) -> list[str]:
    """`names` (the method's trainable subset), then any other tensor whose bytes differ from the base's: a delta
    without it would not rebuild the model, so it goes in, with a warning."""
    chosen = set(names)
    extra = [n for n, t in unet.state_dict().items()
             if n not in chosen and tensor_sha(t) != base["unet_tensors"].get(n)]
    if extra:
        log.warning("%d tensor(s) changed outside the trainable subset (e.g. %s): written into the delta too",
                    len(extra), extra[0])
    return [*names, *extra]


def write_delta(path: str | Path, unet: torch.nn.Module, names: list[str], base: dict, method: str = "",
                method_class: str = "", concept: str = "") -> Path:
    from unlearn import __version__
    from unlearn.utils.files import save_tensors_atomic

    path = Path(path)
    if path.is_dir():
        path = path / DELTA_FILE
    state = unet.state_dict()
    names = changed_names(unet, names, base)
    tensors = {n: state[n].detach().cpu().contiguous() for n in names}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "component": COMPONENT,
            "base": base["path"], "base_revision": base.get("revision") or "", "base_dtype": base["dtype"],
            "base_fingerprint": json.dumps(base["fingerprint"], sort_keys=True),
            "method": method, "method_class": method_class, "trainable": subset_name(unet, names),
            "concept": concept, "tensors": str(len(tensors)), "unlearn_version": __version__}
    save_tensors_atomic(tensors, path, metadata=meta)
    return path


def read_delta(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a delta file."""
    from safetensors.torch import load_file

    meta = read_header(path)
    if meta.get("component") != COMPONENT:
        raise DeltaError(f"delta {path}: component {meta.get('component')!r}; this version applies {COMPONENT} "
                         "deltas only")
    return meta, load_file(str(path))


def check_base(meta: dict[str, str], components, given: str, path: str | Path) -> None:
    """The delta's base fingerprint against the model it is applied to: DeltaError naming both on a mismatch."""
    made_from = json.loads(meta["base_fingerprint"])
    found = model_fingerprint(components)
    if found == made_from:
        return
    parts = [k for k in sorted(set(made_from) | set(found)) if made_from.get(k) != found.get(k)]

    def short(fp):
        return ", ".join(f"{k} {str(fp.get(k))[:12]}" for k in parts)

    raise DeltaError(f"delta {path} was made from base {meta.get('base')!r} ({short(made_from)}), but the model "
                     f"given is {given!r} ({short(found)}): apply it to the model it was made from")


def apply_delta(unet: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str | Path = "delta") -> None:
    """Copy the delta's tensors into `unet` in place; a name, shape or dtype the UNet lacks is a DeltaError."""
    state = unet.state_dict()
    for name, value in tensors.items():
        if name not in state:
            raise DeltaError(f"delta {path}: tensor {name!r} is not in this UNet (another architecture?)")
        if state[name].shape != value.shape or state[name].dtype != value.dtype:
            raise DeltaError(f"delta {path}: tensor {name!r} is {tuple(value.shape)} {value.dtype}, this UNet's "
                             f"{tuple(state[name].shape)} {state[name].dtype}")
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)


def export_run(module, run_dir: str | Path, cfg, base: dict | None) -> Path:
    """Write what `export` asks for into the run folder: `pipeline/` (a folder StableDiffusionPipeline loads), the
    delta, or both; returns the pipeline folder when there is one, else the delta file. `base` is base_record's,
    taken before training (needed for a delta)."""
    from unlearn.export import EXPORTS

    export = cfg.get("export", "pipeline")
    if export not in EXPORTS:
        raise ValueError(f"export={export!r}: one of {' | '.join(EXPORTS)}")
    run_dir = Path(run_dir)
    module.merge_adapter()  # a LoRA run's weights, merged: what every export holds and the evaluation measures
    written = module.export(run_dir / "pipeline") if export in ("pipeline", "both") else None
    if export in ("delta", "both"):
        target = cfg.method.get("_target_", "")
        delta = write_delta(run_dir / DELTA_FILE, module.export_unet(), module.trainable_names, base,
                            method=str(cfg.method.name), method_class=str(target), concept=str(cfg.concept.name))
        if module.lora_tensors is not None:  # and the LoRA itself, for diffusers' load_lora_weights(run_dir)
            from unlearn.methods.adapters import write_lora_file

            write_lora_file(run_dir, module.lora_tensors)
        written = written or delta
    return Path(written)
