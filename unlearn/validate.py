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
SELECTABLE_GROUPS = ("model", "concept", "method", "data", "eval", "trainer", "logger", "paths", "experiment", "speed",
                     "attack", "recipes")


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


def closest(key: str, known: Iterable[str]) -> str:
    """The known name nearest to a misspelt one, for "did you mean"; "" when none is near."""
    import difflib

    found = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return found[0] if found else ""


def unknown_key(key: str, value: Any, known: Iterable[str], owner: str) -> Problem:
    """`<prefix>.<name>` is not a setting: name the closest setting, then every one."""
    known = list(known)
    prefix, _, name = key.rpartition(".")
    near = closest(name, known)
    if near:
        return Problem(key, value, f"not a setting of {owner}; did you mean {prefix + '.' if prefix else ''}{near}?")
    return Problem(key, value, f"not a setting of {owner}; it takes " + ", ".join(known))


def init_parameters(cls: type) -> tuple[dict, bool]:
    """(parameters of `cls.__init__`, whether it takes any keyword). A project class whose `**kwargs` go on to its
    base (RECE's `**uce` to UCE) takes the base's parameters too, and no others; a third-party `**kwargs` stays
    open (a logger's go to its library)."""
    params: dict = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            own = inspect.signature(klass.__init__).parameters
        except (TypeError, ValueError):
            return params, True
        params.update({n: p for n, p in own.items() if n not in params and p.kind not in
                       (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)})
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in own.values()):
            return params, False
        if not klass.__module__.startswith("unlearn."):
            return params, True
    return params, False


def signature_problems(prefix: str, group: dict, cls: type, skip: Iterable[str] = ("components",)) -> list[Problem]:
    """Keys `cls.__init__` does not take, and values of the wrong kind where its default says the kind."""
    params, takes_any = init_parameters(cls)
    params = {**params, **getattr(cls, "shared_parameters", dict)()}  # a method's adapter keys (methods/base.py)
    return parameter_problems(prefix, group, params, takes_any, cls.__name__, skip)


def parameter_problems(prefix: str, group: dict, params: dict, takes_any: bool, owner: str,
                       skip: Iterable[str] = ()) -> list[Problem]:
    known = [n for n in params if n not in ("self", *skip)]
    out = []
    for key, value in group.items():
        if key.startswith("_"):  # _target_, _partial_, _convert_
            continue
        if key not in params:
            if not takes_any:
                out.append(unknown_key(f"{prefix}.{key}", value, known, owner))
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
    except TypeError as e:  # a keyword the signature check could not see
        if "keyword" in str(e):
            return [Problem("method", name, str(e).splitlines()[0])]
        return []
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
    if group == "method" and (refused := sdxl_method_problems(cfg, cls, node)):
        return refused
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


# Trainer keys train.build_trainer sets itself: a value given for them would be silently replaced.
TRAINER_OWN = {"max_steps": "method.steps", "max_epochs": "method.steps", "logger": "logger=<csv|wandb|...>",
               "callbacks": "checkpoint_every", "default_root_dir": "hydra.run.dir"}


def trainer_key_problems(cfg: dict) -> list[Problem]:
    """Keys lightning.Trainer does not take (a `+trainer.` typo), and those the entry point sets itself."""
    t = cfg.get("trainer")
    if not isinstance(t, dict) or "_target_" not in t:
        return []
    out = [Problem(f"trainer.{k}", t[k], f"set by unlearn.train; use {TRAINER_OWN[k]}") for k in t if k in TRAINER_OWN]
    rest = {k: v for k, v in t.items() if k not in TRAINER_OWN}
    try:
        cls = target_class(t["_target_"])
    except Exception as e:  # noqa: BLE001 - hydra wraps ImportError/AttributeError alike
        return out + [Problem("trainer._target_", t["_target_"], f"an importable class ({type(e).__name__})")]
    params, takes_any = init_parameters(cls)
    return out + parameter_problems("trainer", rest, params, takes_any, cls.__name__)


