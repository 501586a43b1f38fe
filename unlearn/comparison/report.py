"""What a comparison writes: one table (Markdown + CSV), one image grid per concept, one trade-off plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from unlearn.comparison.intervals import neighbour_mean_ca
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
    """{"original": ..., <method>: ...}: the original model's row once, then each method's last evaluation
    (metrics keyed by `run.key`; over seeds, the mean: see `seed_results`)."""
    results = {"original": metrics[runs[0].key]["results"]["original"]}
    for run in runs:
        results[run.method] = metrics[run.key]["results"][run.label]
    return results


def by_method(runs) -> dict[str, list]:
    """The runs of each method (its seeds), methods in the comparison's order."""
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return groups


def seed_results(runs, metrics: dict[str, dict]) -> dict:
    """Over training seeds: every seed's final results per method, their means and 95 % half-widths, and which
    pairs of methods separate on the target's CA and the neighbours' mean CA (unlearn/comparison/intervals.py)."""
    from unlearn.comparison.intervals import aggregate, separations

    target = metrics[runs[0].key]["concept"]
    per_seed = {m: {str(r.seed): metrics[r.key]["results"][r.label] for r in rs} for m, rs in by_method(runs).items()}
    means, widths = {"original": metrics[runs[0].key]["results"]["original"]}, {}
    for method, seeds in per_seed.items():
        means[method], widths[method] = aggregate(list(seeds.values()))
    pairs = separations({m: list(s.values()) for m, s in per_seed.items()}, target)
    return {"per_seed": per_seed, "mean": means, "half_width": widths, "separations": pairs}


def failed_lines(failed: list[dict]) -> str:
    """One line per failed run: which run, the error's last line, its job's log."""
    return "\n".join(f"- {f['method']}" + (f" seed {f['seed']}" if f["seed"] is not None else "") +
                      f" on {f['concept']}: {f['error']} (log: {f['log']})" for f in failed)


def mark_failed(budgets: dict, failed: list[dict], finished) -> tuple[dict, list[str]]:
    """The iterations cell of a method that lost some seeds names them; a method with no finished run at all is
    a row of its own that reads 'failed'."""
    budgets = dict(budgets)
    alive = {r.method for r in finished}
    for method in dict.fromkeys(f["method"] for f in failed):
        if method in alive:
            seeds = [str(f["seed"]) for f in failed if f["method"] == method]
            budgets[method] = f"{budgets[method]} (failed: seed {', '.join(seeds)})"
    return budgets, [m for m in dict.fromkeys(f["method"] for f in failed) if m not in alive]


def write_table(results: dict, target: str, budgets: dict[str, str], out: Path, extra: dict | None = None,
                half_widths: dict | None = None, note: str = "", failed: list[str] | None = None) -> str:
    """The first seed's layout: rows = models, columns = target then neighbours x CS/CA/FID/dCLIP (with the
    better direction), plus the iterations each method ran and any extra columns (e.g. the attack's). With
    `half_widths` (label -> concept -> metric), a cell reads "mean ± half-width"; `note` is written below;
    each of `failed` (methods with no finished run) is a row that reads "failed", its cells "–"."""
    header, rows = table_rows(results, target, half_widths)
    extra = extra or {}
    extra_cols = list(dict.fromkeys(k for v in extra.values() for k in v))
    header = [header[0], "iterations", *header[1:], *extra_cols]
    rows = [[r[0], budgets.get(r[0], "–"), *r[1:], *[_fmt(extra.get(r[0], {}).get(c)) for c in extra_cols]]
            for r in rows]
    rows += [[m, "failed", *["–"] * (len(header) - 2)] for m in failed or []]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "table.md", table + "\n" + (f"\n{note}\n" if note else ""))
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


def mean_curve(curves: list[list[tuple[int, float, float]]]) -> list[tuple[int, float, float, float, float]]:
    """Seeds' curves -> (iteration, mean target CA, its half-width, mean neighbours' CA, its half-width) at the
    iterations every seed measured (half-widths 0 for one seed)."""
    from unlearn.comparison.intervals import t_interval

    common = set.intersection(*({p[0] for p in c} for c in curves))
    out = []
    for it in sorted(common):
        xs = [p[1] for c in curves for p in c if p[0] == it]
        ys = [p[2] for c in curves for p in c if p[0] == it]
        (mx, hx), (my, hy) = t_interval(xs), t_interval(ys)
        out.append((it, mx, hx or 0.0, my, hy or 0.0))
    return out


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
        pts.append((it, per[target]["ca"], neighbour_mean_ca(per, target)))
    return sorted(pts)


def write_tradeoff_plot(runs, metrics: dict[str, dict], out: Path, title: str) -> Path:
    """Target CA (x, lower = more erased) against the neighbours' mean CA (y, higher = better kept), one curve per
    method from the original model (iteration 0) through every `eval_every` point to its last iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    curves, seeds = {}, {}
    for method, group in by_method(runs).items():
        per_seed = [tradeoff_points(r, metrics[r.key]) for r in group]
        pts = mean_curve(per_seed)
        curves[method] = [p[:2] + p[3:4] for p in pts] if len(group) == 1 else pts
        if len(group) > 1:
            seeds[method] = {str(r.seed): c for r, c in zip(group, per_seed)}
        xs, ys = [p[1] for p in pts], [p[3] for p in pts]
        label = f"{method} ({iterations(group[0])}" + (f", {len(group)} seeds)" if len(group) > 1 else ")")
        line, = ax.plot(xs, ys, marker="o", ms=4, label=label)
        if len(group) > 1:  # 95 % intervals over the training seeds
            ax.errorbar(xs, ys, xerr=[p[2] for p in pts], yerr=[p[4] for p in pts], fmt="none",
                        ecolor=line.get_color(), elinewidth=0.8, capsize=2, alpha=0.7)
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
    write_atomic(out / "tradeoff.json", json.dumps({**curves, **({"seeds": seeds} if seeds else {})}, indent=1))
    return path
