"""What a comparison writes: one table (Markdown + CSV), one image grid per concept, one trade-off plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from unlearn.evaluation.table import table_rows
from unlearn.utils.files import save_figure, write_atomic, write_csv_atomic
from unlearn.utils.grid import save_grid


def iterations(run) -> str:
    """The budget a row was trained with, as the table states it."""
    from hydra.utils import get_class

    if getattr(get_class(run.cfg.method._target_), "closed_form", False):
        return "closed form"
    return str(run.cfg.method.steps)


def final_results(runs, metrics: dict[str, dict]) -> dict[str, dict]:
    """{"original": ..., <method>: ...}: the original model's row once, then each method's last evaluation."""
    results = {"original": metrics[runs[0].method]["results"]["original"]}
    for run in runs:
        results[run.method] = metrics[run.method]["results"][run.label]
    return results


def write_table(results: dict, target: str, budgets: dict[str, str], out: Path, extra: dict | None = None) -> str:
    """The first seed's layout: rows = models, columns = target then neighbours x CS/CA/FID/dCLIP (with the
    better direction), plus the iterations each method ran and any extra columns (e.g. the attack's)."""
    header, rows = table_rows(results, target)
    extra = extra or {}
    extra_cols = list(dict.fromkeys(k for v in extra.values() for k in v))
    header = [header[0], "iterations", *header[1:], *extra_cols]
    rows = [[r[0], budgets.get(r[0], "–"), *r[1:], *[_fmt(extra.get(r[0], {}).get(c)) for c in extra_cols]]
            for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "table.md", table + "\n")
    write_csv_atomic(out / "table.csv", [header, *rows])
    return table


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def write_grids(runs, concepts: list[str], out: Path, n: int) -> dict[str, Path]:
    """Per concept: a row per model (the original first), the same prompts and seeds in every column."""
    paths = {}
    for concept in concepts:
        rows, labels = [], []
        for label, folder in [("original", runs[0].run_dir / "eval" / "images" / "original")] + \
                [(r.method, r.run_dir / "eval" / "images" / r.label) for r in runs]:
            f = folder / f"{concept}.safetensors"
            if f.exists():
                rows.append(load_file(f)["images"][:n])
                labels.append(label)
        if not rows:
            continue
        k = min(len(r) for r in rows)
        paths[concept] = save_grid(torch.cat([r[:k] for r in rows]), out / f"grid_{concept}.png", nrow=k,
                                   labels=labels)
    return paths


def tradeoff_points(run, payload: dict) -> list[tuple[int, float, float]]:
    """(iteration, target CA, neighbours' mean CA) for every evaluation of one run, in training order."""
    target = payload["concept"]
    pts = []
    for label, per in payload["results"].items():
        if label == "original":
            it = 0
        elif label == run.label:
            it = int(run.cfg.method.steps) if iterations(run) != "closed form" else 1
        elif label.startswith(run.label + "@"):
            it = int(label.rsplit("@", 1)[1])
        else:
            continue
        neighbours = [v["ca"] for c, v in per.items() if c not in (target, "implicit") and "ca" in v]
        pts.append((it, per[target]["ca"], sum(neighbours) / len(neighbours) if neighbours else float("nan")))
    return sorted(pts)


def write_tradeoff_plot(runs, metrics: dict[str, dict], out: Path, title: str) -> Path:
    """Target CA (x, lower = more erased) against the neighbours' mean CA (y, higher = better kept), one curve per
    method from the original model (iteration 0) through every `eval_every` point to its last iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    curves = {}
    for run in runs:
        pts = tradeoff_points(run, metrics[run.method])
        curves[run.method] = pts
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        line, = ax.plot(xs, ys, marker="o", ms=4, label=f"{run.method} ({iterations(run)})")
        ax.annotate(str(pts[-1][0]), (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color=line.get_color())
    ax.set_xlabel("target CA (%)  ← erased")
    ax.set_ylabel("neighbours' mean CA (%)  ↑ kept")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.plot([0], [100], marker="*", ms=12, color="gold", markeredgecolor="black", linestyle="none")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    path = out / "tradeoff.png"
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    write_atomic(out / "tradeoff.json", json.dumps(curves, indent=1))
    return path
