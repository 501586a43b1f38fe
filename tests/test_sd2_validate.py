"""`model=sd2` / `model=sd2_v` against the folder they are given: the scheduler's prediction type must be the one
the model config expects, refused in one line (exit 2) before anything loads. No download: the tiny random
pipeline, and a copy of it whose scheduler says v_prediction."""

from __future__ import annotations

import json
import shutil

import pytest
from toy_helpers import compose_train


@pytest.fixture
def v_folder(tmp_path, tiny_pipeline_path):
    folder = tmp_path / "v_pipeline"
    shutil.copytree(tiny_pipeline_path, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    return folder


def found(tmp_path, *overrides) -> list[str]:
    from unlearn.validate import problems

    cfg = compose_train(tmp_path, "concept=van_gogh", "method=uce", "logger=none", "model.clip=toy",
                        "eval.fid_feature=clip", *overrides)
    return [str(p) for p in problems(cfg)]


def test_sd2_configs_name_their_model_and_prediction_type(tmp_path):
    for name, pred, path in (("sd2", "epsilon", "stabilityai/stable-diffusion-2-1-base"),
                             ("sd2_v", "v_prediction", "stabilityai/stable-diffusion-2-1")):
        m = compose_train(tmp_path, f"model={name}").model
        assert (m.name, m.prediction_type, m.path) == (name, pred, path)
    assert "prediction_type" not in compose_train(tmp_path, "model=sd14").model  # sd14 states none


def test_the_folder_must_predict_what_the_model_config_expects(tmp_path, tiny_pipeline_path, v_folder):
    assert found(tmp_path, "model=sd2_v", f"model.path={v_folder}") == []
    assert found(tmp_path, "model=sd2", f"model.path={tiny_pipeline_path}") == []
    assert found(tmp_path, "model=sd14", f"model.path={v_folder}") == []  # no expectation: the folder's own type
    (line,) = found(tmp_path, "model=sd2_v", f"model.path={tiny_pipeline_path}")
    assert line == (f"model.path={tiny_pipeline_path}: its scheduler predicts epsilon (scheduler/scheduler_config.json:"
                    " prediction_type), but model=sd2_v expects v_prediction; use model=sd2 for it")
    (line,) = found(tmp_path, "model=sd2", f"model.path={v_folder}")
    assert line.endswith("its scheduler predicts v_prediction (scheduler/scheduler_config.json: prediction_type), "
                         "but model=sd2 expects epsilon; use model=sd2_v for it")
    (line,) = found(tmp_path, "model=sd2", "model.prediction_type=sample")
    assert line == "model.prediction_type=sample: one of null | epsilon | v_prediction"


def test_a_sample_predicting_folder_is_refused_with_any_model(tmp_path, v_folder):
    config = v_folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    (line,) = found(tmp_path, "model=sd14", f"model.path={v_folder}")
    assert line.endswith("its scheduler predicts sample (scheduler/scheduler_config.json: prediction_type); "
                         "supported: epsilon | v_prediction")


def test_real_concepts_go_with_sd2_and_toy_concepts_do_not(tmp_path):
    assert found(tmp_path, "model=sd2_v") == []  # the Hub id is not cached here: its scheduler is read at load
    (line,) = found(tmp_path, "model=sd2", "concept=toy_ring")
    assert line.startswith("concept=toy_ring: a toy-world concept: add model=toy")
    (line,) = found(tmp_path, "concept=van_gogh")  # the toy model
    assert line.startswith("concept=van_gogh: needs a real model: add model=sd14 (or sd2, sd2_v;")


def test_sd2_v_with_an_eps_folder_fails_in_one_line_before_anything(tmp_path, tiny_pipeline_path, capsys):
    """The entry points' first step (unlearn.cli.preflight, as `python -m unlearn.train ...` runs it)."""
    from unlearn.cli import preflight

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.raises(SystemExit) as stop:
        preflight(["model=sd2_v", f"model.path={tiny_pipeline_path}", "model.clip=toy", "eval.fid_feature=clip",
                   "concept=van_gogh", "method=esd_x", f"paths.run_dir={run_dir}", f"paths.root={tmp_path}",
                   f"paths.cache={cache}"], "train", "unlearn.train")
    assert stop.value.code == 2
    want = (f"error: model.path={tiny_pipeline_path}: its scheduler predicts epsilon (scheduler/scheduler_config.json:"
            " prediction_type), but model=sd2_v expects v_prediction; use model=sd2 for it")
    assert capsys.readouterr().err.strip().splitlines() == [want]
    assert not run_dir.exists() and not cache.exists()
