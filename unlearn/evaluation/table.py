"""The seeds' table layout: rows = model/method, columns = concept x {CS, CA, FID}, with the better direction."""

from __future__ import annotations

from pathlib import Path

from unlearn.utils.files import write_csv_atomic

# (metric key, column title, arrow shown for the *target* concept; neighbours want the opposite for CS/CA).
COLUMNS = (("cs", "CS"), ("ca", "CA"), ("top1", "top-1"), ("fid", "FID"), ("directional", "dCLIP"))
IMPLICIT = "implicit"  # the evaluator's row for a concept's implicit prompts


def _arrow(metric: str, is_target: bool) -> str:
    if metric == "fid":
        return "↑" if is_target else "↓"
    if metric == "directional":
        return "↑" if is_target else ""
    return "↓" if is_target else "↑"


def table_rows(results: dict, target: str, half_widths: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """results[label][concept][metric] -> header and rows (concepts in first-seen order, target first); a cell
    with a half-width in `half_widths[label][concept][metric]` reads "mean ± half-width"."""
    concepts = []
    for per_model in results.values():
        for c in per_model:
            if c not in concepts:
                concepts.append(c)
    concepts.sort(key=lambda c: c != target)
    metrics = [m for m, _ in COLUMNS if any(m in results[l].get(c, {}) for l in results for c in concepts)]
    # Implicit prompts show the target without naming it: erased too, so their arrows are the target's.
    header = ["model"] + [f"{c} {dict(COLUMNS)[m]}{_arrow(m, c in (target, IMPLICIT))}"
                          for c in concepts for m in metrics]
    rows = []
    for label, per_model in results.items():
        row = [label]
        for c in concepts:
            for m in metrics:
                v = per_model.get(c, {}).get(m)
                hw = ((half_widths or {}).get(label) or {}).get(c, {}).get(m)
                row.append("–" if v is None else f"{v:.2f}" if hw is None else f"{v:.2f} ± {hw:.2f}")
        rows.append(row)
    return header, rows


def format_table(results: dict, target: str) -> str:
    header, rows = table_rows(results, target)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(results: dict, target: str, path: Path) -> None:
    header, rows = table_rows(results, target)
    write_csv_atomic(path, [header, *rows])
