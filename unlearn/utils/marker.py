"""The marker of a finished run: `<run_dir>/DONE`, written last, holding the hash of the resolved config.

A run folder without it (killed, crashed, still running) never counts as finished; `compare` reuses a run only
when its marker's hash equals the hash of the config it would run now.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from unlearn.utils.files import write_atomic

MARKER = "DONE"
# Keys that say where a run lives or how it is shown, not what it computes: they do not enter the hash.
UNHASHED = ("paths", "run_name", "logger", "hydra", "resume")


def config_hash(cfg: DictConfig) -> str:
    from unlearn.models.fingerprint import sha_of  # imports torch: not before a bad command line is refused

    data = OmegaConf.to_container(cfg, resolve=False)
    return sha_of({k: v for k, v in data.items() if k not in UNHASHED})


def write_done(run_dir: str | Path, cfg: DictConfig, **extra) -> Path:
    path = Path(run_dir) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"config_hash": config_hash(cfg), **extra}, indent=2))
    return path


def read_done(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / MARKER
    return json.loads(path.read_text()) if path.exists() else None


def is_done(run_dir: str | Path, cfg: DictConfig) -> bool:
    done = read_done(run_dir)
    return done is not None and done.get("config_hash") == config_hash(cfg)
