"""NudeNet on I2P in the evaluator: bad input before generation, seeds/guidance from the CSV, the report, e2e."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from unlearn.evaluation import Evaluator
from unlearn.evaluation.i2p_eval import I2PEvaluation
from unlearn.metrics.i2p import I2P_SAMPLE
from unlearn.metrics.nudenet import EXPOSED_CLASSES

MODEL = OmegaConf.create({"clip": "toy", "sample_steps": 2, "guidance_scale": 3.0})


def test_csv_without_prompt_column_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,categories\nhello,sexual\n")
    with pytest.raises(ValueError, match="needs a 'prompt' column; columns found: text, categories"):
        I2PEvaluation(str(bad))


def test_category_selecting_nothing_names_it_and_the_categories():
    with pytest.raises(ValueError, match=r"eval.i2p.category='nudity' selects no prompt .*'sexual'"):
        I2PEvaluation(str(I2P_SAMPLE), category="nudity")


@pytest.mark.parametrize("bad", [1.5, -0.01])
def test_threshold_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=f"eval.i2p.threshold={bad!r} is outside"):
        I2PEvaluation(str(I2P_SAMPLE), threshold=bad)


def test_bad_input_fails_when_the_evaluator_is_built(tmp_path):
    # Built before any image exists: the Evaluator constructor itself raises.
    with pytest.raises(ValueError, match="category='nudity'"):
        Evaluator("nudity", MODEL, tmp_path, i2p={"csv": str(I2P_SAMPLE), "category": "nudity"})
    # Not a nudity concept: the I2P block is ignored.
    assert Evaluator("toy_ring", MODEL, tmp_path, i2p={"csv": str(I2P_SAMPLE)}).i2p is None


def test_jobs_use_the_csv_seeds_and_guidance():
    ev = I2PEvaluation(str(I2P_SAMPLE), category="sexual", images_per_prompt=2)
    jobs = ev.jobs(default_guidance=3.0)
    # Rows 2, 9, 10 of the sample carry "sexual"; row 2: seed 2718281, guidance 7.
    assert len(jobs) == 6 and jobs[0] == ("a red bicycle leaning on a brick wall", 2718281, 7.0)
    assert jobs[1][1] == 2718282
    own = I2PEvaluation(str(I2P_SAMPLE), use_csv_seeds=False, use_csv_guidance=False, seed=5, images_per_prompt=2)
    assert [(s, g) for _, s, g in own.jobs(3.0)[:4]] == [(5, 3.0), (6, 3.0), (7, 3.0), (8, 3.0)]


def test_table_and_reduction():
    ev = I2PEvaluation(str(I2P_SAMPLE), classes=["BELLY_EXPOSED", "FEET_EXPOSED"])
    base = {"num_images": 10, "num_flagged": 3}
    ev.results = {"original": {"BELLY_EXPOSED": 6, "FEET_EXPOSED": 2, "total": 8, **base},
                  "m": {"BELLY_EXPOSED": 1, "FEET_EXPOSED": 1, "total": 2, **base}}
    assert ev.reductions() == {"m": pytest.approx(75.0)}
    lines = ev.table().splitlines()
    assert lines[0] == "| class | original | m |" and lines[2] == "| BELLY_EXPOSED | 6 | 1 |"
    assert lines[-1] == "| reduction vs original % | — | 75.0 |"
    ev.results["original"].update(total=0)
    assert math.isnan(ev.reductions()["m"]) and "n/a" in ev.table().splitlines()[-1]


def test_sample_end_to_end_through_the_evaluator(tmp_path, tiny_pipeline_path):
    from unlearn.models import load_components

    comps = load_components(str(tiny_pipeline_path))
    ev = Evaluator("nudity", MODEL, tmp_path, num_prompts=2, images_per_prompt=1, implicit=False,
                   i2p={"csv": str(I2P_SAMPLE), "images_per_prompt": 1})
    ev.measure("original", comps)
    ev.measure("other", comps, unet=comps.unet)
    ev.report()
    payload = json.loads((tmp_path / "metrics.json").read_text())
    counts = payload["i2p"]["counts"]
    assert set(counts) == {"original", "other"}
    assert counts["original"]["num_images"] == 10 and set(EXPOSED_CLASSES) <= set(counts["original"])
    assert counts["original"] == counts["other"]  # same UNet, same seeds
    assert (tmp_path / "i2p_table.md").read_text().startswith("| class | original | other |")
    assert (tmp_path / "i2p_nudenet.png").stat().st_size > 1000
