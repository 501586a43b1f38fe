"""The row name of a model given as a folder, shared by `evaluate` and `attack`."""

from __future__ import annotations

import re
from pathlib import Path

RUN_FILES = ("delta.safetensors", "spm.safetensors")  # what a run folder may hold instead of pipeline/


def pipeline_label(path) -> str:
    """A pipeline folder's run: `runs/esd_x/pipeline` -> esd_x, or the folder above when the run folder is a Hydra
    time stamp (`toy_stripes-cdc_cpg/2026-11-25_10-00-00/pipeline` -> toy_stripes-cdc_cpg) and the method with its
    seed for one of compare's seed folders (`runs/esd_x/seed1` -> esd_x-seed1); a run's delta or SPM adapter
    (`runs/esd_x/delta.safetensors`) and a run folder itself likewise; other paths as given."""
    p = Path(str(path))
    if p.name in ("pipeline", *RUN_FILES):
        run = p.parent
    elif (p / "pipeline").is_dir() or any((p / f).is_file() for f in RUN_FILES):
        run = p
    else:
        return str(path)
    if re.fullmatch(r"seed\d+", run.name):
        return f"{run.parent.name}-{run.name}"
    return run.parent.name if re.fullmatch(r"[\d_:.-]+", run.name) else run.name
