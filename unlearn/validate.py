"""Check the whole resolved config before any model is loaded or any image generated.

Each config group with a `_target_` (method, data, eval) is checked by its own class: a classmethod
`validate_config(cfg) -> list[Problem]` next to the code it guards (`cfg` is the whole config, resolved to plain
Python, so a rule may read other groups, e.g. distill's `cw_samples=batch` needs `data.batch_size >= 2`). A class
that defines no rules still gets:

- its constructor's signature: unknown keys, and numbers/booleans where the default is a number/boolean;
- for methods, a dry construction with no model: the argument checks at the top of its `__init__` run, and the
  first use of the absent model stops it (those checks need no model and no data).

The trainer, the resume path and the top-level keys are checked here. Every problem is one line,
`<key>=<value>: <what is allowed>`; the entry points print each as `error: ...` on stderr and exit with code 2.
"""

from __future__ import annotations

import inspect
import math
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Config groups a command line selects by name (`method=distill`); Hydra's own `hydra` group is left to Hydra.
SELECTABLE_GROUPS = ("model", "concept", "method", "data", "eval", "trainer", "logger", "paths", "experiment")


@dataclass(frozen=True)
class Problem:
    key: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        return f"{self.key}={show(self.value)}: {self.allowed}"


class ConfigError(ValueError):
    """One or more bad config values; `problems` holds one `Problem` per value."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


# ------------------------------------------------------------------------------------------------ rule helpers
def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def choice(key: str, value: Any, allowed: Iterable) -> list[Problem]:
    allowed = list(allowed)
    return [] if value in allowed else [Problem(key, value, "one of " + " | ".join(show(a) for a in allowed))]


def flag(key: str, value: Any) -> list[Problem]:
    return [] if isinstance(value, bool) else [Problem(key, value, "true or false")]


def number(key: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False, optional: bool = False, hint: str = "") -> list[Problem]:
    """`value` a finite number (an integer if `integer`) within the bounds; null too if `optional`."""
    if optional and value is None:
        return []
    ok = is_number(value) and (not integer or float(value).is_integer() and not isinstance(value, float))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return []
    what = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        what += f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        what += f" {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        what += f" {'<' if hi_open else '<='} {hi}"
    return [Problem(key, value, ("null or " if optional else "") + what + hint)]


def pair(key: str, value: Any, lo: float, hi: float, hi_open: bool = True) -> list[Problem]:
    """Two numbers in [lo, hi) (e.g. Adam's betas)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and \
            not any(number(key, v, lo, hi, hi_open=hi_open) for v in value):
        return []
    return [Problem(key, value, f"two numbers in [{lo}, {hi}{')' if hi_open else ']'}")]


def signature_problems(prefix: str, group: dict, cls: type, skip: Iterable[str] = ("components",)) -> list[Problem]:
    """Keys `cls.__init__` does not take, and values of the wrong kind where its default says the kind."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return []
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [n for n in params if n not in ("self", *skip)]
    out = []
    for key, value in group.items():
        if key.startswith("_"):  # _target_, _partial_, _convert_
            continue
        if key not in params:
            if not takes_any:
                out.append(Problem(f"{prefix}.{key}", value, f"not a setting of {cls.__name__}; it takes "
                                   + ", ".join(known)))
            continue
        default, note = params[key].default, str(params[key].annotation)
        if value is None and ("None" in note or "Optional" in note):  # `x: float | None = 1e-4`
            continue
        if isinstance(default, bool):
            out += flag(f"{prefix}.{key}", value)
        elif isinstance(default, int):
            out += number(f"{prefix}.{key}", value, integer=True)
        elif isinstance(default, float):
            out += number(f"{prefix}.{key}", value)
    return out


def dry_construct(cls: type, group: dict, name: str) -> list[Problem]:
    """Run a method's own argument checks without a model: they raise ValueError before the model is touched."""
    kwargs = {k: v for k, v in group.items() if not k.startswith("_")}
    try:
        cls(components=None, **kwargs)
    except ValueError as e:
        return [Problem("method", name, str(e))]
    except Exception:  # noqa: BLE001 - the absent model stopped it past its checks: nothing to report
        return []
    return []


# ------------------------------------------------------------------------------------------------ groups
def target_class(target: str):
    from hydra.utils import get_class

    return get_class(target)


def group_problems(cfg: dict, group: str) -> list[Problem]:
    node = cfg.get(group)
    if not isinstance(node, dict) or "_target_" not in node:
        return []
    try:
        cls = target_class(node["_target_"])
    except Exception as e:  # noqa: BLE001 - hydra wraps ImportError/AttributeError alike
        return [Problem(f"{group}._target_", node["_target_"], f"an importable class ({type(e).__name__})")]
    out = signature_problems(group, node, cls)
    if hasattr(cls, "validate_config"):
        named = {p.key for p in out}  # one line per bad value: the signature's finding wins
        out += [p for p in cls.validate_config(cfg) if p.key not in named]
    if group == "method" and not out:
        out += dry_construct(cls, node, str(node.get("name", node["_target_"])))
    return out


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("32-true", "32", 32, "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64", 64,
              "transformer-engine")


def trainer_problems(cfg: dict) -> list[Problem]:
    t = cfg.get("trainer") or {}
    out = choice("trainer.accelerator", t.get("accelerator", "auto"), ACCELERATORS)
    out += choice("trainer.precision", t.get("precision", "32-true"), PRECISIONS)
    devices = t.get("devices", "auto")
    ok = devices == "auto" or devices == -1 or (is_number(devices) and isinstance(devices, int) and devices >= 1) \
        or (isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices)) \
        or (isinstance(devices, str) and re.fullmatch(r"-1|\d+|(\d+,)+\d*", devices) and devices != "0")
    if not ok:
        out.append(Problem("trainer.devices", devices, "auto, -1 (all), an integer >= 1 or a list of device ids"))
    if t.get("accelerator") in ("gpu", "cuda"):
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            out.append(Problem("trainer.accelerator", t["accelerator"], "cpu or auto: this machine has no CUDA "
                               "device"))
        elif isinstance(devices, int) and devices > n:
            out.append(Problem("trainer.devices", devices, f"at most {n} (the CUDA devices of this machine) or -1"))
    if "log_every_n_steps" in t:
        out += number("trainer.log_every_n_steps", t["log_every_n_steps"], 1, integer=True)
    if t.get("deterministic") not in (True, False, "warn", None):
        out.append(Problem("trainer.deterministic", t["deterministic"], "true, false or warn"))
    return out


