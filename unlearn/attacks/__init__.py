"""Attacks on an erased model, one module per attack (`unlearn/attacks/<name>.py`) and one config per attack
(`conf/attack/<name>.yaml`, chosen with `attack=<name>`; `_target_` names the class). The interface is
`unlearn.attacks.base.Attack`; prompts, sampling and the detector's check are shared (`unlearn.attacks.common`);
`unlearn.attacks.runner.Robustness` runs an attack over a concept's prompts for one model after another.

An attack's config also holds the runner's keys (`RUNNER_KEYS`: how many prompts, whether only prompts the
original model shows the concept for are attacked, the first image seed), which every attack shares.
"""

from __future__ import annotations

from collections.abc import Mapping

from unlearn.attacks.base import Attack, AttackResult, Reference

RUNNER_KEYS = ("num_prompts", "filter_references", "seed")

__all__ = ["RUNNER_KEYS", "Attack", "AttackResult", "Reference", "attack_class", "build_attack",
           "check_attack_config"]


def attack_class(cfg: Mapping) -> type[Attack]:
    target = cfg.get("_target_")
    if not target:
        raise ValueError("attack._target_ is missing: choose an attack with attack=<name> (conf/attack/)")
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - hydra wraps ImportError/AttributeError alike
        raise ValueError(f"attack._target_={target}: not an importable class ({type(e).__name__})") from None
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        # a bad config value, so ValueError: the entry points answer it with one line and exit 2
        raise ValueError(f"attack._target_={target}: not a subclass of unlearn.attacks.base.Attack")  # noqa: TRY004
    return cls


def check_attack_config(cfg: Mapping, kind: str | None = None) -> dict:
    """The attack's config validated (the runner's keys and the attack's own), defaults by concept kind resolved;
    a ValueError naming the bad value, before any model loads."""
    out = dict(cfg)
    v = out.get("num_prompts")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"attack.num_prompts={v!r} must be an integer >= 1")
    cls = attack_class(out)
    own = cls.check_config({k: v for k, v in out.items() if k not in RUNNER_KEYS and k != "_target_"}, kind)
    return {**out, **own}


def build_attack(cfg: Mapping) -> Attack:
    """The attack of a config checked by `check_attack_config`."""
    return attack_class(cfg)(**{k: v for k, v in cfg.items() if k not in RUNNER_KEYS and k != "_target_"})
