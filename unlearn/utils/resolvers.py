"""OmegaConf resolvers the configs use; `register()` runs when unlearn.train is imported."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def sweep_group() -> str | None:
    """The sweep folder's name in a multirun (`-m`): every job of one sweep shares it, e.g. as a W&B group.
    None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(str(hc.sweep.dir)).name if hc.mode == RunMode.MULTIRUN else None


def register() -> None:
    OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
