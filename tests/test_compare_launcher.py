"""`compare ... hydra/launcher=...`: every unfinished run is its own submitit job. Through submitit_local the table
is the in-process run's; with an in-process stand-in for the executor (same calls, no subprocesses): a failed job
is named in the report and its table, a killed run is resubmitted alone, a run a live job holds is not started
twice; the launcher's settings reach submitit and the jobs share this machine's cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[cluster]")

from unlearn.comparison import launch
from unlearn.comparison.plan import CompareError, plan_runs
from unlearn.utils.files import file_lock, lock_path

METHODS = "methods=[uce,rece,uce_official]"  # closed forms: seconds each on the tiny model


def tiny(tmp_path, pipeline) -> list[str]:
    """tests/test_compare.py's cheap settings, for closed-form methods (no trainable set, no budget)."""
    return [f"paths.root={tmp_path}", f"paths.cache={tmp_path}/cache", f"model.path={pipeline}", "recipes=none",
            "eval_every=0", "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false", "model.sample_steps=2",
            "eval.num_prompts=2", "eval.images_per_prompt=1", "eval.implicit=false", "concept=toy_ring", METHODS,
            "+recipes.uce=[]", "+recipes.rece=[]", "+recipes.uce_official=[]", "seeds=[0,1]"]


def rows(out: Path) -> dict[str, str]:
    return {r.split("|")[1].strip(): r for r in (out / "table.md").read_text().splitlines()[2:] if r.startswith("|")}


