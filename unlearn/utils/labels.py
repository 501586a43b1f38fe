"""The row name of a model given as a folder, shared by `evaluate` and `attack`."""

from __future__ import annotations

import re
from pathlib import Path


def pipeline_label(path) -> str:
    """A pipeline folder's run: `runs/esd_x/pipeline` -> esd_x, or the folder above when the run folder is a Hydra
    time stamp (`toy_stripes-cdc_cpg/2026-11-25_10-00-00/pipeline` -> toy_stripes-cdc_cpg); a run's delta
    (`runs/esd_x/delta.safetensors`) and a run folder itself likewise; other paths as given."""
    p = Path(str(path))
    if p.name in ("pipeline", "delta.safetensors"):
        run = p.parent
    elif (p / "pipeline").is_dir() or (p / "delta.safetensors").is_file():
        run = p
    else:
        return str(path)
    return run.parent.name if re.fullmatch(r"[\d_:.-]+", run.name) else run.name
