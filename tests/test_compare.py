"""`python -m unlearn.compare`: bad requests refused before any work; on a tiny random SD, several methods side by
side give one table, grids and a trade-off plot, a rerun reuses finished runs, and sequential stages chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from unlearn.comparison.plan import CompareError, plan_runs
from unlearn.utils.marker import read_done

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("overrides", "named"), [
    (["methods=[cdc_cpg_official,esd_y]"], "'esd_y'"),
    (["methods=[]"], "methods=[]"),
    (["methods=[distill,distill]"], "'distill' is listed twice"),
    (["methods=[distill]", "concepts=[toy_ring,toy_rnig]"], "'toy_rnig'"),
    (["methods=[distill]", "concepts=[toy_ring,toy_diamond,toy_ring]"], "'toy_ring' is repeated"),
    (["methods=[distill]", "concepts=[]"], "concepts=[]"),
    (["methods=[distill]", "seeds=[]"], "seeds=[]"),
    (["methods=[distill]", "seeds=[0,1,0]"], "seeds: 0 is listed twice"),
    (["methods=[distill]", "seeds=[0,-1]"], "seeds: -1 is not an integer >= 0"),
    (["methods=[distill]", "seeds=[0,a]"], "seeds: 'a' is not an integer >= 0"),
    (["methods=[distill]", "seeds=3"], "seeds=3"),
    (["methods=[distill]", "seeds=[0,1]", "concepts=[toy_ring,toy_cross]"], "a sequential comparison runs one seed"),
])
def test_bad_requests_name_the_value(tmp_path, overrides, named):
    with pytest.raises(CompareError, match=named.replace("[", r"\[").replace("]", r"\]")):
        plan_runs([f"paths.root={tmp_path}", *overrides])


def test_a_method_without_recipe_is_refused(tmp_path):
    with pytest.raises(CompareError, match="'cdc_cpg' has no recipe"):
        plan_runs([f"paths.root={tmp_path}", "methods=[cdc_cpg]", "recipes=none", "+recipes.distill=[]"])


def test_cli_fails_fast_with_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-m", "unlearn.compare", f"paths.root={tmp_path}", "methods=[nope]"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert out.returncode == 2
    assert "error: methods=nope: each one of " in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_seeds_plan_one_run_per_method_and_seed(tmp_path):
    _, runs = plan_runs([f"paths.root={tmp_path}", "methods=[uce,distill]", "seeds=[0,2]", f"out_dir={tmp_path}/c"])
    assert [(r.method, r.seed, r.cfg.seed) for r in runs] == [("uce", 0, 0), ("uce", 2, 2), ("distill", 0, 0),
                                                               ("distill", 2, 2)]
    assert [r.run_dir for r in runs][:2] == [tmp_path / "c/runs/uce/seed0", tmp_path / "c/runs/uce/seed2"]
    assert runs[0].cfg.data.seed == runs[1].cfg.data.seed  # one prepared set for every training seed
    assert [r.key for r in runs][:2] == ["uce/seed0", "uce/seed2"]


def test_common_budget_keeps_the_warmup_share(tmp_path):
    _, runs = plan_runs([f"paths.root={tmp_path}", "methods=[cdc_cpg_official,distill]", "budget=100"])
    cdc, distill = runs
    assert (cdc.cfg.method.steps, cdc.cfg.method.warmup_steps) == (100, 20)  # toy recipe: 60 of 300
    assert distill.cfg.method.steps == 100


def tiny(tmp_path, pipeline) -> list[str]:
    return [f"paths.root={tmp_path}", f"paths.cache={tmp_path}/cache", f"model.path={pipeline}", "recipes=none",
            "budget=2", "eval_every=1", "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false",
            "data.num_prompts=2", "data.images_per_prompt=2", "data.batch_size=2", "data.gen_batch_size=2",
            "model.sample_steps=2", "eval.num_prompts=2", "eval.images_per_prompt=1", "eval.implicit=false",
            "method.trainable=cross_attn"]


def test_compare_writes_table_grids_plot_and_reuses_runs(tmp_path, tiny_pipeline_path):
    from unlearn.compare import compare

    # A recipe is per method: distill's `latents` override never reaches cdc_cpg, which has no such key.
    args = [*tiny(tmp_path, tiny_pipeline_path), "concept=toy_ring", "methods=[distill,cdc_cpg]",
            f"out_dir={tmp_path}/cmp", "+recipes.distill=['method.latents=data']", "+recipes.cdc_cpg=[]"]
    summary = compare(args)
    out = tmp_path / "cmp"
    assert summary["runs"] == {"distill/1": "trained", "cdc_cpg/1": "trained"}
    table = (out / "table.md").read_text().splitlines()
    assert [r.split("|")[1].strip() for r in table[2:]] == ["original", "distill", "cdc_cpg"]
    assert [r.split("|")[2].strip() for r in table[2:]] == ["–", "2", "2"]
    assert "toy_ring CA↓" in table[0] and "toy_diamond CA↑" in table[0]
    for concept in ("toy_ring", "toy_diamond", "toy_triangle", "toy_cross"):
        assert (out / f"grid_{concept}.png").exists()
    curves = json.loads((out / "tradeoff.json").read_text())
    assert [p[0] for p in curves["distill"]] == [0, 1, 2]  # original, @1, final
    assert (out / "tradeoff.png").stat().st_size > 1000
    # The original row is the same model on the same prompts and seeds for every method.
    orig = [load_file(out / "runs" / m / "eval/images/original/toy_ring.safetensors")["images"]
            for m in ("distill", "cdc_cpg")]
    assert (orig[0] == orig[1]).all()
    assert read_done(out / "runs" / "distill")["method"] == "distill"

    again = compare(args)
    assert again["runs"] == {"distill/1": "reused", "cdc_cpg/1": "reused"}
    # The attack's columns, on the reused runs: one row each, computed once and then read back.
    attack = ["robustness.enabled=true", "robustness.attack.iterations=1", "robustness.attack.num_timesteps=1",
              "robustness.attack.num_prompts=2", "robustness.recovery.psi=[0.5]"]
    compare([*args, *attack])
    header, _, *rows = (out / "table.md").read_text().splitlines()
    assert header.split("|")[-7:-1] == [" clean det. %↓ ", " ASR % (UnlearnDiffAtk)↓ ", " iterations (UnlearnDiffAtk) ",
                                        " random prefix det. % (UnlearnDiffAtk) ", " CCS↓ ", " CRS↓ "]
    assert all(r.split("|")[-6].strip() != "–" for r in rows)  # every model has an ASR
    cached = sorted(p.name.split("-")[1] for p in out.glob("runs/*/robustness-*.json"))
    assert cached == ["cdc_cpg", "distill", "original"]
    changed = compare([*args[:-1], "+recipes.cdc_cpg=['method.lam=0.5']"])
    assert changed["runs"] == {"distill/1": "reused", "cdc_cpg/1": "trained"}
    kept = out / "runs" / "cdc_cpg.replaced-1"  # the finished run of the former config is kept, not deleted
    assert read_done(kept)["config_hash"] != read_done(out / "runs" / "cdc_cpg")["config_hash"]
    assert (kept / "pipeline" / "model_index.json").exists()


def test_sequential_stages_chain_and_resume(tmp_path, tiny_pipeline_path):
    from unlearn.compare import compare

    args = [*tiny(tmp_path, tiny_pipeline_path), "concepts=[toy_ring,toy_diamond]", "methods=[distill]",
            f"out_dir={tmp_path}/seq", "+recipes.distill=['method.latents=data']"]
    summary = compare(args)
    out = tmp_path / "seq"
    assert summary["runs"] == {"distill/1": "trained", "distill/2": "trained"}
    stage2 = (out / "runs/distill/stage2-toy_diamond/config.yaml").read_text()
    assert str(out / "runs/distill/stage1-toy_ring/pipeline") in stage2  # stage 2 starts from stage 1's model
    tables = json.loads((out / "sequential.json").read_text())
    assert list(tables["1"]["distill"]) == ["toy_ring", "toy_diamond", "toy_triangle", "toy_cross"]
    assert list(tables["2"]["distill"]) == ["toy_ring", "toy_diamond", "toy_triangle", "toy_cross"]
    text = (out / "sequential.md").read_text()
    assert "Stage 2: erased toy_ring + toy_diamond" in text and "toy_diamond CA↓" in text
    # A killed stage 2 (no DONE marker) is redone; stage 1 never is.
    (out / "runs/distill/stage2-toy_diamond/DONE").unlink()
    again = compare(args)
    assert again["runs"] == {"distill/1": "reused", "distill/2": "trained"}


def test_compare_over_seeds_reports_intervals_and_every_seed(tmp_path, tiny_pipeline_path):
    from unlearn.compare import compare

    args = [*tiny(tmp_path, tiny_pipeline_path), "concept=toy_ring", "methods=[distill,conabl]", "seeds=[0,1]",
            f"out_dir={tmp_path}/cmp", "+recipes.distill=['method.latents=data']", "+recipes.conabl=[]",
            "eval_every=0"]
    summary = compare(args)
    out = tmp_path / "cmp"
    assert summary["runs"] == {f"{m}/seed{s}": "trained" for m in ("distill", "conabl") for s in (0, 1)}
    per_seed = summary["seeds"]["per_seed"]
    assert set(per_seed) == {"distill", "conabl"} and set(per_seed["distill"]) == {"0", "1"}
    # the training seed reached the runs: their configs say it, and the two seeds' results differ
    assert [OmegaConf.load(out / f"runs/conabl/seed{s}/config.yaml").seed for s in (0, 1)] == [0, 1]
    assert per_seed["conabl"]["0"] != per_seed["conabl"]["1"]
    mean = summary["seeds"]["mean"]["distill"]["toy_ring"]["cs"]
    assert mean == pytest.approx((per_seed["distill"]["0"]["toy_ring"]["cs"] +
                                  per_seed["distill"]["1"]["toy_ring"]["cs"]) / 2)
    text = (out / "table.md").read_text()
    rows = {r.split("|")[1].strip(): r for r in text.splitlines()[2:5]}
    assert " ± " in rows["distill"] and " ± " not in rows["original"]
    assert "- target CA: distill" in text and "- neighbours' mean CA: distill" in text
    assert "t-intervals over training seeds" in text
    curves = json.loads((out / "tradeoff.json").read_text())
    assert set(curves["seeds"]["distill"]) == {"0", "1"} and len(curves["distill"][0]) == 5
    assert compare(args)["runs"] == {f"{m}/seed{s}": "reused" for m in ("distill", "conabl") for s in (0, 1)}
