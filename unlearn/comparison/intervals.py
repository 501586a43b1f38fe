"""Numbers over training seeds: each cell's mean and the half-width of its 95 % interval, and which pairs separate.

The interval is Student's t over the training seeds alone: mean ± t(0.975, n-1) s / sqrt(n), s the sample standard
deviation. Prompts and evaluation seeds are the same for every run (eval.seed), so they are not resampled: the
interval says how much a result moves when only the training seed changes. Two methods "separate" on a measure
when their intervals do not overlap; otherwise the comparison cannot tell them apart.
"""

from __future__ import annotations

import math
from itertools import combinations

from scipy.stats import t as student_t

LEVEL = 0.95


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float | None]:
    """(mean, half-width); half-width None for a single value (no spread to measure)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def aggregate(per_seed: list[dict]) -> tuple[dict, dict]:
    """Seeds' results[concept][metric] -> (means, half-widths) of the same shape (metrics every seed has)."""
    means, widths = {}, {}
    for concept in per_seed[0]:
        for metric in per_seed[0][concept]:
            values = [r.get(concept, {}).get(metric) for r in per_seed]
            if any(v is None for v in values):
                continue
            mean, hw = t_interval([float(v) for v in values])
            means.setdefault(concept, {})[metric] = mean
            widths.setdefault(concept, {})[metric] = hw
    return means, widths


def neighbour_mean_ca(results: dict, target: str) -> float:
    values = [row["ca"] for c, row in results.items() if c not in (target, "implicit") and "ca" in row]
    return sum(values) / len(values) if values else float("nan")


def overlap(a: tuple[float, float | None], b: tuple[float, float | None]) -> bool:
    """Whether two (mean, half-width) intervals overlap; a missing width is no interval: always 'overlap'."""
    if a[1] is None or b[1] is None:
        return True
    return a[0] - a[1] <= b[0] + b[1] and b[0] - b[1] <= a[0] + a[1]


def separations(per_method: dict[str, list[dict]], target: str) -> list[dict]:
    """For every pair of methods: do their intervals separate on the target's CA, on the neighbours' mean CA and,
    where every run has it, on the target's top-1?"""
    measures = {"target CA": lambda r: r[target]["ca"], "neighbours' mean CA": lambda r: neighbour_mean_ca(r, target)}
    if all("top1" in r[target] for runs in per_method.values() for r in runs):
        measures["target top-1"] = lambda r: r[target]["top1"]
    out = []
    for a, b in combinations(per_method, 2):
        for name, read in measures.items():
            ia = t_interval([read(r) for r in per_method[a]])
            ib = t_interval([read(r) for r in per_method[b]])
            row = {"measure": name, "a": a, "b": b, "a_mean": ia[0], "a_half_width": ia[1], "b_mean": ib[0],
                   "b_half_width": ib[1], "separate": not overlap(ia, ib)}
            if row["separate"]:
                row["lower"] = a if ia[0] < ib[0] else b
            out.append(row)
    return out


def format_separations(rows: list[dict]) -> str:
    """Markdown: the pairs that separate, then those the intervals cannot tell apart."""
    head = (f"Pairs of methods, {int(LEVEL * 100)} % t-intervals over training seeds "
            "(prompts and evaluation seeds fixed, not resampled):")
    if rows and all(r["a_half_width"] is None or r["b_half_width"] is None for r in rows):
        # Without a spread there is no interval: saying "overlap" of 93.8 vs 3.1 would read as a measured tie.
        return (f"{head} none here, since every method has one training seed; no pair is ranked "
                "(seeds=[0,1,2] gives intervals).")
    lines = [head]
    for r in sorted(rows, key=lambda r: not r["separate"]):  # stable: the separating pairs first
        verdict = (f"separate ({r['lower']} lower)" if r["separate"] else "cannot separate (intervals overlap)"
                   if r["a_half_width"] is not None and r["b_half_width"] is not None
                   else "cannot separate (one training seed: no interval)")
        lines.append(f"- {r['measure']}: {r['a']} {_cell(r['a_mean'], r['a_half_width'])} vs {r['b']} "
                     f"{_cell(r['b_mean'], r['b_half_width'])}: {verdict}")
    return "\n".join(lines)


def _cell(mean: float, hw: float | None) -> str:
    return f"{mean:.1f}" if hw is None else f"{mean:.1f} ± {hw:.1f}"
