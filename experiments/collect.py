"""Gather the eval/metrics.json of a multirun (or any runs) into one table: the original once, one row per run.

    python experiments/collect.py outputs/multirun/<time> [--out table.md]
    python experiments/collect.py outputs/multirun/<time> --pivot method.loss [--metric ca]

Row labels are the run's Hydra overrides (e.g. `method.retain=cpg`), so a sweep reads as the paper's ablation table;
rows measured during training (`eval_every=N`) get ` @<iteration>`. `--pivot KEY` lays the same numbers out as
iterations x values of KEY (the robust-erasure paper's Table 1: steps x loss), each cell "target (worst neighbour)";
runs that differ in anything else (e.g. `seed=`) get rows of their own, never one cell for two runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from unlearn.evaluation.table import format_table


def run_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    items = (yaml.safe_load(path.read_text()) or []) if path.exists() else []
    return [o for o in items if not o.startswith(("hydra", "paths"))]


def run_steps(run_dir: Path) -> int | None:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    return (yaml.safe_load(path.read_text()).get("method") or {}).get("steps")


def gather(roots: list[Path]) -> tuple[list[dict], str]:
    """One record per measured model: its run's overrides, the iteration it was measured at, its results."""
    records, target = [], None
    for path in sorted(p for r in roots for p in r.rglob("eval/metrics.json")):
        payload = json.loads(path.read_text())
        target = target or payload["concept"]
        run_dir = path.parent.parent
        for label, per in payload["results"].items():
            if label == "original":
                step, overrides = 0, []
            elif "@" in label:
                step, overrides = int(label.rsplit("@", 1)[1]), run_overrides(run_dir)
            else:
                step, overrides = run_steps(run_dir), run_overrides(run_dir)
            records.append({"run": run_dir.name, "overrides": overrides, "step": step, "final": "@" not in label,
                            "original": label == "original", "results": per})
    if target is None:
        raise SystemExit(f"no eval/metrics.json under {', '.join(map(str, roots))}")
    return records, target


def collect(roots: list[Path]) -> tuple[dict, str]:
    records, target = gather(roots)
    runs = [r for r in records if not r["original"]]
    # Keep only what differs between rows: a sweep's shared overrides say nothing about a row.
    shared = set.intersection(*(set(r["overrides"]) for r in runs)) if len(runs) > 1 else set()
    results = {}
    for r in records:
        if r["original"]:
            results.setdefault("original", r["results"])
            continue
        key = " ".join(o for o in r["overrides"] if o not in shared) or " ".join(r["overrides"]) or r["run"]
        results[key if r["final"] else f"{key} @{r['step']}"] = r["results"]
    return results, target


def pivot(roots: list[Path], key: str, metric: str = "ca") -> str:
    """Rows: iterations (and the other overrides that vary, e.g. the seed); columns: the values KEY takes in the
    sweep; cells: target (worst neighbour)."""
    records, target = gather(roots)
    runs = [r for r in records if not r["original"]]
    shared = set.intersection(*(set(r["overrides"]) for r in runs)) if runs else set()
    cells, columns, sources = {}, [], {}
    for r in records:
        values = [o.split("=", 1)[1] for o in r["overrides"] if o.split("=", 1)[0] == key]
        column = "original" if r["original"] else (values[0] if values else None)
        if column is None:
            raise SystemExit(f"run {r['run']} has no override {key}=...; pivot on one of {r['overrides']}")
        if column not in columns:
            columns.append(column)
        others = [row[metric] for name, row in r["results"].items() if name not in (target, "implicit")]
        text = f"{r['results'][target][metric]:.1f}"
        if others:
            text += f" ({min(others):.1f})"
        rest = " ".join(o for o in r["overrides"] if o.split("=", 1)[0] != key and o not in shared)
        cell = (r["step"], "" if r["original"] else rest, column)
        if cell in cells and not r["original"]:
            raise SystemExit(f"runs {sources[cell]} and {r['run']} fill the same cell (iteration {r['step']}, "
                             f"{key}={column}{', ' + rest if rest else ''}): they differ in no override")
        cells[cell], sources[cell] = text, r["run"]
    rows = sorted({(s, rest) for s, rest, _ in cells if s is not None})
    lines = [f"| iteration | {' | '.join(columns)} |", "|" + "---|" * (len(columns) + 1)]
    for s, rest in rows:
        label = f"{s} {rest}".strip()
        lines.append(f"| {label} | " + " | ".join(cells.get((s, rest, c), "") for c in columns) + " |")
    return f"{target} {metric} (worst neighbour in brackets)\n" + "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--pivot", metavar="KEY", help="an override varied by the sweep, e.g. method.loss")
    p.add_argument("--metric", default="ca", help="with --pivot: ca | cs | fid | directional (default ca)")
    a = p.parse_args(argv)
    if a.pivot:
        table = pivot(a.roots, a.pivot, a.metric)
    else:
        results, target = collect(a.roots)
        table = format_table(results, target)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
