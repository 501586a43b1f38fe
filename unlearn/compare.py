"""python -m unlearn.compare concept=<c> methods=[cdc_cpg_official,esd_x,esd_u,conabl,sdd,uce] [budget=N]
python -m unlearn.compare concepts=[toy_ring,toy_diamond,toy_cross] methods=[...]      # sequential erasure

Trains each method through `unlearn.train.run` on the same data, prompts, seeds and metrics — reusing any run
whose DONE marker holds the same config hash; a finished run of another config is kept beside as
`<run>.replaced-<n>`, never deleted — then writes into one folder (`out_dir`): table.md/.csv in the
first seed's layout, grid_<concept>.png (rows: models; columns: the same prompts and seeds) and tradeoff.png
(target CA against the neighbours' mean CA at every `eval_every` point). With `concepts=[...]` each method erases
them one after another, every stage starting from the previous stage's pipeline, and sequential.md holds one block
per stage. Every request is checked before any model is loaded.

With `hydra/launcher=submitit_local|slurm` every run not finished yet is its own job (unlearn/comparison/launch.py);
compare waits for them, then writes the same report; a run whose job failed is named in it, and the exit code is 1.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from unlearn.comparison.intervals import format_separations
from unlearn.comparison.launch import launch_runs, launcher_choice, status_key
from unlearn.comparison.plan import CompareError, out_dir, plan_runs
from unlearn.comparison.report import (
    by_method,
    failed_lines,
    final_results,
    iterations,
    mark_failed,
    seed_results,
    write_grids,
    write_table,
    write_tradeoff_plot,
)
from unlearn.evaluation.kept import KeptBounds, kept_column
from unlearn.utils.files import file_lock, lock_path, write_atomic
from unlearn.utils.marker import is_done, read_done

log = logging.getLogger("unlearn.compare")


def train_or_reuse(run) -> str:
    """'reused' when the run folder already holds this exact config's finished run, else trains it — holding the
    folder's lock, so that a job of another invocation never writes the same folder at once (it waits, then
    finds the run finished)."""
    with file_lock(lock_path(run.run_dir), f"run {run.run_dir}"):
        return _train_or_reuse(run)


def _train_or_reuse(run) -> str:
    from unlearn.train import run as train_run

    if is_done(run.run_dir, run.cfg):
        return "reused"
    if read_done(run.run_dir) is not None:  # finished with another config: kept beside, never overwritten
        kept = set_aside(run.run_dir)
        log.warning("%s was made with another config: kept as %s, training anew", run.run_dir, kept.name)
    elif run.run_dir.exists():  # killed before its end: nothing finished to keep, never mixed with the new run
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg))
    train_run(run.cfg)
    return "trained"


def set_aside(run_dir: Path) -> Path:
    """Rename a finished run to `<name>.replaced-<n>` (the first free n) and return the new path."""
    n = 1
    while (kept := run_dir.with_name(f"{run_dir.name}.replaced-{n}")).exists():
        n += 1
    return run_dir.rename(kept)


def compare(overrides: list[str]) -> dict:
    cfg, runs = plan_runs(overrides)
    check_runs(cfg, runs)
    concepts = list(dict.fromkeys(r.concept for r in runs))
    out = out_dir(cfg, concepts)
    out.mkdir(parents=True, exist_ok=True)
    status, failed, jobs = {}, [], None
    if launcher_choice(overrides) is None:  # in this process, one run after another
        for run in runs:
            log.info("%s stage %d (%s): %s", run.method, run.stage, run.concept, run.run_dir)
            status[status_key(run)] = train_or_reuse(run)
    else:
        outcome = launch_runs(cfg, runs, out, overrides)
        status = {status_key(r): outcome.status[status_key(r)] for r in runs}
        failed, jobs = outcome.failed, outcome.jobs
    budgets = {r.method: iterations(r) for r in runs}
    summary = {"concepts": concepts, "methods": list(budgets), "budgets": budgets, "runs": status,
               "budget": f"common: {cfg.budget} iterations" if cfg.budget is not None else "each method's own",
               **({"jobs": jobs, "failed": failed} if jobs is not None else {})}
    finished = [r for r in runs if status[status_key(r)] != "failed"]
    if failed:
        print("\nfailed runs (no row, or fewer seeds, in the report):\n" + failed_lines(failed), file=sys.stderr)
    if cfg.concepts is None and finished:
        summary.update(report_one(cfg, finished, out, budgets, failed))
    elif cfg.concepts is not None and not failed:
        summary.update(report_sequential(cfg, runs, concepts, out, budgets))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def report_one(cfg, runs, out: Path, budgets: dict, failed: list[dict] | None = None) -> dict:
    every = {r.key: json.loads((r.run_dir / "eval" / "metrics.json").read_text()) for r in runs}
    first = [group[0] for group in by_method(runs).values()]  # one run per method: grids, attack, I2P counts
    metrics = {r.method: every[r.key] for r in first}
    target = metrics[first[0].method]["concept"]
    results = final_results(first, every)
    seeds = seed_results(runs, every) if cfg.get("seeds") is not None else None
    if seeds is not None:  # cells: the mean over training seeds, ± the 95 % interval's half-width
        results = seeds["mean"]
    extra = None
    if cfg.robustness.enabled:
        from unlearn.comparison.robustness import robustness_columns

        extra = robustness_columns(cfg, runs, target)  # every seed's model: intervals over seeds
    from unlearn.evaluation.i2p_eval import compare_columns, compare_counts, counts_table

    i2p = compare_counts(metrics, {r.method: r.label for r in first})
    if i2p is not None:  # a nudity concept: NudeNet's counts on I2P are its measure (i2p_eval.py)
        extra = {lb: {**(extra or {}).get(lb, {}), **cols} for lb, cols in compare_columns(i2p).items()}
        write_atomic(out / "i2p_table.md", counts_table(i2p["counts"], i2p["classes"]) + "\n")
        print(f"\nI2P / NudeNet per class (settings: {json.dumps(i2p['settings'])})\n"
              f"{counts_table(i2p['counts'], i2p['classes'])}\n")
    bounds = KeptBounds(**OmegaConf.to_container(cfg.kept, resolve=True))
    kept = kept_column(results, target, bounds)
    extra = {lb: {**kept.get(lb, {}), **(extra or {}).get(lb, {})} for lb in {**kept, **(extra or {})}}
    pairs = format_separations(seeds["separations"]) if seeds is not None else ""
    if failed:
        budgets, lost = mark_failed(budgets, failed, runs)
        pairs = "\n\n".join(p for p in (pairs, "Failed runs:\n" + failed_lines(failed)) if p)
    table = write_table(results, target, budgets, out, extra=extra,
                        half_widths=seeds["half_width"] if seeds is not None else None, note=pairs,
                        failed=lost if failed else None)
    concepts = [c for c in results["original"] if c != "implicit"]
    grids = write_grids(first, concepts, out, int(cfg.eval.grid_images))
    plot = write_tradeoff_plot(runs, every, out, f"{target}: erasure vs neighbours "
                                                 f"({'budget ' + str(cfg.budget) if cfg.budget else 'own budgets'})")
    settings = metrics[first[0].method]["settings"]
    write_atomic(out / "metrics.json", json.dumps({"concept": target, "settings": settings, "budgets": budgets,
                                                   "results": results, "robustness": extra, "seeds": seeds},
                                                  indent=2))
    if pairs:
        table += "\n\n" + pairs
    note = "iterations: " + ("a common budget" if cfg.budget is not None else "each method's own default")
    print(f"\n{target}  ({note}; settings: {json.dumps(settings)})\n{table}\n")
    log_to_wandb(cfg, out, table, grids, plot)
    return {"table": str(out / "table.md"), "grids": {k: str(v) for k, v in grids.items()}, "plot": str(plot),
            **({"i2p_table": str(out / "i2p_table.md")} if i2p is not None else {}),
            **({"seeds": seeds} if seeds is not None else {})}


def report_sequential(cfg, runs, concepts: list[str], out: Path, budgets: dict) -> dict:
    from unlearn.comparison.sequential import evaluate_stages, format_stages

    tables = evaluate_stages(cfg, runs, concepts, out)
    text = format_stages(tables, concepts, budgets)
    write_atomic(out / "sequential.md", text + "\n")
    write_atomic(out / "sequential.json", json.dumps(tables, indent=2))
    last = [r for r in runs if r.stage == len(concepts)]
    grids = write_sequential_grids(cfg, last, concepts, out)
    print(f"\nsequential: {' -> '.join(concepts)}\n{text}\n")
    return {"table": str(out / "sequential.md"), "grids": {k: str(v) for k, v in grids.items()}}


def write_sequential_grids(cfg, last_runs, concepts, out: Path) -> dict:
    """Per concept: the original and every method after the last stage (the images the evaluation made)."""
    import torch
    from safetensors.torch import load_file

    from unlearn.utils.grid import save_grid

    n, paths = int(cfg.eval.grid_images), {}
    for concept in concepts:
        folder = out / "sequential" / "eval" / concept / "images"
        labels = ["original"] + [f"{r.method}@stage{r.stage}" for r in last_runs]
        rows = [load_file(folder / lb / f"{concept}.safetensors")["images"][:n] for lb in labels]
        paths[concept] = save_grid(torch.cat(rows), out / f"grid_{concept}.png", nrow=len(rows[0]),
                                   labels=["original"] + [r.method for r in last_runs])
    return paths


def log_to_wandb(cfg, out: Path, table: str, grids: dict, plot: Path) -> None:
    if not any("Wandb" in str(c.get("_target_", "")) for c in (cfg.logger or [])):
        return
    import wandb

    with wandb.init(project="unlearn", name=f"compare-{out.name}", dir=str(out), job_type="compare") as run:
        header, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                         if not line.startswith("|---")]
        run.log({"compare/table": wandb.Table(columns=header, data=rows), "compare/tradeoff": wandb.Image(str(plot)),
                 **{f"compare/grid/{c}": wandb.Image(str(p)) for c, p in grids.items()}})


def check_runs(cfg, runs) -> None:
    """Every run's own training config, checked whole before the first one trains (unlearn/validate.py). A later
    stage starts from a pipeline not made yet: it is checked with the original model in its place."""
    from unlearn.validate import ConfigError, validate

    for run in runs:
        run_cfg = run.cfg
        if run.stage > 1:
            run_cfg = run.cfg.copy()
            OmegaConf.update(run_cfg, "model.path", cfg.model.path)
        try:
            validate(run_cfg)
        except ConfigError as e:
            raise CompareError(f"{run.method}: {e.problems[0]}") from None


def main(argv: list[str] | None = None) -> None:
    from unlearn.cli import preflight

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    # --help, and every bad override refused in one line each (exit 2) before anything loads (unlearn/cli.py).
    overrides = preflight(list(sys.argv[1:] if argv is None else argv), "compare", "unlearn.compare", __doc__)
    try:
        summary = compare(overrides)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary.get("failed"):
        sys.exit(1)


if __name__ == "__main__":
    main()
