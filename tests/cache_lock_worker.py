"""One of several jobs started at once on one cache: prepares a set, then samples the original's evaluation images.

    python tests/cache_lock_worker.py <pipeline folder> <cache dir> <run dir> <jobs> <sync dir>

Each `generate` call appends the seeds it samples to <run dir>/seeds.txt and sleeps a little, so the jobs overlap;
before each phase the job waits until all <jobs> have reached it (files in <sync dir>), so the jobs reach the cache
together. tests/test_cache_lock.py counts the seeds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import unlearn.data.datamodule as dm_module
import unlearn.evaluation.evaluator as ev_module
from unlearn.data.datamodule import UnlearnDataModule
from unlearn.evaluation import Evaluator
from unlearn.models import generate, load_components

# Seconds per generate call: long enough that a job starting with another finds its lock held (the original's
# images are one call, which the test wants the other job to be seen waiting for, even on busy cores).
SLOW_S = {"prepare": 0.3, "original": 1.0}
MODEL = {"name": "tiny", "sample_steps": 2, "guidance_scale": 3.0, "clip": "toy"}
DATA = {"num_prompts": 4, "images_per_prompt": 1, "gen_batch_size": 1, "batch_size": 2}  # 4 shards of 1 image
EVAL = {"num_prompts": 2, "images_per_prompt": 2, "implicit": False, "neighbours": False}


def counted(log: Path, phase: str):
    def wrapper(components, prompts, seeds, **kwargs):
        with log.open("a") as f:
            f.write(f"{phase} {os.getpid()} {' '.join(map(str, seeds))}\n")
        time.sleep(SLOW_S[phase])
        return generate(components, prompts, seeds, **kwargs)
    return wrapper


def all_reach(sync: Path, phase: str, jobs: int, timeout_s: float = 120.0) -> None:
    (sync / f"{phase}-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(sync.glob(f"{phase}-*"))) < jobs:
        if time.monotonic() > deadline:
            sys.exit(f"the other jobs never reached {phase}")
        time.sleep(0.01)


def main(pipeline: str, cache: str, run_dir: str, jobs: str, sync: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    run, sync_dir = Path(run_dir), Path(sync)
    run.mkdir(parents=True, exist_ok=True)
    log = run / "seeds.txt"
    dm_module.generate = counted(log, "prepare")
    ev_module.generate = counted(log, "original")
    comps = load_components(pipeline)
    model_cfg = OmegaConf.create({**MODEL, "path": pipeline})

    dm = UnlearnDataModule(components=comps, concept="toy_ring", model_cfg=model_cfg, cache_dir=cache,
                           device="cpu", **DATA)
    assert dm.plan.fingerprint  # hashed before the jobs line up, so that they reach the cache together
    all_reach(sync_dir, "prepare", int(jobs))
    summary = dm.prepare_data()

    ev = Evaluator("toy_ring", model_cfg, run / "eval", cache_dir=cache, **EVAL)
    _, targets, seeds = ev._jobs(ev.concept)
    ev._shared_path(comps, "toy_ring", targets, seeds)  # the fingerprint again, not timed against the other job
    all_reach(sync_dir, "original", int(jobs))
    ev._generate("original", "toy_ring", comps, None, targets, seeds)
    (run / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(*sys.argv[1:])
