"""A concept to erase, read from one small YAML (`conf/concept/<name>.yaml`); no code per concept.

    name, kind (style | instance | nudity), anchor, target, anchor_prompts (a prompt-set spec: prompts.py),
    derive {mode, suffix, word, replacement} (see derive.py), neighbours (concept names to preserve),
    implicit_prompts (prompts that should be erased too, e.g. "The Starry Night"; an entry may be
    {prompt, ca: [target caption, anchor caption]}, the two captions CA reads its image between).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from unlearn.data.derive import MODES, derive_target_prompts
from unlearn.data.prompts import SET_SIZE, load_prompt_set

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf" / "concept"
KINDS = ("style", "instance", "nudity")
DERIVE_KEYS = ("mode", "suffix", "word", "replacement")
SCHEMA_EXTRAS = ("conf_dir", "implicit_ca")  # Concept fields filled by the loader, not keys of the YAML
OPTIONAL = ("classes",)  # keys a concept YAML may leave out


class ConceptError(ValueError):
    """A concept config that is unknown or malformed; the message names it."""


@dataclass
class Concept:
    name: str
    kind: str
    anchor: str
    target: str
    anchor_prompts: str
    derive: dict  # {mode, suffix, word, replacement}: the keyword arguments of derive_target_prompts
    neighbours: list[str]
    implicit_prompts: list[str]
    # Words the target's word may be read as (the world's other shapes or styles): the evaluator's top-1 reads
    # each image against its prompt with the word swapped for each of them, and against the anchor prompt.
    classes: list[str] = field(default_factory=list)
    conf_dir: Path = field(default=CONF_DIR, repr=False, compare=False)
    implicit_ca: list = field(default_factory=list, repr=False)  # per implicit prompt: (target, anchor) or None

    def prompts(self, n: int | None = SET_SIZE) -> list[str]:
        return load_prompt_set(self.anchor_prompts, n)

    def pairs(self, n: int | None = SET_SIZE) -> list[tuple[str, str]]:
        """(anchor, target) prompt pairs from the first n anchor prompts (fewer if `replace` drops some)."""
        return derive_target_prompts(self.prompts(n), **self.derive)

    def neighbour_concepts(self) -> list[Concept]:
        return [load_concept(n, conf_dir=self.conf_dir) for n in self.neighbours]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SCHEMA_EXTRAS}


def known_concepts(conf_dir: str | Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in Path(conf_dir).glob("*.yaml"))


def load_concept(name_or_cfg: Any, conf_dir: str | Path | None = None) -> Concept:
    """A Concept from a name (conf/concept/<name>.yaml), a DictConfig/dict of the schema, or a Concept."""
    conf_dir = Path(conf_dir) if conf_dir is not None else CONF_DIR
    if isinstance(name_or_cfg, Concept):
        return name_or_cfg
    if isinstance(name_or_cfg, (str, Path)):
        name = str(name_or_cfg)
        path = conf_dir / f"{name}.yaml"
        if not path.exists():
            known = ", ".join(known_concepts(conf_dir))
            raise ConceptError(f"unknown concept {name!r}: no {path}; known: {known}")
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        source = str(path)
    else:
        from omegaconf import DictConfig, OmegaConf

        raw = OmegaConf.to_container(name_or_cfg, resolve=True) if isinstance(name_or_cfg, DictConfig) \
            else dict(name_or_cfg)
        source = f"concept config {raw.get('name', '?')!r}"
    return _validate(raw, source, conf_dir)


def _validate(raw: dict, source: str, conf_dir: Path) -> Concept:
    if not isinstance(raw, dict):
        raise ConceptError(f"{source}: expected a mapping, got {type(raw).__name__}")
    expected = [f.name for f in fields(Concept) if f.name not in SCHEMA_EXTRAS]
    missing = [k for k in expected if k not in raw and k not in OPTIONAL]
    extra = [k for k in raw if k not in expected]
    if missing or extra:
        raise ConceptError(f"{source}: missing keys {missing}, unknown keys {extra} (schema: {expected})")
    if raw["kind"] not in KINDS:
        raise ConceptError(f"{source}: kind {raw['kind']!r} is not one of {KINDS}")
    derive = raw["derive"]
    if not isinstance(derive, dict) or derive.get("mode") not in MODES or set(derive) - set(DERIVE_KEYS):
        raise ConceptError(f"{source}: derive must be a mapping with mode in {MODES} and keys {DERIVE_KEYS}, "
                           f"got {derive!r}")
    derive = {k: derive.get(k) for k in DERIVE_KEYS}
    if derive["mode"] == "suffix" and not derive["suffix"]:
        raise ConceptError(f"{source}: derive mode suffix needs `suffix`")
    if derive["mode"] == "replace" and not (derive["word"] and derive["replacement"]):
        raise ConceptError(f"{source}: derive mode replace needs `word` and `replacement`")
    raw.setdefault("classes", [])
    for key in ("neighbours", "implicit_prompts", "classes"):
        if not isinstance(raw[key], list):
            raise ConceptError(f"{source}: {key} must be a list, got {raw[key]!r}")
    if not all(isinstance(c, str) and c.strip() for c in raw["classes"]):
        raise ConceptError(f"{source}: classes must be a list of words, got {raw['classes']!r}")
    implicit = [_implicit_entry(e, source) for e in raw["implicit_prompts"]]
    return Concept(name=str(raw["name"]), kind=raw["kind"], anchor=str(raw["anchor"]),
                   target=str(raw["target"]), anchor_prompts=str(raw["anchor_prompts"]), derive=derive,
                   neighbours=[str(n) for n in raw["neighbours"]], implicit_prompts=[p for p, _ in implicit],
                   classes=[str(c) for c in raw["classes"]],
                   conf_dir=conf_dir, implicit_ca=[ca for _, ca in implicit])


def _implicit_entry(entry, source: str) -> tuple[str, tuple[str, str] | None]:
    """A prompt, or {prompt, ca: [target caption, anchor caption]}: its image is also read by CA between the two."""
    if isinstance(entry, dict):
        ca = entry.get("ca")
        if set(entry) != {"prompt", "ca"} or not isinstance(ca, list) or len(ca) != 2 \
                or not all(isinstance(c, str) and c for c in ca):
            raise ConceptError(f"{source}: implicit prompt {entry!r} must be a string or "
                               f"{{prompt, ca: [target caption, anchor caption]}}")
        return str(entry["prompt"]), (ca[0], ca[1])
    return str(entry), None


def rival_captions(anchor_prompt: str, target_prompt: str, word: str, classes: list[str]) -> list[str]:
    """The captions a target prompt's image competes with in the top-1 reading: the anchor prompt, and the target
    prompt with `word` (whole words only) swapped for each class; the prompt itself and repeats are left out."""
    import re

    pattern = re.compile(rf"\b{re.escape(word)}\b")
    out = [anchor_prompt] + [pattern.sub(c, target_prompt) for c in classes]
    return [c for c in dict.fromkeys(out) if c != target_prompt]
