"""Gather the eval/metrics.json of a multirun (or any runs) into one table: the original once, one row per run.

    python experiments/collect.py outputs/multirun/<time> [--out table.md]

Row labels are the run's Hydra overrides (e.g. `method.retain=cpg`), so a sweep reads as the paper's ablation table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from unlearn.evaluation.table import format_table


def label_of(run_dir: Path) -> str:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.exists():
        items = [o for o in yaml.safe_load(overrides.read_text()) or [] if not o.startswith(("hydra", "paths"))]
        if items:
            return " ".join(items)
    return run_dir.name


def collect(roots: list[Path]) -> tuple[dict, str]:
    results, target = {}, None
    for path in sorted(p for r in roots for p in r.rglob("eval/metrics.json")):
        payload = json.loads(path.read_text())
        target = target or payload["concept"]
        for label, per in payload["results"].items():
            key = "original" if label == "original" else label_of(path.parent.parent)
            if key == "original" and key in results:
                continue
            results[key] = per
    if target is None:
        raise SystemExit(f"no eval/metrics.json under {', '.join(map(str, roots))}")
    # Keep only what differs between rows: a sweep's shared overrides say nothing about a row.
    runs = [k for k in results if k != "original"]
    shared = set.intersection(*(set(k.split()) for k in runs)) if len(runs) > 1 else set()
    relabel = {k: " ".join(o for o in k.split() if o not in shared) or k for k in runs}
    return {relabel.get(k, k): v for k, v in results.items()}, target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    results, target = collect(a.roots)
    table = format_table(results, target)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