def top_problems(cfg: dict) -> list[Problem]:
    out = number("seed", cfg.get("seed", 0), 0, integer=True)
    out += number("eval_every", cfg.get("eval_every", 0), 0, integer=True, hint=" (0 = before/after only)")
    if "checkpoint_every" in cfg:
        out += number("checkpoint_every", cfg["checkpoint_every"], 1, integer=True)
    for key in ("prepare", "evaluate"):
        if key in cfg:
            out += flag(key, cfg[key])
    for key, group in (("methods", "method"), ("concepts", "concept")):  # compare / sequential lists
        values = cfg.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or not values:
            out.append(Problem(key, values, f"a non-empty list of {group} names"))
            continue
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        out += [Problem(key, v, f"each one of {' | '.join(known)}") for v in values if v not in known]
    return out


def concept_problems(cfg: dict) -> list[Problem]:
    from unlearn.data.concepts import ConceptError, load_concept

    node = cfg.get("concept")
    if node is None:
        return []
    try:
        load_concept(node)
    except ConceptError as e:
        return [Problem("concept", node.get("name", "?") if isinstance(node, dict) else node, str(e))]
    return []


def resume_problems(cfg: dict, raw_cfg=None) -> list[Problem]:
    """`resume` is a run folder (its checkpoints/last.ckpt) or a .ckpt file, whole, of this same config."""
    resume = cfg.get("resume")
    if resume in (None, ""):
        return []
    path = Path(str(resume))
    allowed = "a run folder holding checkpoints/last.ckpt, or a .ckpt file"
    if path.is_dir():
        if (path / "DONE").exists():
            return []  # finished: train.run reports it and trains nothing
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            return [Problem("resume", resume, f"{allowed}; this folder has no checkpoints/last.ckpt (the run "
                                              "stopped before its first checkpoint: start it again)")]
    elif path.is_file():
        ckpt = path
    else:
        return [Problem("resume", resume, f"{allowed}; nothing exists there")]
    if not zipfile.is_zipfile(ckpt):  # torch.save writes a zip archive; a cut-off file is not one
        return [Problem("resume", resume, f"a whole checkpoint; {ckpt} is not a readable torch checkpoint")]
    run_dir = ckpt.parent.parent
    saved = run_dir / ".hydra" / "config.yaml"
    if raw_cfg is not None and saved.exists():
        diff = config_diff(saved, raw_cfg)
        if diff:
            return [Problem("resume", resume, "a run of this same config; it differs in " + "; ".join(diff[:6]))]
    return []


