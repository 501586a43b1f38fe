"""Which runs a comparison needs: one training config per (method, stage), all checked before any work.

Each run's config is the training config composed with the method's recipe (e.g. its toy-sized experiment), then
`method=<m>`, then the user's own overrides (so `seed=1`, `data.*`, `eval.*` reach every method alike), then the
comparison's: the budget, `eval_every`, the run folder and, for a sequential stage, the previous stage's pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from unlearn.data.concepts import known_concepts

CONF = Path(__file__).resolve().parents[2] / "conf"
# Keys of conf/compare.yaml that are not training settings: never passed on to the runs.
COMPARE_KEYS = ("methods", "concepts", "seeds", "budget", "recipes", "out_dir", "robustness", "kept",
                "threads_per_job")


class CompareError(ValueError):
    """A bad comparison request; the message names the value. Raised before any model is loaded."""


@dataclass
class Run:
    method: str                 # the method's config name (conf/method/<method>.yaml), the row's label
    stage: int                  # 1-based; 1 for a plain comparison
    concept: str
    run_dir: Path
    cfg: DictConfig             # the full training config of this run
    seed: int | None = None     # the training seed when the comparison runs over `seeds`, else None

    @property
    def key(self) -> str:       # one per run: the method, or <method>/seed<s> over seeds
        return self.method if self.seed is None else f"{self.method}/seed{self.seed}"

    @property
    def label(self) -> str:     # the label the run's own evaluation gives its final row
        return str(self.cfg.method.name)

    @property
    def pipeline(self) -> Path:
        return self.run_dir / "pipeline"


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def known_methods() -> list[str]:
    return sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def compose_compare(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("compare", overrides=with_root(overrides))


def compose_hydra(overrides: list[str]) -> DictConfig:
    """The comparison's config with its `hydra` node (the launcher's settings)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("compare", overrides=with_root(overrides), return_hydra_config=True)


def with_root(overrides: list[str]) -> list[str]:
    """Outside a Hydra app `${hydra:runtime.cwd}` cannot resolve: give paths.root unless the user did."""
    if any(override_key(o) == "paths.root" for o in overrides):
        return list(overrides)
    return [f"paths.root={os.environ.get('UNLEARN_ROOT', os.getcwd())}", *overrides]


