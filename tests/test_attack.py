"""UnlearnDiffAtk: the simplex projection, STE, schedule, prompt slots, bad input, and the sanity properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from unlearn.attack import (
    PrefixPrompt,
    Robustness,
    STESample,
    attack_prompt,
    check_attack_config,
    project_simplex,
    timestep_schedule,
)

TINY_MODEL = {"path": None, "clip": "toy", "sample_steps": 2, "guidance_scale": 3.0, "dtype": "float32"}
FAST = {"k": 2, "iterations": 2, "num_timesteps": 2, "lr": 0.01, "weight_decay": 0.1, "num_prompts": 3,
        "filter_references": False, "seed": 100000}


def bisection_projection(a: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """UnlearnDiffAtk's route to the same point: find mu with sum(clip(a - mu, 0, 1)) = 1 by bisection."""
    lo, hi = a.min() - 1, a.max()
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.clip(a - mid, 0, 1).sum() > 1 else (lo, mid)
    return np.clip(a - (lo + hi) / 2, 0, 1)


def test_simplex_projection_matches_bisection():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 7, generator=g, dtype=torch.float64)
    p = project_simplex(v)
    for row, ref in zip(p.numpy(), [bisection_projection(r) for r in v.numpy()]):
        np.testing.assert_allclose(row, ref, atol=1e-9)
    assert torch.allclose(p.sum(-1), torch.ones(4, dtype=torch.float64)) and (p >= 0).all()
    on = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(project_simplex(on), on)


def test_ste_forward_samples_one_hot_and_backward_is_clipped_identity():
    probs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    out = STESample.apply(probs, torch.Generator().manual_seed(0))
    assert out.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    (out * torch.tensor([[3.0, -0.5, -2.0], [0.1, 0.2, 5.0]])).sum().backward()
    assert probs.grad.tolist() == [[1.0, -0.5, -1.0], [pytest.approx(0.1), pytest.approx(0.2), 1.0]]


def test_timestep_schedule_is_the_papers():
    assert timestep_schedule(50) == list(range(10, 1000, 20))
    assert timestep_schedule(5) == [100, 300, 500, 700, 900]


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_k_below_one_is_refused_with_its_value(k):
    with pytest.raises(ValueError, match=f"attack.k={k!r}"):
        check_attack_config({**FAST, "k": k})


def test_k_defaults_by_concept_kind():
    assert check_attack_config({**FAST, "k": None}, "nudity")["k"] == 5
    assert check_attack_config({**FAST, "k": None}, "style")["k"] == 3


def test_bad_values_fail_before_the_model_is_loaded():
    # path=None would fail to load: the ValueError proves validation comes first.
    with pytest.raises(ValueError, match="attack.k=0"):
        Robustness("toy_stripes", {**FAST, "k": 0}, TINY_MODEL)
    with pytest.raises(ValueError, match=r"recovery.psi contains 1.2"):
        Robustness("toy_stripes", FAST, TINY_MODEL, recovery_cfg={"enabled": True, "psi": [0.1, 1.2]})
    with pytest.raises(ValueError, match="detector.threshold=-0.5"):
        Robustness("toy_stripes", FAST, TINY_MODEL, detector_cfg={"name": "nudenet", "threshold": -0.5})


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_path):
    from unlearn.models import load_components

    return load_components(str(tiny_pipeline_path))


def test_prefix_slots_give_the_encoders_own_hidden_states(tiny):
    prefix = PrefixPrompt(tiny.tokenizer, tiny.text_encoder, "a red ring", 3)
    tokens = torch.tensor([5, 17, 9])
    one_hot = torch.nn.functional.one_hot(tokens, prefix.vocab_size).float().requires_grad_(True)
    hidden = prefix.hidden(one_hot)
    ids = prefix.with_tokens(tokens)
    assert ids[0, 0] == tiny.tokenizer.bos_token_id and ids[0, 1:4].tolist() == tokens.tolist()
    torch.testing.assert_close(hidden, tiny.text_encoder(ids)[0])
    hidden.sum().backward()
    assert one_hot.grad is not None and one_hot.grad.abs().sum() > 0


