"""Shared caches under a sweep: two jobs started at once on one empty cache make one complete prepared set and
one copy of the original's evaluation images, and generate each image once (tests/cache_lock_worker.py)."""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cache_lock_worker import DATA, EVAL, MODEL
from omegaconf import OmegaConf

import unlearn.data.datamodule as dm_module
import unlearn.evaluation.evaluator as ev_module
from unlearn.data.datamodule import UnlearnDataModule
from unlearn.evaluation import Evaluator
from unlearn.models import load_components
from unlearn.utils.files import file_lock

WORKER = Path(__file__).with_name("cache_lock_worker.py")
JOBS = 2
# A process that takes the lock argv[1], writes its name argv[2] in it, says so, then dies (argv[3] = "die") or hangs.
HOLDER = ("import fcntl, os, sys, time\n"
          "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
          "fcntl.flock(fd, fcntl.LOCK_EX)\n"
          "os.write(fd, sys.argv[2].encode())\n"
          "print(flush=True)\n"
          "os._exit(9) if sys.argv[3] == 'die' else time.sleep(60)\n")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("timing")
            and p.name != "anchor_grid.png"}


@pytest.fixture(scope="module")
def sweep(tiny_pipeline_path, tmp_path_factory):
    """JOBS workers started together on one empty cache; each job's generated seeds, per phase."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "sync").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tiny_pipeline_path), str(root / "cache"),
                               str(root / f"job{j}"), str(JOBS), str(root / "sync")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for j in range(JOBS)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    seeds = collections.defaultdict(list)  # phase -> every seed sampled, by any job
    for j in range(JOBS):
        for line in (root / f"job{j}" / "seeds.txt").read_text().splitlines():
            phase, _pid, *drawn = line.split()
            seeds[phase] += [int(s) for s in drawn]
    return root, seeds, outputs


def test_two_jobs_prepare_one_set_and_generate_each_image_once(sweep, tiny_pipeline_path, tmp_path):
    root, seeds, _ = sweep
    n = DATA["num_prompts"] * DATA["images_per_prompt"]
    assert sorted(seeds["prepare"]) == list(range(n)), f"images generated per seed: {seeds['prepare']}"
    # The same files as one job alone, and no lock left behind.
    alone = UnlearnDataModule(components=load_components(str(tiny_pipeline_path)), concept="toy_ring",
                              model_cfg=OmegaConf.create({**MODEL, "path": str(tiny_pipeline_path)}),
                              cache_dir=tmp_path, device="cpu", **DATA)
    alone.prepare_data()
    (folder,) = (root / "cache" / "prepared" / "tiny").iterdir()
    assert digest(folder) == digest(alone.folder)
    assert not list(folder.rglob("*.lock"))


def test_two_jobs_sample_the_original_once(sweep):
    root, seeds, outputs = sweep
    assert sorted(seeds["original"]) == list(range(100_000, 100_004)), seeds["original"]
    assert len(list((root / "cache" / "eval" / "original").glob("toy_ring-*.safetensors"))) == 1
    copies = [(root / f"job{j}" / "eval" / "images" / "original" / "toy_ring.safetensors").read_bytes()
              for j in range(JOBS)]
    assert len(set(copies)) == 1
    assert any("waiting for the original model's toy_ring images" in out for out in outputs), outputs


def test_a_complete_cache_is_read_without_locks(sweep, tiny_pipeline_path, tmp_path, monkeypatch):
    """No lock file is made once an entry exists: a finished cache may be shared read-only."""
    root, _, _ = sweep
    for module in (dm_module, ev_module):
        monkeypatch.setattr(module, "file_lock", lambda *a, **k: pytest.fail("took a lock"))
        monkeypatch.setattr(module, "generate", lambda *a, **k: pytest.fail("generated"))
    comps = load_components(str(tiny_pipeline_path))
    model_cfg = OmegaConf.create({**MODEL, "path": str(tiny_pipeline_path)})
    dm = UnlearnDataModule(components=comps, concept="toy_ring", model_cfg=model_cfg, cache_dir=root / "cache",
                           device="cpu", **DATA)
    assert dm.prepare_data()["reused"] == DATA["num_prompts"] * DATA["images_per_prompt"]
    ev = Evaluator("toy_ring", model_cfg, tmp_path / "eval", cache_dir=root / "cache", **EVAL)
    _, targets, seeds = ev._jobs(ev.concept)
    assert len(ev._generate("original", "toy_ring", comps, None, targets, seeds)) == len(seeds)


def test_a_lock_whose_holder_died_is_taken_over(tmp_path):
    lock = tmp_path / ".entry.lock"
    # A job killed while holding the lock: its file stays, its flock goes with the process.
    r = subprocess.run([sys.executable, "-c", HOLDER, str(lock), "dead pid 1", "die"], capture_output=True,
                       check=False)
    assert r.returncode == 9 and lock.exists()
    with file_lock(lock, "the entry", wait=False) as held:
        assert held
        with file_lock(lock, "the entry", wait=False) as again:  # flock is per open file: excludes this one too
            assert not again
    assert not lock.exists()


def test_a_waiting_job_times_out_naming_the_holder(tmp_path):
    lock = tmp_path / ".entry.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "host pid 7", "hang"],
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # it holds the lock now
        with pytest.raises(TimeoutError, match="the entry, locked by host pid 7"), \
                file_lock(lock, "the entry", timeout_s=0.3):
            pass
    finally:
        holder.kill()
        holder.wait()