def config_diff(saved: Path, raw_cfg) -> list[str]:
    """Hashed keys (see unlearn.utils.marker) whose values differ between a saved config and `raw_cfg`."""
    from omegaconf import OmegaConf

    from unlearn.utils.marker import UNHASHED

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if prefix == "" and k in UNHASHED:
                continue
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    old = flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    new = flat(OmegaConf.to_container(raw_cfg, resolve=False))
    return [f"{k}: {show(old.get(k, '<absent>'))} -> {show(new.get(k, '<absent>'))}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------------------ entry points
def resolve_groups(cfg) -> tuple[dict, list[Problem]]:
    """The config as plain Python, one top-level key at a time, so that one broken interpolation is one problem."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    plain, out = {}, []
    for key in cfg:
        if key == "hydra":
            continue
        try:
            node = cfg[key]
            plain[key] = OmegaConf.to_container(node, resolve=True) \
                if isinstance(node, (DictConfig, ListConfig)) else node
        except Exception as e:  # noqa: BLE001 - omegaconf raises several interpolation errors
            out.append(Problem(str(key), "<unresolvable>", str(e).splitlines()[0]))
    return plain, out


def problems(cfg) -> list[Problem]:
    plain, out = resolve_groups(cfg)
    out += top_problems(plain)
    out += concept_problems(plain)
    for group in ("method", "data", "eval"):
        if group == "eval" and plain.get("evaluate") is False:
            continue
        out += group_problems(plain, group)
    out += trainer_problems(plain)
    out += resume_problems(plain, cfg)
    return out


def validate(cfg) -> None:
    """Raise ConfigError listing every bad value of `cfg` (a composed DictConfig)."""
    found = problems(cfg)
    if found:
        raise ConfigError(found)


def override_problems(argv: list[str], conf_dir: Path = CONF_DIR) -> list[Problem]:
    """Group choices on a command line (`method=foo`) that name no config file: Hydra's own error for them is
    several lines and exit code 1; this says it in one line, before Hydra composes anything."""
    out = []
    for arg in argv:
        m = re.fullmatch(r"\+{0,2}([A-Za-z_]\w*)=(.*)", arg)
        if not m or m.group(1) not in SELECTABLE_GROUPS or not (conf_dir / m.group(1)).is_dir():
            continue
        group, values = m.group(1), m.group(2)
        known = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for value in values.split(","):  # a multirun sweep: method=a,b
            value = value.strip()
            if value and value != "null" and value not in known and not value.startswith(("${", "choice(",
                                                                                           "range(", "glob(")):
                out.append(Problem(group, value, "one of " + " | ".join(known)))
    return out
