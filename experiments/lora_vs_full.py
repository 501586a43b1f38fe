"""A method as a LoRA (`method.adapter=lora`) next to the same method on its full trainable subset, on the toy
world, over training seeds: target CA, the neighbours, the artefact's size and the run's wall time.

    python experiments/lora_vs_full.py                               # cdc_cpg_tuned and conabl on toy_stripes
    python experiments/lora_vs_full.py --seeds 0 1 2 --out outputs/lora_vs_full

Each run is `unlearn.train` with the method's toy recipe (conf/recipes/toy.yaml) and `export=both`, then
`unlearn.evaluate` on it (the original's images come from one shared cache). A finished run is reused. The wall
time is the training run's own (loading, training, export; no evaluation; the first seed also prepares the
data), one torch thread each; it/s is the iterations over the fastest seed's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# method -> (its full-weight overrides beyond the recipe, its LoRA overrides)
SETTINGS = {
    "cdc_cpg_tuned": ([], ["method.adapter=lora", "method.lr=3e-3", "method.steps=100", "method.warmup_steps=20"]),
    # lr 1e-3 (10x) erased but broke the neighbours (mean CA 53.1 %, lowest CS ratio 0.49, seeds 0-2)
    "conabl": ([], ["method.adapter=lora", "method.lr=3e-4"]),
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def train(method: str, extra: list[str], concept: str, seed: int, run_dir: Path, cache: Path) -> float:
    from omegaconf import OmegaConf

    from unlearn.train import run

    timing = run_dir / "wall_s.json"
    if timing.exists():
        return json.loads(timing.read_text())["wall_s"]
    recipe = OmegaConf.load(ROOT / "conf" / "recipes" / "toy.yaml")[method]
    cfg = compose([*recipe, f"method={method}", f"concept={concept}", f"seed={seed}", *extra, "export=both",
                   "evaluate=false", "logger=none", "trainer.enable_progress_bar=false",
                   f"paths.root={run_dir.parent}", f"paths.run_dir={run_dir}", f"paths.cache={cache}"])
    t0 = time.time()
    run(cfg)
    wall = time.time() - t0
    timing.write_text(json.dumps({"wall_s": wall, "steps": cfg.method.steps}))
    return wall


def evaluate(concept: str, run_dir: Path, cache: Path) -> dict:
    from unlearn.evaluate import run

    metrics = run_dir / "eval_after" / "eval" / "metrics.json"
    if not metrics.exists():
        run(compose(["model=toy", f"concept={concept}", f"+candidates=[{run_dir / 'pipeline'}]", "logger=none",
                     f"paths.root={run_dir}", f"paths.run_dir={run_dir / 'eval_after'}", f"paths.cache={cache}"]))
    payload = json.loads(metrics.read_text())
    return payload["results"]


def summary(concept: str, results: dict) -> dict:
    from unlearn.evaluation.kept import KeptBounds, kept_neighbours

    before = results["original"]
    label = next(k for k in results if k != "original")
    after = results[label]
    broken = {c: v for c, v in kept_neighbours(before, after, concept, KeptBounds()).items() if v}
    others = [c for c in after if c not in (concept, "implicit")]
    return {"ca": after[concept]["ca"], "neighbour_ca": statistics.mean(after[c]["ca"] for c in others),
            "neighbour_cs_ratio": min(after[c]["cs"] / before[c]["cs"] for c in others),
            "neighbour_fid_max": max(after[c]["fid"] for c in others), "kept": not broken}


def size_mb(run_dir: Path, lora: bool) -> float:
    from unlearn.export import DELTA_FILE
    from unlearn.methods.adapters import LORA_FILE

    return (run_dir / (LORA_FILE if lora else DELTA_FILE)).stat().st_size / 1e6


def cell(values: list[float], digits: int = 1) -> str:
    from unlearn.comparison.intervals import t_interval

    mean, half = t_interval(values)
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(SETTINGS))
    p.add_argument("--concept", default="toy_stripes")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "lora_vs_full")
    a = p.parse_args(argv)
    cache = a.out / "cache"
    lines = [("| method | weights | iterations | target CA % | neighbours' mean CA % | lowest neighbour CS / original "
              "| highest neighbour FID | kept (seeds) | artefact MB | wall s per run | it/s (fastest run) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in a.methods:
        for lora, extra in zip((False, True), SETTINGS[method]):
            rows, walls, sizes, steps = [], [], [], None
            for seed in a.seeds:
                run_dir = a.out / a.concept / f"{method}-{'lora' if lora else 'full'}" / f"seed{seed}"
                walls.append(train(method, extra, a.concept, seed, run_dir, cache))
                steps = json.loads((run_dir / "wall_s.json").read_text())["steps"]
                rows.append(summary(a.concept, evaluate(a.concept, run_dir, cache)))
                sizes.append(size_mb(run_dir, lora))
            lines.append(
                f"| {method} | {'LoRA rank 4' if lora else 'full subset'} | {steps} | {cell([r['ca'] for r in rows])} "
                f"| {cell([r['neighbour_ca'] for r in rows])} | {cell([r['neighbour_cs_ratio'] for r in rows], 2)} "
                f"| {cell([r['neighbour_fid_max'] for r in rows], 2)} | {sum(r['kept'] for r in rows)}/{len(rows)} "
                f"| {statistics.mean(sizes):.3f} | {cell(walls, 0)} | {steps / min(walls):.2f} |")
    table = "\n".join(lines)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"table_{a.concept}.md").write_text(table + "\n")
    print(f"\n{a.concept}, seeds {a.seeds} (mean ± 95 % t half-width over training seeds)\n{table}")


if __name__ == "__main__":
    main()
