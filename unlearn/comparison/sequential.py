"""After every stage of a sequential run, measure every concept erased so far and every neighbour of theirs.

One evaluator per concept (no neighbours of its own: the union is listed explicitly), so a concept shared by two
erased concepts' neighbour lists is measured once. The original model's row is the same for every stage.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from unlearn.data.concepts import load_concept


def stage_concepts(erased: list[str]) -> list[str]:
    """Erased concepts first (in order), then their neighbours not erased yet, in first-seen order."""
    kept = []
    for name in erased:
        for n in load_concept(name).neighbours:
            if n not in erased and n not in kept:
                kept.append(n)
    return [*erased, *kept]


def evaluate_stages(cfg: DictConfig, runs, concepts: list[str], out: Path) -> dict[int, dict]:
    """{stage: {label: {concept: metrics}}} for the original model and every method after every stage."""
    from unlearn.export.load import unet_of
    from unlearn.models.loading import load_components

    base = load_components(cfg.model.path, revision=cfg.model.revision, dtype=cfg.model.dtype)
    evaluators = {}

    def evaluator(name: str):
        if name not in evaluators:
            evaluators[name] = instantiate(cfg.eval, concept=name, model_cfg=cfg.model, neighbours=False,
                                           implicit=False, out_dir=out / "sequential" / "eval" / name)
            evaluators[name].measure("original", base)
        return evaluators[name]

    tables = {}
    for stage in range(1, len(concepts) + 1):
        names = stage_concepts(concepts[:stage])
        table = {"original": {n: evaluator(n).results["original"][n] for n in names}}
        for run in (r for r in runs if r.stage == stage):
            # Its pipeline/, or its delta on the model the stage started from (the previous stage's pipeline/).
            unet = unet_of(run.run_dir, base if run.stage == 1 else str(run.cfg.model.path),
                           dtype=cfg.model.dtype).requires_grad_(False).eval()
            label = f"{run.method}@stage{stage}"
            table[run.method] = {n: evaluator(n).measure(label, base, unet=unet)[n] for n in names}
        tables[stage] = table
    return tables


def format_stages(tables: dict[int, dict], concepts: list[str], budgets: dict[str, str]) -> str:
    """Table 1's blocks: one per stage, erased concepts (↓) then their neighbours (↑), CS and CA."""
    blocks = []
    for stage, table in tables.items():
        erased = concepts[:stage]
        names = list(next(iter(table.values())))
        header = ["model", "iterations"] + [f"{n} {m}{'↓' if n in erased else '↑'}" for n in names
                                            for m in ("CS", "CA")]
        lines = [f"**Stage {stage}: erased {' + '.join(erased)}**", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, per in table.items():
            cells = [f"{per[n].get('cs', float('nan')):.2f} | {per[n]['ca']:.2f}" for n in names]  # no CS: nudity
            lines.append(f"| {label} | {budgets.get(label, '–')} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
