"""Test helpers: compose the train config into a test's folder; end to end on the shipped toy model, train through
`unlearn.train.run`, read the metrics, check the issues' erase/keep thresholds. Imported by the test files (pytest
puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]

FAST = ["trainer=cpu", "logger=none", "trainer.enable_progress_bar=false",
        "eval.num_prompts=12", "eval.images_per_prompt=2", "eval.implicit=false"]


def compose_train(tmp_path: Path, *overrides: str):
    """The `train` config with its outputs (run folder, cache) under tmp_path."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.root={tmp_path}", f"paths.run_dir={tmp_path}/run", *overrides])


def train_and_measure(tmp_path: Path, cache: Path, *overrides: str) -> dict:
    from unlearn.train import run

    run(compose_train(tmp_path, f"paths.cache={cache}", *FAST, *overrides))
    return json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())


def assert_erased_and_kept(payload: dict, method_label: str, bounds=None, by: str = "ca") -> None:
    """The target's CA (or top-1, `by="top1"`) falls to <= 30 % from >= 90 %; every neighbour is kept by CA, CS
    and FID (the toy model's bounds, unlearn/evaluation/kept.py), not by CA alone."""
    from unlearn.evaluation.kept import KeptBounds, kept_neighbours

    target = payload["concept"]
    before, after = payload["results"]["original"], payload["results"][method_label]
    assert before[target][by] >= 90, before
    assert after[target][by] <= 30, after
    broken = {c: v for c, v in kept_neighbours(before, after, target, bounds or KeptBounds()).items() if v}
    assert not broken, f"{method_label}: neighbours not kept: {broken}"




def assert_candidates_evaluate(tmp_path: Path, common: list[str], folders: list[str], concept: str) -> dict:
    """`unlearn.evaluate` on every trained folder with a tiny budget: one row per folder plus the original, every
    number of `concept`'s row finite (the tiny random models' end-to-end check)."""
    import math

    from unlearn.evaluate import run as evaluate

    cfg = compose_train(tmp_path / "eval", *common, "eval.fid_feature=clip", "eval.num_prompts=1",
                        "eval.images_per_prompt=2", "eval.implicit=false", "eval.neighbours=false",
                        f"+candidates=[{','.join(folders)}]")
    rows = evaluate(cfg)["results"]
    assert len(rows) == len(folders) + 1 and "original" in rows, sorted(rows)
    for label, row in rows.items():
        numbers = [v for v in row[concept].values() if isinstance(v, (int, float))]
        assert numbers and all(math.isfinite(v) for v in numbers), (label, row)
    return rows
