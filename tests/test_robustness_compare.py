"""compare's robustness columns over training seeds: every seed's model attacked, by every attack named, and the
cells read "mean ± half-width" (needs unlearn/compare.py to pass every run to robustness_columns)."""

from __future__ import annotations


def test_compare_attacks_every_seed_and_reports_intervals(tmp_path, tiny_pipeline_path):
    from unlearn.compare import compare

    args = [f"paths.root={tmp_path}", f"paths.cache={tmp_path}/cache", f"model.path={tiny_pipeline_path}",
            "recipes=none", "budget=2", "eval_every=0", "logger=none", "trainer=cpu",
            "trainer.enable_progress_bar=false", "data.num_prompts=2", "data.images_per_prompt=2",
            "data.batch_size=2", "data.gen_batch_size=2", "model.sample_steps=2", "eval.num_prompts=2",
            "eval.images_per_prompt=1", "eval.implicit=false", "method.trainable=cross_attn", "concept=toy_ring",
            "methods=[distill]", "+recipes.distill=['method.latents=data']", "seeds=[0,1]", f"out_dir={tmp_path}/cmp",
            "robustness.enabled=true", "robustness.attack.iterations=1", "robustness.attack.num_timesteps=1",
            "robustness.attack.num_prompts=2", "robustness.attack.filter_references=false",
            "robustness.recovery.enabled=false", "robustness.attacks=[ring_a_bell_toy]"]
    compare(args)
    header, _, *rows = (tmp_path / "cmp" / "table.md").read_text().splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows if r.startswith("|")}
    asr = cols.index("ASR % (Ring-A-Bell)↓")
    assert cols.index("ASR % (UnlearnDiffAtk)↓") < asr < cols.index("CCS↓")
    assert " ± " in rows["distill"][asr] and " ± " not in rows["original"][asr]  # two seeds' models attacked
    cached = sorted(p.parent.name for p in (tmp_path / "cmp" / "runs").glob("*/*/robustness-distill-*.json"))
    assert cached == ["seed0", "seed1"]


def test_a_bad_attack_of_compare_is_named_before_anything_trains(tmp_path):
    """robustness.attacks and robustness.attack are checked with the rest of the config: one line, exit 2."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "unlearn.compare", "concept=toy_ring", "methods=[uce]", "robustness.enabled=true",
            f"out_dir={tmp_path}/cmp", f"paths.root={tmp_path}"]
    for extra, named in ((["robustness.attacks=[ring_a_bel]"], "robustness.attacks=[ring_a_bel]"),
                         (["robustness.attack.num_prompts=0"], "robustness.attack.num_prompts=0")):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 2 and named in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "cmp").exists()
