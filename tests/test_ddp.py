"""DDP on CPU (`trainer=ddp_cpu`: 2 processes, gloo) makes the same update as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import CASES, N_SAMPLES, run_cases

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[1]
# One thread per process: two 2-thread torch processes on 2 cores run tens of times slower than one.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def ddp_and_single(tiny_pipeline_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    r = subprocess.run([sys.executable, str(WORKER), str(tiny_pipeline_path), "ddp_cpu", str(N_SAMPLES // 2),
                        str(out)], cwd=out, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [torch.load(out / f"rank{k}.pt") for k in (0, 1)]
    single = run_cases(str(tiny_pipeline_path), "cpu", N_SAMPLES)
    return ranks, single


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_iteration_equals_one_process_on_the_global_batch(ddp_and_single, case):
    ranks, single = ddp_and_single
    assert [r[case]["rank"] for r in ranks] == [0, 1]
    assert all(r[case]["world_size"] == 2 and r[case]["iterations"] == 1 for r in ranks)
    ref = single[case]["tensors"]
    moved = {k.split(".")[0] for k, v in ref.items() if not torch.equal(v, single[case]["initial"][k])}
    assert moved == ({"unet", "disc"} if case.startswith("cdc") else {"unet", "teacher"})  # a real update
    for rank in ranks:
        # The gradient each optimizer stepped with: all-reduced (and, for CDC+CPG, projected from the all-reduced
        # G_u and G_r, then clipped) exactly as one process computes it on the whole batch.
        assert rank[case]["grads"].keys() == single[case]["grads"].keys() and single[case]["grads"]
        for k, g in single[case]["grads"].items():
            torch.testing.assert_close(rank[case]["grads"][k], g, rtol=1e-3, atol=1e-4 * g.abs().max().item(),
                                       msg=lambda m, k=k: f"gradient of {k}: {m}")
        got = rank[case]["tensors"]
        assert got.keys() == ref.keys()
        for k in ref:
            # Adam's first step is lr * g / (|g| + eps): where g ~ eps, float noise in g moves the update by a
            # fraction of lr (lr = 1e-3 here).
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for k, v in ranks[0][case]["tensors"].items():  # ranks in sync, bit for bit (D, EMA teacher included)
        assert torch.equal(v, ranks[1][case]["tensors"][k]), k


@pytest.mark.slow
def test_ddp_run_through_the_entry_point_writes_once(tmp_path, tiny_pipeline_path):
    """`python -m unlearn.train trainer=ddp_cpu`: Lightning re-launches the script for rank 1; rank 0 alone measures
    the original, evaluates at eval_every, exports and evaluates (after the process group is gone: no gather from a
    departed rank)."""
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "unlearn.train", "trainer=ddp_cpu", f"model.path={tiny_pipeline_path}",
         "concept=toy_ring", "method=cdc_cpg", "method.steps=2", "method.warmup_steps=1", "data.num_prompts=2",
         "data.images_per_prompt=2", "data.batch_size=2", "data.gen_batch_size=2", "model.sample_steps=2",
         "eval.num_prompts=1", "eval.images_per_prompt=2", "eval.implicit=false", "eval.neighbours=false",
        "eval_every=1",  # rank 0 evaluates mid-training while rank 1 waits: no metric may gather across ranks
         "trainer.enable_progress_bar=false", f"paths.root={tmp_path}", f"hydra.run.dir={run}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "GLOBAL_RANK: 1" in r.stderr + r.stdout  # two processes really trained
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(metrics["results"]) == ["original", "cdc_cpg@1", "cdc_cpg"]
    assert sorted(p.name for p in (run / "eval" / "images").iterdir()) == ["cdc_cpg", "cdc_cpg@1", "original"]
    assert (run / "pipeline" / "unet").is_dir() and (run / "DONE").exists()
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log", "train_ddp_process_1.log"]
