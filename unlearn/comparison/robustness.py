"""The attack's columns in a comparison: clean detection, attack success rate, CCS and CRS of every model.

One `Robustness` (original model, detector, reference images) serves every method; each model's result is kept
in its run folder keyed by the robustness settings, so a rerun of `compare` attacks nothing twice.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from unlearn.models.fingerprint import sha_of
from unlearn.utils.files import write_atomic

COLUMNS = {"clean_rate": "clean det. %↓", "asr": "ASR %↓", "ccs": "CCS↓", "crs": "CRS↓"}


def robustness_columns(cfg, runs, target: str) -> dict[str, dict]:
    """{label: {column: value}} for the original model and every run."""
    from unlearn.attacks.runner import Robustness
    from unlearn.export.load import unet_of

    rc = OmegaConf.to_container(cfg.robustness, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    key = sha_of({"rob": rc, "model": model, "concept": target})[:16]
    rob = None
    columns = {}
    for label, folder, source in [("original", runs[0].run_dir, None)] + \
            [(r.method, r.run_dir, r.run_dir) for r in runs]:
        cache = folder / f"robustness-{label}-{key}.json"
        if cache.exists():
            row = json.loads(cache.read_text())
        else:
            if rob is None:
                rob = Robustness(target, rc["attack"], model, rc["detector"], rc["recovery"])
            # A run folder: its pipeline/, or its delta applied to the original model (export=delta).
            unet = rob.original.unet if source is None else \
                unet_of(source, rob.original, dtype=model.get("dtype", "float32")).requires_grad_(False).eval()
            row = rob.run(unet, label=label)
            row["settings"] = rob.settings
            write_atomic(cache, json.dumps(row, indent=1, default=str))
        columns[label] = {title: row.get(k) for k, title in COLUMNS.items()}
    return columns
