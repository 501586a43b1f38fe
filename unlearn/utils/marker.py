"""The marker of a finished run: `<run_dir>/DONE`, written last, holding the hash of the run's config.

The hash is of the config as composed, interpolations left unresolved, minus the keys in UNHASHED. Unresolved on
purpose: every interpolation in the config points either at a hashed key (`eval.clip: ${model.clip}` — the value
enters through `model.clip`) or at where the run lives (`data.cache_dir: ${paths.cache}`), and a resolved hash
would make the same run's hash differ between two checkouts or cache folders. It is the comparison the resume
check makes too (unlearn.validate.config_diff).

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
# Keys added after runs were made, whose default keeps a run's hash (and its resume check) as it was without them.
DEFAULTED = {"export": "pipeline"}
# Method keys added the same way (conf/adapter/default.yaml): left out while no adapter is on, where they do nothing.
ADAPTER_KEYS = ("adapter", "lora")


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the composed config (unresolved), without the keys that say where a run lives or how it shows."""
    from unlearn.models.fingerprint import sha_of  # imports torch: not before a bad command line is refused

    return sha_of(hashed(OmegaConf.to_container(cfg, resolve=False)))


def hashed(data: dict) -> dict:
    """The part of a config (as plain Python) that the hash and the resume check read."""
    out = {k: v for k, v in data.items() if k not in UNHASHED and not is_default(k, v)}
    method = out.get("method")
    if isinstance(method, dict) and method.get("adapter", "none") == "none":
        out["method"] = {k: v for k, v in method.items() if k not in ADAPTER_KEYS}
    return out


def is_default(key: str, value) -> bool:
    """A DEFAULTED key at its default: left out of the hash and of the resume check's diff."""
    return key in DEFAULTED and value == DEFAULTED[key]


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


def where_things_are(run_dir: str | Path) -> str:
    """The finished run's folder and what a user opens next, one line each (printed at the end of `train`)."""
    run_dir = Path(run_dir)
    try:
        shown = run_dir.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = run_dir
    eval_dir = shown / "eval"
    rows = [("run folder", f"{shown}/  (resolved config in .hydra/, logs, checkpoints/, DONE)")]
    if (run_dir / "pipeline").is_dir():
        rows.append(("pipeline", f"{shown / 'pipeline'}/  (StableDiffusionPipeline.from_pretrained)"))
    if (run_dir / "delta.safetensors").is_file():
        rows.append(("delta", f"{shown / 'delta.safetensors'}  (unlearn.load_pipeline(<base model>, <this file>))"))
    if (run_dir / "eval" / "table.md").exists():
        rows.append(("table", f"{eval_dir / 'table.md'}, table.csv, metrics.json"))
    if (run_dir / "eval" / "i2p_table.md").exists():
        rows.append(("NudeNet on I2P", f"{eval_dir / 'i2p_table.md'}, i2p.json, i2p_nudenet.png"))
    grids = sorted(p.name for p in (run_dir / "eval").glob("grid_*.png"))
    if grids:
        rows.append(("grids", f"{eval_dir}/{{{','.join(g[:-4] for g in grids)}}}.png" if len(grids) > 1
                     else str(eval_dir / grids[0])))
    width = max(len(k) for k, _ in rows)
    return "where things are:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