def conf_keys(group: str) -> list[str]:
    """Every key the files of a config group define (conf/<group>/*.yaml): the keys a config of it may hold."""
    from omegaconf import OmegaConf

    keys: dict = {}
    for f in sorted((CONF_DIR / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(f))
        keys.update(dict.fromkeys(node.get(group, node) if "@package _global_" in f.read_text() else node))
    return list(keys)


DTYPES = ("float32", "float16", "bfloat16")
TOY_MODELS = ("toy", "toy2")  # the built-in worlds' names (unlearn/toy/__init__.py)


def is_local(path: str) -> bool:
    """A folder rather than a Hub id (the same rule load_components uses)."""
    from unlearn.models.loading import _looks_local, resolve_path

    return path in TOY_MODELS or _looks_local(resolve_path(path))


def model_problems(cfg: dict) -> list[Problem]:
    m = cfg.get("model")
    if not isinstance(m, dict):
        return []
    known = conf_keys("model")
    out = [unknown_key(f"model.{k}", v, known, "the model config") for k, v in m.items() if k not in known]
    for key in ("name", "path", "clip"):
        if key in m and not (isinstance(m[key], str) and m[key]):
            out.append(Problem(f"model.{key}", m[key], "a non-empty string"))
    out += choice("model.dtype", m.get("dtype", "float32"), DTYPES)
    if m.get("family") == "sdxl" and m.get("dtype") == "float16":  # diffusers upcasts it to decode; unlearn does not
        out.append(Problem("model.dtype", "float16", "bfloat16 or float32 for SDXL: its VAE overflows in float16"))
    out += number("model.sample_steps", m.get("sample_steps", 1), 1, integer=True)
    out += number("model.guidance_scale", m.get("guidance_scale", 1.0), 0)
    folder = model_folder_problems(m)
    out += folder
    if not folder:
        out += family_problems(m) or prediction_problems(m)  # a folder of the wrong family: that line alone
    revision = m.get("revision")
    if revision is not None:
        if not isinstance(revision, str) or not revision.strip():
            out.append(Problem("model.revision", revision, "null, or a Hub branch, tag or commit"))
        elif isinstance(m.get("path"), str) and is_local(m["path"]):
            out.append(Problem("model.revision", revision, f"null: model.path={m['path']} is a local folder "
                               "and a revision names a version of a Hub id"))
    return out


def model_folder_problems(m: dict) -> list[Problem]:
    """A local `model.path` must be a pipeline folder, a local `model.clip` a folder: found now, not after the
    run folder is made."""
    from unlearn.models.loading import ModelLoadError, check_folder, resolve_path

    out = []
    path, clip = m.get("path"), m.get("clip")
    if isinstance(path, str) and path and is_local(path):
        try:
            check_folder(resolve_path(path))
        except ModelLoadError as e:
            out.append(Problem("model.path", path, f"a pipeline folder or a Hub id; {e}"))
    if isinstance(clip, str) and clip and clip not in TOY_MODELS and is_local(clip) and not Path(clip).expanduser().is_dir():
        out.append(Problem("model.clip", clip, "toy, a CLIP folder or a Hub id; no folder is there"))
    return out


SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def scheduler_prediction(m: dict) -> str | None:
    """The `prediction_type` the model's scheduler config states (diffusers' default, epsilon, when it states
    none): read from a local folder, or from the Hugging Face cache for a Hub id; None when it cannot be read now
    (a Hub id not cached yet, an unreadable file: the loader names those)."""
    import json

    from unlearn.models.loading import resolve_path

    path = m.get("path")
    if not isinstance(path, str) or not path:
        return None
    if is_local(path):
        file = Path(resolve_path(path)).expanduser() / SCHEDULER_CONFIG
    else:
        import huggingface_hub as hub

        cached = hub.try_to_load_from_cache(path, SCHEDULER_CONFIG, revision=m.get("revision"))
        file = Path(cached) if isinstance(cached, str) else None
    try:
        return json.loads(file.read_text()).get("prediction_type", "epsilon") if file else None
    except (OSError, ValueError, AttributeError):
        return None


def prediction_problems(m: dict) -> list[Problem]:
    """The model must predict ε or v (the losses see ε either way: unlearn/models/prediction.py), and what the
    model config expects (`model.prediction_type`, e.g. v_prediction for sd2_v) must be what its scheduler says."""
    from unlearn.models.prediction import PREDICTION_TYPES

    expected = m.get("prediction_type")
    if expected is not None and expected not in PREDICTION_TYPES:
        return choice("model.prediction_type", expected, (None, *PREDICTION_TYPES))
    found = scheduler_prediction(m)
    if found is None or found == expected:
        return []
    said = f"its scheduler predicts {found} ({SCHEDULER_CONFIG}: prediction_type)"
    if found not in PREDICTION_TYPES:
        return [Problem("model.path", m["path"], f"{said}; supported: {' | '.join(PREDICTION_TYPES)}")]
    if expected is None:
        return []
    families = conf_values("model", "family")  # only configs of the folder's own family (SD or SDXL) fit it
    fitting = [n for n, v in conf_values("model", "prediction_type").items()
               if v == found and families.get(n, "sd") == m.get("family", "sd")]
    use = f"; use model={' or model='.join(fitting)} for it" if fitting else ""
    return [Problem("model.path", m["path"], f"{said}, but model={m.get('name')} expects {expected}{use}")]


FAMILIES = ("sd", "sdxl")  # `model.family`: one text encoder, or SDXL's two (unlearn/models/sdxl.py)


def family_of(cfg: dict) -> str:
    m = cfg.get("model")
    return m.get("family", "sd") if isinstance(m, dict) else "sd"


def family_problems(m: dict) -> list[Problem]:
    """The folder must be of the family the model config is for: an SD folder read as SDXL (or the reverse) would
    load the wrong components. Read from a folder's model_index.json, or a cached Hub id's; else left to loading."""
    from unlearn.models import sdxl
    from unlearn.models.loading import resolve_path

    expected, path = m.get("family", "sd"), m.get("path")
    if expected not in FAMILIES:
        return choice("model.family", expected, FAMILIES)
    if not isinstance(path, str) or not path:
        return []
    if is_local(path):
        found = "sdxl" if sdxl.is_sdxl_folder(resolve_path(path)) else "sd"
    else:
        name = sdxl.pipeline_class(path, m.get("revision"), cached_only=True)
        found = None if name is None else "sdxl" if name == sdxl.PIPELINE_CLASS else "sd"
    if found in (None, expected):
        return []
    if expected == "sdxl":
        return [Problem("model.path", path, f"an SDXL pipeline folder ({sdxl.PIPELINE_CLASS}, with text_encoder_2/ "
                        f"and tokenizer_2/) for model={m.get('name')}; this one is a Stable Diffusion folder with one "
                        "text encoder: use model=sd14 (or sd2, sd2_v) for it")]
    return [Problem("model.path", path, f"a Stable Diffusion pipeline folder for model={m.get('name')}; this one is "
                    f"SDXL ({sdxl.PIPELINE_CLASS}): use model=sdxl for it")]


def sdxl_method_problems(cfg: dict, cls, node: dict) -> list[Problem]:
    """A method that cannot apply to SDXL says why (`sdxl_refusal`), refused by name before anything loads."""
    reason = getattr(cls, "sdxl_refusal", None)
    if family_of(cfg) != "sdxl" or not reason:
        return []
    return [Problem("method", node.get("name", node["_target_"]), f"cannot run on model=sdxl: {reason}")]


def conf_values(group: str, key: str) -> dict:
    """{file name: the value its own node sets for `key`} over conf/<group>/*.yaml (inherited values left out)."""
    from omegaconf import OmegaConf

    return {f.stem: node[key] for f in sorted((CONF_DIR / group).glob("*.yaml"))
            if key in (node := OmegaConf.to_container(OmegaConf.load(f)))}


def speed_problems(cfg: dict) -> list[Problem]:
    """conf/speed's switches against apply_speed's own signature (they are passed to it as keywords)."""
    s = cfg.get("speed")
    if not isinstance(s, dict):
        return []
    from unlearn.methods.speed import ATTENTION, apply_speed

    params = dict(inspect.signature(apply_speed).parameters)
    out = parameter_problems("speed", s, params, False, "speed", skip=("unet", "trainable"))
    named = {p.key for p in out}
    out += [p for p in choice("speed.attention", s.get("attention", "sdpa"), ATTENTION) if p.key not in named]
    out += [p for p in choice("speed.compile_mode", s.get("compile_mode"), COMPILE_MODES) if p.key not in named]
    if not isinstance(s.get("compile_backend", "inductor"), str):
        out.append(Problem("speed.compile_backend", s["compile_backend"], "a torch.compile backend name"))
    return out


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Loggers' settings that their library needs as text (W&B refuses a list for a project name, late and long).
LOGGER_TEXT = ("project", "name", "save_dir", "group", "entity", "version")


def logger_problems(cfg: dict) -> list[Problem]:
    loggers = cfg.get("logger")
    if loggers in (None, [], False):
        return []
    if not isinstance(loggers, list) or not all(isinstance(lg, dict) and "_target_" in lg for lg in loggers):
        return [Problem("logger", loggers, "a list of loggers, each with a _target_ (logger=csv|tensorboard|wandb|none)")]
    out = []
    for i, lg in enumerate(loggers):
        try:
            cls = target_class(lg["_target_"])
        except Exception as e:  # noqa: BLE001 - hydra wraps ImportError/AttributeError alike
            out.append(Problem(f"logger.{i}._target_", lg["_target_"], f"an importable class ({type(e).__name__})"))
            continue
        out += signature_problems(f"logger.{i}", lg, cls)
        out += [Problem(f"logger.{i}.{k}", lg[k], "a string") for k in LOGGER_TEXT
                if lg.get(k) is not None and not isinstance(lg[k], (str, int) if k == "version" else str)]
    return out


def attack_problems(cfg: dict) -> list[Problem]:
    """unlearn.attack's groups: the attack budget, the detector, the recovery grid, the pipelines."""
    out = []
    if family_of(cfg) == "sdxl":  # the attacks edit one text encoder's input embeddings (unlearn/attacks/common.py)
        rob = cfg.get("robustness")
        asked = {"attack": cfg.get("attack"),  # compare's columns only when they are asked for
                 "robustness": rob.get("attack") if isinstance(rob, dict) and rob.get("enabled") else None}
        for key, attack in asked.items():
            if isinstance(attack, dict):
                name = str(attack.get("_target_", "?")).rsplit(".", 1)[-1]
                return [Problem(key, name, "cannot run on model=sdxl: the attacks optimise one "
                                "text encoder's token embeddings, and SDXL conditions on two")]
    if isinstance(cfg.get("attack"), dict):
        from unlearn.attacks import check_attack_config

        try:
            check_attack_config(cfg["attack"])
        except (ValueError, TypeError) as e:
            out.append(message_problem(str(e), "attack"))
    rob = cfg.get("robustness")
    if isinstance(rob, dict) and isinstance(rob.get("attack"), dict):  # compare's robustness columns
        from unlearn.attacks import check_attack_config
        from unlearn.attacks.runner import attack_configs

        try:
            attacks = attack_configs(rob["attack"], rob.get("attacks"))
        except ValueError as e:
            attacks = []
            out.append(Problem("robustness.attacks", rob.get("attacks"), str(e).removeprefix("attacks: ")))
        for attack in attacks:
            try:
                check_attack_config(attack)
            except (ValueError, TypeError) as e:
                out.append(message_problem(f"robustness.{e}", "robustness.attack"))  # its keys read attack.*
    det = cfg.get("detector")
    if isinstance(det, dict):
        from unlearn.metrics.detectors import DETECTORS

        known = conf_keys_of("attack.yaml", "detector")
        out += [unknown_key(f"detector.{k}", v, known, "the detector") for k, v in det.items() if k not in known]
        out += choice("detector.name", det.get("name", "auto"), DETECTORS)
        out += number("detector.threshold", det.get("threshold", 0.45), 0, 1)
        out += number("detector.top_k", det.get("top_k", 1), 1, integer=True)
        if det.get("name") == "hf" and not (det.get("path") and det.get("label")):
            out.append(Problem("detector.name", "hf", "needs detector.path (an image-classification folder) and "
                               "detector.label"))
    rec = cfg.get("recovery")
    if isinstance(rec, dict):
        out += flag("recovery.enabled", rec.get("enabled", True))
        psi = rec.get("psi")
        if psi is not None and not (isinstance(psi, list) and psi and not any(
                number("recovery.psi", v, 0, 1, lo_open=True, hi_open=True) for v in psi)):
            out.append(Problem("recovery.psi", psi, "a non-empty list of numbers in (0, 1)"))
        out += number("recovery.l2", rec.get("l2", 1e-3), 0, lo_open=True)
    return out + folder_list_problems(cfg, "pipelines")


def conf_keys_of(file: str, node: str) -> list[str]:
    from omegaconf import OmegaConf

    return list(OmegaConf.to_container(OmegaConf.load(CONF_DIR / file))[node])


def message_problem(message: str, group: str) -> Problem:
    """A library's own `key=value ...` ValueError as one Problem (the key is its first word)."""
    head = message.splitlines()[0]
    key, _, rest = head.partition("=")
    value, _, allowed = rest.partition(" ")
    if not key.startswith(group + ".") or not value:
        return Problem(group, "?", head)
    return Problem(key, value.strip(":'\""), allowed.strip(": ") or head)


def folder_list_problems(cfg: dict, key: str) -> list[Problem]:
    """`pipelines=[...]` / `candidates=[...]`: each a pipeline folder that is there (or a Hub id), a run folder
    (its pipeline/ or its delta) or a delta file (its header read: unlearn.export)."""
    values = cfg.get(key)
    if values is None:
        return []
    if not isinstance(values, list):
        return [Problem(key, values, f"a list of pipeline folders, e.g. {key}=[outputs/<run>/pipeline]")]
    from unlearn.export import read_header, resolve_model
    from unlearn.models.loading import ModelLoadError, check_folder

    out = []
    for v in values:
        if not isinstance(v, str) or not v:
            out.append(Problem(key, v, "each a pipeline folder (a path)"))
            continue
        if is_local(v):
            try:
                kind, path = resolve_model(v)
                if kind == "pipeline":
                    check_folder(path)
                else:
                    read_header(path)
            except ModelLoadError as e:
                out.append(Problem(key, v, f"each a pipeline folder, a run folder or a delta file; {e}"))
    return out


# ------------------------------------------------------------------------------------------------ the model's world
def concept_world(concept: dict) -> str:
    """`toy` / `toy2` for a concept of a built-in toy world (its prompts are that world's captions), else `real`."""
    spec = str(concept.get("anchor_prompts", ""))
    return next((w for w in TOY_MODELS if spec.startswith(f"{w}:")), "real")


def model_world(model: dict) -> str | None:
    """`toy` / `toy2` for a shipped toy model, `real` for a Hub id; None for a folder (its world is not known)."""
    path = str(model.get("path", ""))
    if path in TOY_MODELS:
        return path
    return None if is_local(path) else "real"


def world_problems(cfg: dict) -> list[Problem]:
    """A concept the model has never seen makes minutes of meaningless images: the toy model knows only its
    shapes (its vocabulary has no Van Gogh), and Stable Diffusion never saw the toy world's captions."""
    concept, model = cfg.get("concept"), cfg.get("model")
    if not isinstance(concept, dict) or not isinstance(model, dict):
        return []
    have, need = model_world(model), concept_world(concept)
    if have is None or have == need:
        return []
    name = concept.get("name", "?")
    if need == "real":
        return [Problem("concept", name, f"needs a real model: add model=sd14 (or sd2, sd2_v; model="
                        f"{model.get('name')} is the toy world's, whose vocabulary has none of its words)")]
    if have in TOY_MODELS:
        return [Problem("concept", name, f"a concept of the {need} world: add model={need} (model="
                        f"{model.get('name')} is the {have} world's, which does not draw it)")]
    return [Problem("concept", name, f"a toy-world concept: add model={need}, or choose a real concept (model="
                    f"{model.get('name')} never saw the toy world's captions)")]


HUB_TIMEOUT_S = 5.0  # how long to wait for the Hub before calling it unreachable


def reach_problems(cfg: dict) -> list[Problem]:
    """A Hub model must be in the local cache or downloadable now: else the run would stop (or hang) later,
    after preparing or writing. Checked last, only for an otherwise valid config."""
    model = cfg.get("model")
    if not isinstance(model, dict):
        return []
    out = []
    needs = [("model.path", "model_index.json")]
    if cfg.get("evaluate", True) is not False or "detector" in cfg:
        needs.append(("model.clip", "config.json"))
    for key, probe in needs:
        repo = model.get(key.split(".")[1])
        if not isinstance(repo, str) or repo in TOY_MODELS or is_local(repo):
            continue
        why = hub_unreachable(repo, model.get("revision") if key == "model.path" else None, probe)
        if why:  # one line: the first model that cannot be had (the next one is found once it is there)
            return [Problem(key, repo, f"{why}: give a local copy with {key}=<folder>, or run on a machine that "
                            "can download it")]
    return out


def hub_unreachable(repo: str, revision: str | None, probe: str) -> str:
    """Why `repo` (at `revision`) cannot be had now, or "" when it is cached or the Hub answers for it."""
    import huggingface_hub as hub
    import huggingface_hub.constants  # the submodules by name: the package's lazy attributes may not have them
    import huggingface_hub.errors

    cached = hub.try_to_load_from_cache(repo, probe, revision=revision)
    if isinstance(cached, str):
        return ""
    at = f" at revision {revision}" if revision else ""
    if hub.constants.HF_HUB_OFFLINE:
        return f"not in the local Hugging Face cache{at} and the Hub is off (HF_HUB_OFFLINE=1)"
    try:
        hub.HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except hub.errors.RevisionNotFoundError:
        return f"the Hub has no revision {revision} of it"
    except hub.errors.RepositoryNotFoundError:
        return "no such model on the Hub (or it is private)"
    except Exception as e:  # noqa: BLE001 - timeouts, DNS, proxies: all mean the Hub cannot be reached
        return f"not in the local Hugging Face cache{at} and the Hub is unreachable ({type(e).__name__})"
    return ""


def top_problems(cfg: dict) -> list[Problem]:
    out = number("seed", cfg.get("seed", 0), 0, integer=True)
    out += number("eval_every", cfg.get("eval_every", 0), 0, integer=True, hint=" (0 = before/after only)")
    if "checkpoint_every" in cfg:
        out += number("checkpoint_every", cfg["checkpoint_every"], 1, integer=True)
    for key in ("prepare", "evaluate"):
        if key in cfg:
            out += flag(key, cfg[key])
    if "export" in cfg:
        from unlearn.export import EXPORTS

        out += choice("export", cfg["export"], EXPORTS)
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

    from unlearn.utils.marker import hashed

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    old = flat(hashed(OmegaConf.to_container(OmegaConf.load(saved), resolve=False)))
    new = flat(hashed(OmegaConf.to_container(raw_cfg, resolve=False)))
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


def problems(cfg, reach: bool = False) -> list[Problem]:
    """Every bad value of a composed config; `reach` also checks that a Hub model can be had (the entry points)."""
    plain, out = resolve_groups(cfg)
    out += top_problems(plain)
    out += concept_problems(plain)
    out += model_problems(plain)
    for group in ("method", "data", "eval"):
        if group == "eval" and plain.get("evaluate") is False:
            continue
        out += group_problems(plain, group)
    if "trainer" in plain:
        out += trainer_problems(plain)
        out += trainer_key_problems(plain)
    out += speed_problems(plain)
    out += logger_problems(plain)
    out += attack_problems(plain)
    out += folder_list_problems(plain, "candidates")
    out += resume_problems(plain, cfg)
    if not out:
        out += world_problems(plain)
    if reach and not out:
        out += reach_problems(plain)
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
        # nested files are choices too: experiment=sweep/toy_cdc_lr
        known = sorted(str(p.relative_to(conf_dir / group).with_suffix("")) for p in (conf_dir / group).rglob("*.yaml"))
        for value in values.split(","):  # a multirun sweep: method=a,b
            value = value.strip()
            if value and value != "null" and value not in known and not value.startswith(("${", "choice(",
                                                                                           "range(", "glob(")):
                out.append(Problem(group, value, "one of " + " | ".join(known)))
    return out
