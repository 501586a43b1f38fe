"""Exact resume after SIGKILL, the data order it relies on, and the non-finite guard."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from unlearn.data.order import ResumableBatches

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ data order
@pytest.mark.parametrize("n,batch", [(11, 3), (12, 3), (2, 2)])
def test_order_is_the_per_epoch_shuffled_loader_as_lightning_drew_it(n, batch):
    """Reference: a shuffled drop_last DataLoader, one iterator per epoch, each left after its last full batch."""
    import lightning as L

    class Record(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, b, i):
            self.seen.append(b.tolist())
            self.trainer.should_stop = len(self.seen) >= 3 * (n // batch) + 1
            return self.w.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    m = Record()
    L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(
        m, DataLoader(list(range(n)), batch_size=batch, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(7)))
    stream = list(itertools.islice(iter(ResumableBatches(n, batch, 7)), len(m.seen)))
    assert stream == m.seen
    for start in (1, n // batch, len(m.seen) - 2):  # a resumed stream re-enters exactly there
        assert list(itertools.islice(iter(ResumableBatches(n, batch, 7, start=start)), 2)) == m.seen[start:start + 2]
    ranks = [list(itertools.islice(iter(ResumableBatches(n, batch, 7, rank=r, world=2)), 2)) for r in (0, 1)]
    assert ranks == [[m.seen[0], m.seen[2]], [m.seen[1], m.seen[3]]]


# ------------------------------------------------------------------------------------------------ NaN guard
def test_nan_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path, tiny_pipeline_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from unlearn.methods.base import UnlearnModule
    from unlearn.train import run
    from unlearn.utils.checkpoint import NonFiniteError

    eps = UnlearnModule.eps

    def poisoned(self, unet, x_t, t, emb):  # the 4th iteration's predictions turn NaN
        out = eps(self, unet, x_t, t, emb)
        return out * float("nan") if int(self.iteration) == 3 else out

    monkeypatch.setattr(UnlearnModule, "eps", poisoned)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.root={tmp_path}", f"paths.run_dir={tmp_path}/run", f"model.path={tiny_pipeline_path}",
            "concept=toy_ring", "method=distill", "method.steps=6", "method.sample_steps=2", "data.num_prompts=2",
            "data.images_per_prompt=2", "data.batch_size=2", "data.gen_batch_size=2", "model.sample_steps=2",
            "evaluate=false", "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false",
            "+checkpoint_every=2"])
    with pytest.raises(NonFiniteError, match=r"^iteration 4: the loss \(nan\) is not finite"):
        run(cfg)
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iteration=2.ckpt", "last.ckpt"]
    state = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert int(state["state_dict"]["iteration"]) == 2
    assert not (tmp_path / "run" / "pipeline").exists() and not (tmp_path / "run" / "DONE").exists()


# ------------------------------------------------------------------------------------------------ SIGKILL + resume
STEPS = 8
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(tmp_path: Path, pipeline: Path, method: list[str], run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unlearn.train", f"model.path={pipeline}", "concept=toy_ring", *method,
            f"method.steps={STEPS}", "data.num_prompts=2", "data.images_per_prompt=3", "data.batch_size=2",
            "data.gen_batch_size=2", "model.sample_steps=2", "evaluate=false", "logger=none", "trainer=cpu",
            "trainer.deterministic=true", "trainer.enable_progress_bar=false", "+checkpoint_every=1",
            f"paths.root={tmp_path}", f"paths.cache={tmp_path}/cache", f"hydra.run.dir={run_dir}", *extra]


def kill_after(cmd: list[str], run_dir: Path, iteration: int) -> None:
    """Start `cmd`; SIGKILL it as soon as a checkpoint of at least `iteration` exists (wherever it then is)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            done = [int(p.stem.split("=")[1]) for p in (run_dir / "checkpoints").glob("iteration=*.ckpt")]
            if done and max(done) >= iteration:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.wait()


def unet_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", [["method=cdc_cpg", "method.warmup_steps=2"],
                                    ["method=distill", "method.sample_steps=2"]], ids=["cdc_cpg", "distill"])
def test_sigkill_at_random_iterations_then_resume_is_bit_identical(tmp_path, tiny_pipeline_path, method):
    ref = tmp_path / "uninterrupted"
    subprocess.run(cli(tmp_path, tiny_pipeline_path, method, ref), cwd=ROOT, env=ENV, check=True,
                   capture_output=True)
    rng = random.Random(" ".join(method))
    kills = sorted(rng.sample(range(1, STEPS - 1), 2))
    run = tmp_path / "killed"
    kill_after(cli(tmp_path, tiny_pipeline_path, method, run), run, kills[0])
    assert not (run / "DONE").exists()
    kill_after(cli(tmp_path, tiny_pipeline_path, method, tmp_path / "session2", f"resume={run}"), run, kills[1])
    r = subprocess.run(cli(tmp_path, tiny_pipeline_path, method, tmp_path / "session3", f"resume={run}"),
                       cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "DONE").exists()
    a, b = unet_weights(ref), unet_weights(run)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"kills after iterations {kills}: {len(differ)} tensors differ, e.g. {differ[:3]}"
