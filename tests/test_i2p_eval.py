"""NudeNet on I2P in the evaluator: bad input before generation, seeds/guidance from the CSV, the report, e2e."""

from __future__ import annotations

import json
import math
import sys

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


# ---------------------------------------------------------------- NudeNet by default for nudity, stubbed detector
class StubDetector:
    """Stands in for nudenet.NudeDetector: the same detections for every image, and a count of the calls."""

    def __init__(self, detections):
        self.detections, self.calls = detections, 0

    def detect(self, bgr):
        self.calls += 1
        return self.detections


@pytest.fixture
def stub_nudenet(monkeypatch):
    # Per image at threshold 0.6: two belly detections count, the feet one is below it, a face is not a class.
    stub = StubDetector([{"class": "BELLY_EXPOSED", "score": 0.9}, {"class": "BELLY_EXPOSED", "score": 0.6},
                         {"class": "FEET_EXPOSED", "score": 0.59}, {"class": "FACE_FEMALE", "score": 0.99}])
    monkeypatch.setattr("unlearn.metrics.nudenet.nude_detector", lambda *a, **k: stub)
    monkeypatch.setattr("unlearn.evaluation.i2p_eval.nudenet_unavailable", lambda *a, **k: None)
    return stub


@pytest.fixture
def no_nudenet(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # `import nudenet` now raises ImportError


def nudity_cfg(tmp_path, pipeline, *overrides):
    from toy_helpers import compose_train

    return compose_train(tmp_path, "model=sd14", f"model.path={pipeline}", "model.clip=toy", "model.sample_steps=2",
                         "model.guidance_scale=3.0", "eval.fid_feature=clip", "concept=nudity", "method=uce",
                         "logger=none", "trainer=cpu", "eval.num_prompts=2", "eval.images_per_prompt=1",
                         *overrides)


def test_nudity_is_measured_by_nudenet_on_the_sample_by_default(tmp_path):
    from hydra.utils import instantiate
    from toy_helpers import compose_train

    cfg = compose_train(tmp_path, "concept=nudity")
    assert cfg.eval.i2p.csv == "sample"
    ev = instantiate(cfg.eval, concept=cfg.concept, model_cfg=cfg.model, out_dir=tmp_path)
    assert ev.i2p is not None and ev.i2p.settings["csv"] == str(I2P_SAMPLE) and ev.i2p.settings["placeholder_sample"]
    assert len(ev.i2p.rows) == 10 and ev.implicit == []  # no CLIP score of the implicit prompts for nudity
    other = compose_train(tmp_path, "concept=toy_ring")
    assert instantiate(other.eval, concept=other.concept, model_cfg=other.model, out_dir=tmp_path).i2p is None
    off = compose_train(tmp_path, "concept=nudity", "eval.i2p.csv=null")
    assert instantiate(off.eval, concept=off.concept, model_cfg=off.model, out_dir=tmp_path).i2p is None


def test_a_missing_detector_is_one_line_naming_what_to_install(tmp_path, no_nudenet):
    from unlearn.evaluation.i2p_eval import DetectorUnavailable

    with pytest.raises(DetectorUnavailable, match=r"^NudeNet cannot be imported \(\w*Error.*pip install "
                                                  r"'nudenet>=3\.4,<4'.*eval\.i2p\.csv=null") as err:
        Evaluator("nudity", MODEL, tmp_path, i2p={"csv": "sample"})
    assert "\n" not in str(err.value)
    assert Evaluator("toy_ring", MODEL, tmp_path, i2p={"csv": "sample"}).i2p is None  # not needed there


def test_a_missing_detector_stops_train_before_any_model_loads(tmp_path, tiny_pipeline_path, no_nudenet,
                                                               monkeypatch):
    from unlearn.models import loading
    from unlearn.train import run
    from unlearn.validate import ConfigError

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_components", refuse)
    with pytest.raises(ConfigError) as err:
        run(nudity_cfg(tmp_path, tiny_pipeline_path))
    lines = [str(p) for p in err.value.problems if "NudeNet" in str(p)]
    assert len(lines) == 1 and lines[0].startswith("eval.i2p.csv=sample: NudeNet cannot be imported")
    assert "pip install 'nudenet>=3.4,<4'" in lines[0]
    assert not (tmp_path / "run" / "eval").exists()


def test_i2p_block_is_checked_with_the_config(tmp_path, tiny_pipeline_path, stub_nudenet):
    from unlearn.validate import problems

    found = {p.key: str(p) for p in problems(nudity_cfg(tmp_path, tiny_pipeline_path, "eval.i2p.category=nudity",
                                                         "eval.i2p.threshold=2", "eval.i2p.classes=[FACE_FEMALE]"))}
    assert "sexual" in found["eval.i2p.category"] and "[0, 1]" in found["eval.i2p.threshold"]
    assert "BELLY_EXPOSED" in found["eval.i2p.classes"]
    missing = problems(nudity_cfg(tmp_path, tiny_pipeline_path, f"eval.i2p.csv={tmp_path}/nowhere.csv"))
    assert [p.key for p in missing] == ["eval.i2p.csv"] and "not found" in str(missing[0])


def test_nudenet_unavailable_reasons(tmp_path):
    from unlearn.metrics.nudenet import nudenet_unavailable

    try:
        import nudenet  # noqa: F401
    except Exception:  # noqa: BLE001
        pytest.skip("nudenet is not loadable here")
    assert nudenet_unavailable() is None
    assert "model file" in nudenet_unavailable(str(tmp_path / "none.onnx"))


def test_stubbed_detector_counts_per_class_through_the_evaluator(tmp_path, tiny_pipeline_path, stub_nudenet):
    from unlearn.models import load_components

    comps = load_components(str(tiny_pipeline_path))
    ev = Evaluator("nudity", MODEL, tmp_path, num_prompts=2, images_per_prompt=1, i2p={"csv": "sample"})
    ev.measure("original", comps)
    ev.report()
    payload = json.loads((tmp_path / "metrics.json").read_text())
    counts = payload["i2p"]["counts"]["original"]
    assert counts["BELLY_EXPOSED"] == 20 and counts["FEET_EXPOSED"] == 0 and counts["total"] == 20
    assert counts["num_images"] == 10 and counts["num_flagged"] == 10 and stub_nudenet.calls == 10
    # CLIP for nudity: the zero-shot share (nude vs clothed prompt) stays, the CLIP score of the prompt does not.
    assert set(payload["results"]["original"]) == {"nudity"}
    assert "ca" in payload["results"]["original"]["nudity"] and "cs" not in payload["results"]["original"]["nudity"]


def test_train_reports_nudenet_for_nudity(tmp_path, tiny_pipeline_path, stub_nudenet):
    from unlearn.train import run

    res = run(nudity_cfg(tmp_path, tiny_pipeline_path))
    i2p = res["metrics"]["i2p"]
    assert set(i2p["counts"]) == {"original", "uce"} and i2p["counts"]["uce"]["BELLY_EXPOSED"] == 20
    from unlearn.utils.marker import where_things_are

    where = where_things_are(res["run_dir"])
    assert "NudeNet on I2P" in where and str(tmp_path / "run" / "eval" / "i2p_table.md") in where


def test_compare_columns_from_the_runs_metrics():
    from unlearn.evaluation.i2p_eval import compare_columns, compare_counts, counts_table

    def row(n):
        return {"BELLY_EXPOSED": n, "total": n, "num_images": 10, "num_flagged": min(n, 10)}

    settings = {"classes": ["BELLY_EXPOSED"]}
    payloads = {"uce": {"i2p": {"settings": settings, "counts": {"original": row(8), "uce": row(2)}}},
                "esd_x": {"i2p": {"settings": settings, "counts": {"original": row(8), "esd_x": row(6)}}}}
    found = compare_counts(payloads, {"uce": "uce", "esd_x": "esd_x"})
    cols = compare_columns(found)
    assert cols["uce"]["NudeNet total↓"] == 2 and cols["uce"]["NudeNet reduction %↑"] == pytest.approx(75.0)
    assert cols["esd_x"]["NudeNet reduction %↑"] == pytest.approx(25.0)
    assert cols["original"]["NudeNet reduction %↑"] is None
    assert counts_table(found["counts"], found["classes"]).splitlines()[0] == "| class | original | uce | esd_x |"
    assert compare_counts({"uce": {"results": {}}}, {"uce": "uce"}) is None  # not a nudity concept


def test_compare_reports_nudenet_for_nudity(tmp_path, tiny_pipeline_path, stub_nudenet):
    from unlearn.compare import compare

    summary = compare([f"paths.root={tmp_path}", f"paths.cache={tmp_path}/cache", "model=sd14",
                       f"model.path={tiny_pipeline_path}", "model.clip=toy", "model.sample_steps=2",
                       "eval.fid_feature=clip", "recipes=none", "logger=none", "trainer=cpu", "eval.num_prompts=2",
                       "eval.images_per_prompt=1", "concept=nudity", "methods=[uce]", f"out_dir={tmp_path}/cmp"])
    header, _, *rows = (tmp_path / "cmp" / "table.md").read_text().splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert "nudity CS↓" not in cols and "nudity CA↓" in cols
    cells = {r.split("|")[1].strip(): dict(zip(cols, (c.strip() for c in r.strip("|").split("|")))) for r in rows}
    nudenet = ["NudeNet total↓", "NudeNet flagged images↓", "NudeNet reduction %↑"]
    assert [cells["original"][c] for c in nudenet] == ["20", "10", "–"]
    assert [cells["uce"][c] for c in nudenet] == ["20", "10", "0.00"]
    per_class = (tmp_path / "cmp" / "i2p_table.md").read_text().splitlines()
    assert per_class[0] == "| class | original | uce |" and "| BELLY_EXPOSED | 20 | 20 |" in per_class
    assert summary["i2p_table"].endswith("i2p_table.md")
