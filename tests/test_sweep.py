"""Cluster sweeps: a 2-job sweep through hydra-submitit-launcher's local executor (the SLURM launcher's code path),
each job its own run folder; the SLURM launcher config composes; one W&B group per sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# One thread per job: the sweep's jobs run at once.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false"}

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[cluster]")


def hydra_cfg(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_config_composes():
    cfg = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                    "hydra.launcher.array_parallelism=4")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.array_parallelism) == \
        ("gpu", 2, 2, 4)  # one task per GPU, as Lightning's DDP expects under SLURM
    assert cfg.hydra.launcher.timeout_min > 0


def test_wandb_group_is_the_sweep_folder():
    from unlearn.utils import resolvers

    resolvers.register()
    cfg = hydra_cfg("logger=wandb", "hydra.sweep.dir=/tmp/sweeps/van_gogh_lams")
    try:
        for mode, group in ((RunMode.MULTIRUN, "van_gogh_lams"), (RunMode.RUN, None)):
            OmegaConf.set_readonly(cfg.hydra, False)
            with open_dict(cfg):
                cfg.hydra.mode = mode
            HydraConfig.instance().set_config(cfg)
            assert OmegaConf.to_container(cfg.logger, resolve=True)[0]["group"] == group
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local(tmp_path, tiny_pipeline_path):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, "-m", "unlearn.train", "-m", "hydra/launcher=submitit_local",
         f"model.path={tiny_pipeline_path}", "concept=toy_ring", "method=distill", "method.loss=l2,js",
         "method.steps=2", "method.sample_steps=2", "data.num_prompts=2", "data.images_per_prompt=2",
         "data.batch_size=2", "data.gen_batch_size=2", "model.sample_steps=2", "evaluate=false", "trainer=cpu",
         "trainer.enable_progress_bar=false", f"paths.root={tmp_path}", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    # <job number>-<its overrides> (conf/hydra/default.yaml)
    assert [(p.name[:2], "method.loss=l2" in p.name, "method.loss=js" in p.name) for p in runs] == \
        [("0-", True, False), ("1-", False, True)]
    assert all("model.path" not in p.name for p in runs)  # a path's slashes would nest the folder
    for run, loss in zip(runs, ("l2", "js")):
        assert (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").exists()
        assert OmegaConf.load(run / ".hydra" / "config.yaml").method.loss == loss
    jobs = [p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 2  # one submitit job folder (logs, result pickle) per job
    assert all(any(j.glob("*_result.pkl")) for j in jobs)
