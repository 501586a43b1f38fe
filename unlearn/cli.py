"""The command line every entry point shares: `--help`, then every override checked before Hydra starts a run.

`preflight(argv, config_name, doc)` composes the config the entry point will run with Hydra's compose API and
checks it whole (unlearn/validate.py), so a bad command line is refused with one line per problem and exit code 2
before anything is loaded or written (Hydra's own app would first create the run folder). Hydra's refusals of an
override (an unknown key without `+`, `+` on a key that exists, an index into a list by name, a value it cannot
parse) are said again in the project's words, with the closest valid key.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from unlearn.validate import (
    CONF_DIR,
    TRAINER_OWN,
    ConfigError,
    Problem,
    closest,
    override_problems,
    problems,
    unknown_key,
)

HELP = ("--help", "-h")
# Top-level keys a command line may add with `+` (read with cfg.get by the entry points).
OPTIONAL_TOP = ("checkpoint_every", "candidates")
PLACEHOLDER_RUN = "outputs/.check"  # paths.run_dir while checking: it is never created


# ------------------------------------------------------------------------------------------------ overrides
def split(override: str) -> tuple[str, str, str]:
    """(`+`, `++`, `~` or "", the key, the value) of one override."""
    key, _, value = override.partition("=")
    prefix = key[:len(key) - len(key.lstrip("+~"))]
    return prefix, key[len(prefix):], value


def is_group(key: str) -> bool:
    """`method`, `hydra/launcher`, `attack@robustness.attack`: a choice of config file, not a value."""
    return (CONF_DIR / key.split("@")[0]).is_dir()


def is_hydra(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def with_paths(overrides: list[str]) -> list[str]:
    """Outside a Hydra run `${hydra:runtime.*}` cannot resolve: give the paths unless the command line does."""
    keys = {split(o)[1] for o in overrides}
    extra = [] if "paths.root" in keys else [f"paths.root={os.environ.get('UNLEARN_ROOT', os.getcwd())}"]
    extra += [] if "paths.run_dir" in keys else [f"paths.run_dir={PLACEHOLDER_RUN}"]
    return [*extra, *overrides]


def compose(config_name: str, overrides: list[str], hydra_node: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=hydra_node)


def lookup(cfg, key: str):
    """(the node holding the last part of `key`, the last part, a Problem when a part on the way is wrong)."""
    from omegaconf import DictConfig, ListConfig

    parts, node = key.split("."), cfg
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[:i + 1])
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                return None, part, list_problem(".".join(parts[:i]), key)
            node = node._get_node(int(part))
        elif isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
        else:
            near = closest(part, [str(k) for k in node]) if isinstance(node, DictConfig) else ""
            hint = f"; did you mean {here.rpartition('.')[0] + '.' if '.' in here else ''}{near}?" if near else ""
            return None, part, Problem(here, "?", f"{here} is no group or key of the config{hint}")
    if isinstance(node, ListConfig) and not parts[-1].isdigit():
        return None, parts[-1], list_problem(".".join(parts[:-1]), key)
    return node, parts[-1], None


def list_problem(list_key: str, key: str) -> Problem:
    rest = key[len(list_key) + 1:].split(".", 1)[-1]
    return Problem(key, "?", f"{list_key} is a list, one entry per item: name the entry, e.g. {list_key}.0.{rest}")


def has_target(cfg, key: str) -> bool:
    """Whether `key` sits in a node built from a `_target_`: that class's signature says what it takes."""
    from omegaconf import DictConfig

    parts = key.split(".")
    for i in range(1, len(parts)):
        node, _, bad = lookup(cfg, ".".join(parts[:i]) + ".x")
        if bad is None and isinstance(node, DictConfig) and "_target_" in node:
            return True
    return False


def key_problem(base, override: str) -> Problem | None:
    """What is wrong with one value override against the config it will change (`base`), or None."""
    from omegaconf import DictConfig

    prefix, key, value = split(override)
    if not key or is_group(key) or is_hydra(key):
        return None
    node, last, bad = lookup(base, key)
    if bad is not None:
        return Problem(f"{prefix}{key}", value, bad.allowed)
    exists = isinstance(node, DictConfig) and last in node or not isinstance(node, DictConfig)
    if prefix == "+" and exists:
        return Problem(f"+{key}", value, f"{key} is already set: drop the + ({key}={value})")
    if exists or prefix == "~":
        return None if exists else Problem(f"~{key}", value, "no such key to delete")
    if prefix in ("+", "++") and ("." not in key and key in OPTIONAL_TOP or has_target(base, key)):
        return None  # read with cfg.get / checked against its class's signature
    known = [str(k) for k in node if not str(k).startswith("_")] if isinstance(node, DictConfig) else []
    target = node.get("_target_") if isinstance(node, DictConfig) and "_target_" in node else None
    takes = class_settings(str(target)) if target else []
    owner = str(target).rsplit(".", 1)[-1] if target else key.rpartition(".")[0] or "the config"
    near = closest(last, known + [t for t in takes if t not in known])
    if key.startswith("trainer.") and near in TRAINER_OWN:
        return Problem(key, value, f"not a setting of {owner}; did you mean trainer.{near}? unlearn.train sets it: "
                       f"use {TRAINER_OWN[near]}")
    if near and near not in known:  # the class takes it, the config does not hold it: it is added with +
        parent = key.rpartition(".")[0]
        return Problem(key, value, f"not a setting of {owner}; did you mean +{parent}.{near}?")
    return unknown_key(key, value, known, owner)