def test_attack_runs_its_budget_and_stops_at_success(tiny):
    cfg = check_attack_config(FAST, "style")
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    res = attack_prompt(tiny, tiny.unet, "a red ring", x0, cfg, check=lambda ids: False)
    assert not res["success"] and res["iterations"] == 4 and len(res["losses"]) == 2
    calls = []
    res = attack_prompt(tiny, tiny.unet, "a red ring", x0, cfg, check=lambda ids: calls.append(ids) or True)
    assert res["success"] and res["iterations"] == 2 and len(calls) == 1 and res["timestep"] == 250


def test_zero_iterations_equals_the_clean_rate(tiny):
    rob = Robustness("toy_stripes", {**FAST, "iterations": 0}, TINY_MODEL, original=tiny)
    out = rob.run(tiny.unet, "tiny")
    assert out["asr"] == out["clean_rate"] and out["found_by_attack"] == 0
    assert out["prompts_attacked"] == 3 and all("attack" not in r for r in out["per_prompt"])


def test_asr_counts_clean_successes_plus_found(tiny):
    rob = Robustness("toy_stripes", FAST, TINY_MODEL, original=tiny)
    out = rob.run(tiny.unet, "tiny")
    clean = sum(r["clean"] for r in out["per_prompt"])
    found = sum(r.get("attack", {}).get("success", False) for r in out["per_prompt"])
    assert out["asr"] == pytest.approx(100 * (clean + found) / 3) and out["asr"] >= out["clean_rate"]
    assert "ccs" not in out  # recovery is off unless recovery_cfg.enabled
    assert 0.0 <= out["random_prefix_rate"] <= 100.0


@pytest.mark.slow
def test_original_toy_model_shows_the_target_and_the_attack_cannot_lower_it():
    model = OmegaConf.to_container(OmegaConf.load("conf/model/toy.yaml"))
    attack = {**FAST, "num_prompts": 8, "k": None}
    rob = Robustness("toy_stripes", attack, model)
    out = rob.run(rob.original.unet, "original")
    assert out["reference_rate"] >= 90 and out["clean_rate"] >= 90
    assert out["asr"] >= out["clean_rate"]


def test_cli_writes_the_table_for_original_and_a_pipeline(tmp_path, tiny_pipeline_path):
    import json
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from unlearn.attack import run

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("attack", overrides=[
            f"model.path={tiny_pipeline_path}", "model.sample_steps=2", f"paths.root={tmp_path}",
            f"paths.run_dir={tmp_path}/run", "attack.num_prompts=2", "attack.iterations=1",
            "attack.num_timesteps=1", "attack.filter_references=false", "recovery.psi=[0.5]",
            f"pipelines=[{tiny_pipeline_path}]"])
    run(cfg)
    payload = json.loads((tmp_path / "run" / "robustness.json").read_text())
    original, other = payload["results"]
    assert original["label"] == "original"
    assert other["label"] == tiny_pipeline_path.parent.name  # <run>/pipeline -> <run>, as evaluate
    assert original["ccs"] is None  # the original against itself has nothing to recover
    # Same weights in another folder: identical images, so no separation (CCS 50) and CRS 0.
    assert other["ccs"] == pytest.approx(50.0, abs=1e-3) and other["crs"] == pytest.approx(0.0, abs=1e-6)
    assert payload["settings"]["detector"]["detector"] == "clip" and payload["settings"]["attack"]["k"] == 3
    table = (tmp_path / "run" / "robustness.md").read_text().splitlines()
    assert table[0].startswith("| model | reference det. % | clean det. %") and len(table) == 4


def test_rows_are_named_by_their_run_folder():
    from unlearn.utils.labels import pipeline_label as _label

    assert _label("outputs/compare/toy_stripes/runs/esd_x/pipeline") == "esd_x"
    assert _label("outputs/toy_stripes-cdc_cpg/2026-11-25_10-00-00/pipeline") == "toy_stripes-cdc_cpg"
    assert _label("/models/my_unet_folder") == "/models/my_unet_folder"