def check_request(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(methods, concepts) after checking each name; concepts has one entry for a plain comparison."""
    methods = cfg.methods
    if methods is None or isinstance(methods, str) or len(methods) == 0:
        raise CompareError(f"methods={OmegaConf.to_container(methods) if methods is not None else None}: "
                           "give a non-empty list, e.g. methods=[cdc_cpg_official,esd_x]")
    methods = [str(m) for m in methods]
    known = known_methods()
    for m in methods:
        if m not in known:
            raise CompareError(f"methods: unknown method {m!r}; choose from {known}")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise CompareError(f"methods: {dup[0]!r} is listed twice")
    recipes = cfg.get("recipes") or {}
    if recipes:
        missing = [m for m in methods if m not in recipes]
        if missing:
            raise CompareError(f"methods: {missing[0]!r} has no recipe in conf/recipes (known: {sorted(recipes)}); "
                               "add one there, or run with recipes=none for every method's own defaults")
    if cfg.concepts is None:
        return methods, [str(cfg.concept.name)]
    concepts = cfg.concepts
    if isinstance(concepts, str) or len(concepts) == 0:
        raise CompareError(f"concepts={concepts!r}: give a non-empty list, e.g. concepts=[toy_ring,toy_diamond]")
    concepts = [str(c) for c in concepts]
    names = known_concepts()
    for c in concepts:
        if c not in names:
            raise CompareError(f"concepts: unknown concept {c!r}; choose from {names}")
    for c in concepts:
        if concepts.count(c) > 1:
            raise CompareError(f"concepts: {c!r} is repeated; a sequential run erases each concept once")
    return methods, concepts


def check_seeds(cfg: DictConfig) -> list[int] | None:
    """The training seeds to run every method with; None = the config's own `seed` alone (one run per method)."""
    seeds = cfg.get("seeds")
    if seeds is None:
        return None
    shown = OmegaConf.to_container(seeds) if OmegaConf.is_config(seeds) else seeds
    if isinstance(seeds, (str, int, float)) or len(seeds) == 0:
        raise CompareError(f"seeds={shown}: give a non-empty list of distinct integers >= 0, e.g. seeds=[0,1,2]")
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise CompareError(f"seeds: {s!r} is not an integer >= 0")
    seeds = [int(s) for s in seeds]
    for s in seeds:
        if seeds.count(s) > 1:
            raise CompareError(f"seeds: {s} is listed twice; each training seed is one run")
    if cfg.concepts is not None:
        raise CompareError(f"seeds={shown} with concepts=[...]: a sequential comparison runs one seed; run it once "
                           "per seed (seed=<s> out_dir=<folder per seed>)")
    return seeds


def out_dir(cfg: DictConfig, concepts: list[str]) -> Path:
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    return Path(cfg.paths.outputs) / "compare" / "+".join(concepts)


def plan_runs(overrides: list[str]) -> tuple[DictConfig, list[Run]]:
    """The comparison's config and every run it needs, stage by stage, each config composed (and so checked)."""
    cfg = compose_compare(overrides)
    methods, concepts = check_request(cfg)
    seeds = check_seeds(cfg)
    root = out_dir(cfg, concepts)
    user = [o for o in with_root(overrides) if override_key(o).split(".")[0] not in COMPARE_KEYS]
    sequential = cfg.concepts is not None
    runs = []
    for method in methods:
        recipe = list((cfg.get("recipes") or {}).get(method, []))
        for seed in seeds or [None]:
            previous = None
            for stage, concept in enumerate(concepts, start=1):
                run_dir = root / "runs" / method / (f"stage{stage}-{concept}" if sequential else "")
                extra = [f"eval_every={cfg.eval_every}"]
                if seed is not None:  # one folder per training seed; the prepared data and eval images are shared
                    run_dir = run_dir / f"seed{seed}"
                    extra.append(f"seed={seed}")
                extra.append(f"paths.run_dir={run_dir}")
                if sequential:
                    extra.append(f"concept={concept}")
                if previous is not None:
                    extra.append(f"model.path={previous}")
                with initialize_config_dir(str(CONF), version_base="1.3"):
                    run_cfg = compose("train", overrides=[*recipe, f"method={method}", *user, *extra])
                if cfg.budget is not None:
                    apply_budget(run_cfg, int(cfg.budget))
                if sequential and stage < len(concepts) and run_cfg.get("export") == "delta":
                    OmegaConf.update(run_cfg, "export", "both")  # the next stage loads this one's pipeline/
                runs.append(Run(method, stage, concept, run_dir, run_cfg, seed))
                previous = (run_dir / "pipeline").resolve()
    check_same_evaluation(runs)
    return cfg, runs


def apply_budget(run_cfg: DictConfig, budget: int) -> None:
    """Set the method's iterations to `budget`, keeping its warm-up share (CDC+CPG: 200 of 1,000 iterations train D
    alone), so a shorter budget still leaves the generator the same fraction of the run."""
    method = run_cfg.method
    if "warmup_steps" in method:
        share = int(method.warmup_steps) / max(1, int(method.steps))
        OmegaConf.update(run_cfg, "method.warmup_steps", round(share * budget))
    OmegaConf.update(run_cfg, "method.steps", int(budget))


def check_same_evaluation(runs: list[Run]) -> None:
    """Every method must be measured on the same prompts, seeds and metrics, or the table compares nothing."""
    first = OmegaConf.to_container(runs[0].cfg.eval, resolve=True)
    for run in runs[1:]:
        other = OmegaConf.to_container(run.cfg.eval, resolve=True)
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            raise CompareError(f"method {run.method!r} would be evaluated with other settings than "
                               f"{runs[0].method!r} ({', '.join(f'eval.{k}' for k in diff)}): set them on the "
                               "command line so every method shares them")
