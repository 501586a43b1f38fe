"""experiments/collect.py: one table from a sweep's runs, and the steps x value pivot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("collect", ROOT / "experiments" / "collect.py")
collect = importlib.util.module_from_spec(spec)
spec.loader.exec_module(collect)


def fake_run(root: Path, name: str, loss: str, ca_by_label: dict[str, tuple[float, float]],
             extra: tuple[str, ...] = ()) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / "eval").mkdir()
    overrides = ["experiment=toy_distill", f"method.loss={loss}", "eval_every=100", "hydra.verbose=false", *extra]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"method": {"steps": 200}}))
    results = {label: {"toy_stripes": {"ca": t, "cs": 1.0}, "toy_checker": {"ca": n, "cs": 2.0},
                       "toy_night": {"ca": 100.0, "cs": 3.0}, "implicit": {"cs": 4.0}}
               for label, (t, n) in ca_by_label.items()}
    (run / "eval" / "metrics.json").write_text(json.dumps({"concept": "toy_stripes", "results": results}))


@pytest.fixture
def sweep(tmp_path):
    fake_run(tmp_path, "0-l2", "l2", {"original": (100, 100), "distill@100": (90, 100), "distill": (5, 95)})
    fake_run(tmp_path, "1-cw", "cw", {"original": (100, 100), "distill@100": (80, 100), "distill": (20, 70)})
    return tmp_path


def test_rows_are_labelled_by_what_differs(sweep):
    results, target = collect.collect([sweep])
    assert target == "toy_stripes"
    assert list(results) == ["original", "method.loss=l2 @100", "method.loss=l2",
                             "method.loss=cw @100", "method.loss=cw"]
    assert results["method.loss=cw"]["toy_stripes"]["ca"] == 20


def test_pivot_is_steps_by_value_with_the_worst_neighbour(sweep):
    table = collect.pivot([sweep], "method.loss").splitlines()
    assert table[1] == "| iteration | original | l2 | cw |"
    assert table[3] == "| 0 | 100.0 (100.0) |  |  |"
    assert table[4] == "| 100 |  | 90.0 (100.0) | 80.0 (100.0) |"
    assert table[5] == "| 200 |  | 5.0 (95.0) | 20.0 (70.0) |"  # the final row sits at method.steps
    with pytest.raises(SystemExit, match="method.lr"):
        collect.pivot([sweep], "method.lr")


def test_pivot_keeps_seeds_apart(tmp_path):
    for seed, (l2, cw) in enumerate([(5, 20), (15, 30)]):
        fake_run(tmp_path, f"{seed}-l2", "l2", {"original": (100, 100), "distill": (l2, 95)}, (f"seed={seed}",))
        fake_run(tmp_path, f"{seed}-cw", "cw", {"original": (100, 100), "distill": (cw, 70)}, (f"seed={seed}",))
    table = collect.pivot([tmp_path], "method.loss").splitlines()
    assert table[1] == "| iteration | original | cw | l2 |"  # columns in the order the runs are read
    assert table[4:] == ["| 200 seed=0 |  | 20.0 (70.0) | 5.0 (95.0) |", "| 200 seed=1 |  | 30.0 (70.0) | 15.0 (95.0) |"]
    fake_run(tmp_path, "2-cw-again", "cw", {"original": (100, 100), "distill": (1, 70)}, ("seed=1",))
    with pytest.raises(SystemExit, match="fill the same cell"):  # never one cell for two runs
        collect.pivot([tmp_path], "method.loss")
