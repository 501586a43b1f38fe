"""The DONE marker's hash (what compare's reuse rests on) and the closing "where things are" block of train."""

from __future__ import annotations

from toy_helpers import compose_train

from unlearn.utils.marker import config_hash, is_done, where_things_are, write_done


def test_hash_follows_values_not_locations(tmp_path):
    base = config_hash(compose_train(tmp_path / "a", "method=uce"))
    # Another checkout and cache folder: the same run (data.cache_dir and eval.cache_dir interpolate paths.cache).
    assert config_hash(compose_train(tmp_path / "b", "method=uce", f"paths.cache={tmp_path}/c")) == base
    assert config_hash(compose_train(tmp_path / "a", "method=uce", "run_name=other", "logger=none")) == base
    # A value, and a value that other keys interpolate (eval.clip: ${model.clip}), each change it.
    assert config_hash(compose_train(tmp_path / "a", "method=uce", "seed=1")) != base
    assert config_hash(compose_train(tmp_path / "a", "method=uce", "model.clip=other")) != base


def test_done_marks_only_the_same_config(tmp_path):
    cfg = compose_train(tmp_path, "method=uce")
    write_done(tmp_path / "run", cfg, method="uce")
    assert is_done(tmp_path / "run", cfg)
    assert not is_done(tmp_path / "run", compose_train(tmp_path, "method=uce", "seed=3"))


def test_where_things_are_names_each_output(tmp_path):
    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    (run / "eval").mkdir()
    for name in ("table.md", "grid_toy_stripes.png", "grid_toy_night.png"):
        (run / "eval" / name).write_text("x")
    text = where_things_are(run)
    lines = text.splitlines()
    assert lines[0] == "where things are:"
    assert lines[1].split()[:3] == ["run", "folder", f"{run}/"]
    assert f"{run}/pipeline/" in lines[2] and f"{run}/eval/table.md" in lines[3]
    assert lines[4].split() == ["grids", f"{run}/eval/{{grid_toy_night,grid_toy_stripes}}.png"]
    assert "NudeNet" not in text  # only for nudity runs
