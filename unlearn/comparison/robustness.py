"""The attacks' columns in a comparison: clean detection, then per attack its success rate, iterations used and
control (random tokens, no optimisation), then CCS and CRS, for every model.

One `Robustness` (original model, detector, reference images, attacks) serves every method and seed; each model's
result is kept in its run folder keyed by the robustness settings, so a rerun of `compare` attacks nothing twice.
With several training seeds every seed's model is attacked and a cell reads "mean ± half-width" (Student's t over
the seeds, `unlearn.comparison.intervals.t_interval`), as the table's other cells.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from unlearn.comparison.intervals import t_interval
from unlearn.models.fingerprint import sha_of
from unlearn.utils.files import write_atomic


def columns_of(row: dict) -> dict:
    """{title: value} of one model's robustness row (unlearn.attacks.runner.Robustness.run)."""
    from unlearn.attacks.runner import attack_columns

    out = {"clean det. %↓": row.get("clean_rate")}
    for c in attack_columns(row):
        name = c["attack"]
        out[f"ASR % ({name})↓"] = c.get("asr")
        out[f"iterations ({name})"] = c.get("iterations")
        out[f"{c.get('control') or 'control'} det. % ({name})"] = c.get("control_rate")
    out["CCS↓"], out["CRS↓"] = row.get("ccs"), row.get("crs")
    return out


def cell(values: list, digits: int = 1) -> float | str | None:
    """One value as it is; several (one per seed) as "mean ± half-width" to `digits` decimals; None where a seed
    has none."""
    if not values or any(v is None for v in values):
        return None
    if len(values) == 1:
        return float(values[0])
    mean, hw = t_interval([float(v) for v in values])
    return f"{mean:.{digits}f} ± {hw:.{digits}f}"


def robustness_cells(rows_by_label: dict[str, list[dict]]) -> dict[str, dict]:
    """{label: {title: cell}} from every label's rows (one per training seed)."""
    out = {}
    for label, rows in rows_by_label.items():
        per_seed = [columns_of(r) for r in rows]
        titles = list(dict.fromkeys(t for cols in per_seed for t in cols))
        # By column, not by value: a rate of 0.0 ± 0.0 reads as the rates do, CRS (a distance in [0, 1]) with 2.
        out[label] = {t: cell([cols.get(t) for cols in per_seed], 2 if t.startswith("CRS") else 1) for t in titles}
    return out


def attack_configs(rc: dict) -> list[dict]:
    """`robustness.attack`, then every attack named in `robustness.attacks`."""
    from unlearn.attacks.runner import attack_configs as configs

    return configs(rc["attack"], rc.get("attacks"))


def robustness_columns(cfg, runs, target: str) -> dict[str, dict]:
    """{label: {column: cell}} for the original model and every method (every run of it: one per seed)."""
    from unlearn.attacks.runner import Robustness
    from unlearn.export.components import components_of

    rc = OmegaConf.to_container(cfg.robustness, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    key = sha_of({"rob": rc, "model": model, "concept": target})[:16]
    rob = None
    rows: dict[str, list[dict]] = {}
    for label, folder, source in [("original", runs[0].run_dir, None)] + \
            [(r.method, r.run_dir, r.run_dir) for r in runs]:
        cache = folder / f"robustness-{label}-{key}.json"
        if cache.exists():
            row = json.loads(cache.read_text())
        else:
            if rob is None:
                rob = Robustness(target, attack_configs(rc), model, rc["detector"], rc["recovery"])
            # A run folder: its pipeline/, or its delta applied to the original model (export=delta).
            erased = rob.original.unet if source is None else \
                components_of(source, rob.original, dtype=model.get("dtype", "float32"))
            if source is not None:
                erased.unet.requires_grad_(False).eval()
            row = rob.run(erased, label=label)
            row["settings"] = rob.settings
            write_atomic(cache, json.dumps(row, indent=1, default=str))
        rows.setdefault(label, []).append(row)
    return robustness_cells(rows)