def test_launcher_settings_reach_submitit_and_threads_share_the_cores(tmp_path):
    assert launch.launcher_choice(["seed=1"]) is None and launch.launcher_choice(["hydra/launcher=basic"]) is None
    assert launch.launcher_choice(["hydra/launcher=slurm"]) == "slurm"
    slurm = launch.launcher_config([f"paths.root={tmp_path}", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                    "hydra.launcher.cpus_per_task=6"])
    init, params = launch.executor_parameters(slurm, "compare-x")
    assert init == {"slurm_max_num_timeout": 0}
    assert {k: params[k] for k in ("slurm_partition", "cpus_per_task", "name", "gpus_per_node", "tasks_per_node",
                                   "slurm_array_parallelism", "timeout_min")} == \
        {"slurm_partition": "gpu", "cpus_per_task": 6, "name": "compare-x", "gpus_per_node": 1, "tasks_per_node": 1,
         "slurm_array_parallelism": 16, "timeout_min": 240}
    assert "_target_" not in params and "submitit_folder" not in params
    assert launch.threads_per_job(slurm, 10, None) == 6  # a SLURM job owns its cpus
    local = launch.launcher_config([f"paths.root={tmp_path}", "hydra/launcher=submitit_local"])
    launch.make_executor(local, tmp_path / "%j", "compare-x")  # submitit takes every local setting
    cores = len(os.sched_getaffinity(0))
    assert [launch.threads_per_job(local, n, None) for n in (1, 2, 64)] == [cores, max(1, cores // 2), 1]
    assert launch.threads_per_job(local, 2, 3) == 3  # threads_per_job= on the command line
    # A job sets its share whatever thread count it inherits (here OMP_NUM_THREADS=1 from the environment).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "from unlearn.comparison.launch import set_threads; import torch; set_threads(2); print(torch.get_num_threads())"
    job = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert job.stdout.split() == ["2"]
    _, runs = plan_runs([f"paths.root={tmp_path}", "methods=[uce,rece]", "concepts=[toy_ring,toy_diamond]"])
    assert [[launch.status_key(r) for r in c] for c in launch.chains(runs)] == \
        [["uce/1", "uce/2"], ["rece/1", "rece/2"]]  # a sequential method's stages: one job, in order
    with pytest.raises(CompareError, match=r"hydra/launcher=submitit_local \(my.Launcher\): compare submits"):
        launch.launcher_config([f"paths.root={tmp_path}", "hydra/launcher=submitit_local",
                                "hydra.launcher._target_=my.Launcher"])


class Job:
    """A submitit job done at submission, in this process (submitit's DebugExecutor would stop in pdb)."""

    def __init__(self, n: int, folder: Path, fn, args):
        self.job_id, self.paths = str(n), type("P", (), {"stderr": folder / f"{n}_0_log.err",
                                                        "stdout": folder / f"{n}_0_log.out"})
        try:
            self._result, self._error = fn(*args), None
        except Exception as e:  # noqa: BLE001 - as submitit's FailedJobError carries the job's traceback
            self._result, self._error = None, RuntimeError(f"Job {n} failed\nTraceback ...\n{type(e).__name__}: {e}")

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result


class Executor:
    def __init__(self, submitted: list):
        self.submitted = submitted

    @contextmanager
    def batch(self):
        yield

    def submit(self, fn, chain, threads):
        self.submitted.append([launch.status_key(r) for r in chain])
        return Job(len(self.submitted), Path("/jobs"), fn, (chain, threads))


@pytest.fixture
def submitted(monkeypatch):
    jobs: list = []
    monkeypatch.setattr(launch, "make_executor", lambda *a: Executor(jobs))
    monkeypatch.setattr(launch, "set_threads", lambda n: n)  # the test process keeps its own threads
    return jobs


def test_failed_jobs_are_named_and_killed_runs_resubmitted_alone(tmp_path, tiny_pipeline_path, submitted,
                                                                 monkeypatch):
    from unlearn import train
    from unlearn.compare import compare

    real = train.run

    broken = {("rece", 1), ("uce_official", 0), ("uce_official", 1)}  # (method, seed); uce trains

    def breaks(cfg):
        if (cfg.method.name, cfg.seed) in broken:
            raise RuntimeError("boom at train time")
        return real(cfg)

    monkeypatch.setattr(train, "run", breaks)
    out = tmp_path / "cmp"
    args = [*tiny(tmp_path, tiny_pipeline_path), f"out_dir={out}", "hydra/launcher=submitit_local"]
    summary = compare(args)
    assert len(submitted) == 6  # one job per (method, seed)
    failed = {(f["method"], f["seed"]) for f in summary["failed"]}
    assert failed == {("rece", 1), ("uce_official", 0), ("uce_official", 1)}
    one = next(f for f in summary["failed"] if f["method"] == "rece")
    assert (one["concept"], one["error"], one["log"]) == ("toy_ring", "RuntimeError: boom at train time",
                                                          "/jobs/4_0_log.err")
    table = (out / "table.md").read_text()
    assert "- rece seed 1 on toy_ring: RuntimeError: boom at train time (log: /jobs/4_0_log.err)" in table
    got = rows(out)
    assert got["uce_official"].split("|")[2].strip() == "failed"
    assert set(got["uce_official"].split("|")[3:-1]) == {" – "}
    assert got["rece"].split("|")[2].strip() == "closed form (failed: seed 1)"
    assert json.loads((out / "summary.json").read_text())["failed"] == summary["failed"]

    broken.discard(("rece", 1))  # rece's seed 1 would now train; uce_official still fails
    submitted.clear()
    again = compare(args)  # what finished is reused, only the failed runs are submitted
    assert sorted(map(tuple, submitted)) == [("rece/seed1",), ("uce_official/seed0",), ("uce_official/seed1",)]
    assert {k: v for k, v in again["runs"].items() if not k.startswith("uce_official")} == \
        {"uce/seed0": "reused", "uce/seed1": "reused", "rece/seed0": "reused", "rece/seed1": "trained"}
    assert {(f["method"], f["seed"]) for f in again["failed"]} == {("uce_official", 0), ("uce_official", 1)}
    assert "rece seed" not in (out / "table.md").read_text()
    assert rows(out)["rece"].split("|")[2].strip() == "closed form"

    (out / "runs/uce/seed1/DONE").unlink()  # a job killed before its end leaves no marker
    submitted.clear()
    assert compare(args)["runs"]["uce/seed1"] == "trained"
    assert sorted(map(tuple, submitted)) == [("uce/seed1",), ("uce_official/seed0",), ("uce_official/seed1",)]


def test_a_failed_run_makes_the_command_exit_1(tmp_path, monkeypatch):
    import unlearn.compare as entry

    monkeypatch.setattr(entry, "compare", lambda overrides: {"failed": [{"method": "uce"}]})
    with pytest.raises(SystemExit) as exit_:
        entry.main([f"paths.root={tmp_path}", "methods=[uce]", "hydra/launcher=submitit_local"])
    assert exit_.value.code == 1


def test_a_run_held_by_a_live_job_is_waited_for_not_started_again(tmp_path, tiny_pipeline_path, submitted,
                                                                  monkeypatch):
    from unlearn.compare import _train_or_reuse, compare

    args = [*tiny(tmp_path, tiny_pipeline_path), f"out_dir={tmp_path}/cmp", "hydra/launcher=submitit_local",
            "methods=[uce]", "seeds=[0]"]
    (run,) = plan_runs(args)[1]
    locked, checked = threading.Event(), threading.Event()

    def live_job():  # another invocation's job: holds the lock while compare plans, then trains there
        with file_lock(lock_path(run.run_dir), "run"):
            locked.set()
            checked.wait(60)
            _train_or_reuse(run)

    real_held = launch.held
    monkeypatch.setattr(launch, "held", lambda r: (real_held(r), checked.set())[0])
    job = threading.Thread(target=live_job)
    job.start()
    locked.wait(60)
    summary = compare(args)
    job.join()
    assert submitted == []  # nothing submitted: the only run was the live job's
    assert summary["runs"] == {"uce/seed0": "reused"} and summary["failed"] == []
    assert OmegaConf.load(run.run_dir / "config.yaml").method.name == "uce"


def test_two_jobs_on_one_run_train_it_once(tmp_path, tiny_pipeline_path):
    """Two jobs given the same run (a duplicate still queued when an invocation looked): the run folder's lock
    lets one train while the other waits, then finds the marker."""
    from unlearn.compare import train_or_reuse

    (run,) = plan_runs([*tiny(tmp_path, tiny_pipeline_path), f"out_dir={tmp_path}/cmp", "methods=[uce]", "seeds=[0]"])[1]
    got = []
    jobs = [threading.Thread(target=lambda: got.append(train_or_reuse(run))) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert sorted(got) == ["reused", "trained"]


@pytest.mark.slow
def test_submitit_local_gives_the_in_process_table(tmp_path, tiny_pipeline_path):
    """3 methods x 2 seeds as 6 local jobs at once: the same table as one after another in this process."""
    from unlearn.compare import compare

    base = tiny(tmp_path, tiny_pipeline_path)
    compare([*base, f"out_dir={tmp_path}/here"])
    summary = compare([*base, f"out_dir={tmp_path}/jobs", "hydra/launcher=submitit_local"])
    assert set(summary["runs"].values()) == {"trained"} and summary["failed"] == []
    assert len(summary["jobs"]) == 6
    assert {j["threads"] for j in summary["jobs"]} == {max(1, len(os.sched_getaffinity(0)) // 6)}
    assert all(Path(j["log"]).exists() for j in summary["jobs"])
    assert (tmp_path / "jobs/table.md").read_text() == (tmp_path / "here/table.md").read_text()