def class_settings(target: str) -> list[str]:
    """The keyword settings a `_target_` class takes, or [] when it cannot be imported."""
    from unlearn.validate import init_parameters, target_class

    try:
        params, _ = init_parameters(target_class(target))
    except Exception:  # noqa: BLE001 - the run's own validation names a bad _target_
        return []
    return [n for n in params if n not in ("self", "components")]


def parse_problems(overrides: list[str]) -> list[Problem]:
    """Overrides Hydra's grammar cannot parse, each in one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), []
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except Exception as e:  # noqa: BLE001 - Hydra's parser raises its own exception types
            message = str(e).strip().splitlines()[0]
            out.append(Problem(o.partition("=")[0] or o, o.partition("=")[2] or "?",
                               f"not an override Hydra can parse ({message}); write key=value, lists as [a,b]"))
    return out


def compose_checked(config_name: str, overrides: list[str]):
    """(the composed config or None, the problems of the command line itself)."""
    found = parse_problems(overrides)
    if found:
        return None, found
    full = with_paths(overrides)
    choices = [o for o in full if is_group(split(o)[1]) or is_hydra(split(o)[1])]
    try:
        base = compose(config_name, choices)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors
        return None, [Problem("command line", " ".join(choices), first_line(e))]
    found = [p for p in (key_problem(base, o) for o in full if o not in choices) if p is not None]
    if found:
        return None, found
    try:
        return compose(config_name, full), []
    except Exception as e:  # noqa: BLE001 - anything the checks above did not foresee: still one line
        return None, [Problem("command line", " ".join(overrides), first_line(e))]


def first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


# ------------------------------------------------------------------------------------------------ FID features
def fid_fallback(cfg, overrides: list[str]) -> list[str]:
    """Inception FID (SD-1.4's default) needs the `fid` extra. Without it and without an explicit choice, measure
    FID on CLIP features and say so: a missing optional extra should not stop the real-model path."""
    from omegaconf import OmegaConf

    keys = {split(o)[1] for o in overrides}
    if OmegaConf.select(cfg, "eval.fid_feature", default=None) != "inception" or cfg.get("evaluate") is False \
            or keys & {"eval.fid_feature", "model.fid_feature"} or importlib.util.find_spec("torch_fidelity"):
        return []
    print('warning: FID on CLIP features (eval.fid_feature=clip): Inception FID needs the fid extra, '
          'pip install -e ".[fid]"', file=sys.stderr)
    OmegaConf.update(cfg, "eval.fid_feature", "clip")
    return ["eval.fid_feature=clip"]


# ------------------------------------------------------------------------------------------------ --help
def choices_of(group: str) -> list[str]:
    root = CONF_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def help_text(prog: str, config_name: str, doc: str) -> str:
    """Usage (the entry point's docstring), then every config group with its choices, the default marked *."""
    cfg = compose(config_name, with_paths([]), hydra_node=True)
    defaults = {k: v for k, v in cfg.hydra.runtime.choices.items() if not is_hydra(k)}
    lines = [(doc or "").strip().split("\n\n")[0], "", f"usage: python -m {prog} [group=choice ...] [key=value ...] [+new_key=value]",
             "", "groups (* = default):"]
    for group in sorted({k.split("@")[0] for k in defaults}):
        chosen = {v for k, v in defaults.items() if k.split("@")[0] == group}
        names = [c + ("*" if c in chosen else "") for c in choices_of(group)]
        lines.append(f"  {group:<11} {' | '.join(names)}")
    lines += ["", "Any key of the composed config is a key=value override (e.g. method.lam=0.5, seed=1);",
              "every value is checked before any model loads: one line per bad value, exit code 2.",
              "Hydra's own flags: --cfg job (print the config), -m (a sweep), --hydra-help."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the entry
def refuse(found: list[Problem]) -> None:
    for p in found:
        print(f"error: {p}", file=sys.stderr)
    sys.exit(2)


def preflight(argv: list[str], config_name: str, prog: str, doc: str = "") -> list[str]:
    """The overrides to run with: `--help` answered, every problem refused (exit 2), fallbacks added."""
    from unlearn.utils import resolvers

    resolvers.register()
    if any(a in HELP for a in argv):
        print(help_text(prog, config_name, doc))
        sys.exit(0)
    # `+resume=` was the spelling before `resume` was a key of train.yaml; Hydra refuses `+` for an existing key.
    argv = [a[1:] if a.startswith("+resume=") else a for a in argv]
    found = override_problems(argv)
    if found or any(a.startswith("-") for a in argv):
        # Hydra's own flags (-m, --cfg, --info, ...): a sweep's jobs are checked one by one as they start.
        return refuse(found) if found else argv
    cfg, found = compose_checked(config_name, argv)
    extra = [] if found else fid_fallback(cfg, argv)
    if not found:
        try:
            found = problems(cfg, reach=True)
        except ConfigError as e:
            found = e.problems
    if found:
        refuse(found)
    return [*argv, *extra]
