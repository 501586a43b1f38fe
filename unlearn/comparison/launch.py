"""`compare ... hydra/launcher=submitit_local|slurm`: every run not finished yet becomes its own job.

submitit is driven directly, configured from the launcher's config (conf/hydra/launcher/), rather than through the
Hydra launcher's `launch()`: that one waits with `[j.results()[0] for j in jobs]`, so the first failed job raises
and hides every other job's outcome and log, and its jobs re-compose the config through Hydra's internal context.
Here each job gets the run configs compare already composed and hashed (so a job trains exactly the config whose
marker the next invocation checks), and every job is waited for on its own: a failure is kept with its job's log.

A job is one chain of runs: one run for a plain comparison, a method's stages in order for a sequential one. The
job runs them through `compare.train_or_reuse`, which holds the run folder's flock (unlearn/utils/files.py) while
it trains: a second invocation skips a run whose lock is held (a live job is writing it) and waits for that lock
instead of submitting it again; a queued duplicate finds the marker once it starts and reuses the run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from unlearn.comparison.plan import CompareError, Run, compose_hydra, override_key
from unlearn.utils.files import file_lock, lock_path
from unlearn.utils.marker import is_done

log = logging.getLogger("unlearn.compare")
PLUGIN = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
EXECUTORS = {PLUGIN + "LocalLauncher": "local", PLUGIN + "SlurmLauncher": "slurm"}
# Launcher keys submitit takes under their own name (the plugin's BaseQueueConf); the rest get `<executor>_`.
COMMON = ("timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
          "stderr_to_stdout")
NOT_PARAMETERS = ("_target_", "submitit_folder", "max_num_timeout")  # the folder and a constructor argument


@dataclass
class Outcome:
    status: dict[str, str] = field(default_factory=dict)   # status_key -> reused | trained | failed
    failed: list[dict] = field(default_factory=list)       # method, seed, concept, log, error
    jobs: list[dict] = field(default_factory=list)         # job id, its runs, threads, log


def status_key(run: Run) -> str:
    return run.key if run.seed is not None else f"{run.method}/{run.stage}"


def launcher_choice(overrides: list[str]) -> str | None:
    """The `hydra/launcher=<name>` of the command line; None (or `basic`) = the runs train in this process."""
    chosen = [o.split("=", 1)[1] for o in overrides if override_key(o) == "hydra/launcher" and "=" in o]
    return chosen[-1] if chosen and chosen[-1] != "basic" else None


def launcher_config(overrides: list[str]) -> DictConfig:
    launcher = compose_hydra(overrides).hydra.launcher
    if str(launcher.get("_target_")) not in EXECUTORS:
        raise CompareError(f"hydra/launcher={launcher_choice(overrides)} ({launcher.get('_target_')}): compare submits its runs through "
                           "submitit; choose submitit_local or slurm (conf/hydra/launcher/)")
    return launcher


def executor_kind(launcher: DictConfig) -> str:
    return EXECUTORS[str(launcher._target_)]


def executor_parameters(launcher: DictConfig, name: str) -> tuple[dict, dict]:
    """(AutoExecutor's constructor arguments, its update_parameters) from the launcher's settings, mapped as
    hydra-submitit-launcher maps them: its common keys as they are, the others prefixed `<executor>_`."""
    kind = executor_kind(launcher)
    given = {k: v for k, v in OmegaConf.to_container(launcher, resolve=True).items() if k not in NOT_PARAMETERS}
    given["name"] = name  # the launcher's ${hydra.job.name} means nothing outside a Hydra app
    init = {f"{kind}_max_num_timeout": launcher.max_num_timeout} if "max_num_timeout" in launcher else {}
    return init, {k if k in COMMON else f"{kind}_{k}": v for k, v in given.items()}


def make_executor(launcher: DictConfig, folder: Path, name: str):
    import submitit

    init, params = executor_parameters(launcher, name)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=executor_kind(launcher), **init)
    executor.update_parameters(**params)
    return executor


def threads_per_job(launcher: DictConfig, jobs: int, wanted: int | None) -> int:
    """Torch threads for each job. Local jobs all run at once on this machine: its cores shared among them (two
    2-thread processes on 2 cores run ~50x slower than one). On SLURM a job owns its `cpus_per_task`."""
    if wanted is not None:
        return int(wanted)
    if executor_kind(launcher) == "slurm":
        return int(launcher.get("cpus_per_task") or 1)
    return max(1, len(os.sched_getaffinity(0)) // max(1, jobs))


def set_threads(threads: int) -> int:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # libraries that read it when they start, after this
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def run_chain(runs: list[Run], threads: int) -> dict:
    """The job: its runs in order (a sequential method's stages), each trained or reused under its lock."""
    from unlearn.compare import train_or_reuse

    used = set_threads(threads)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    return {"runs": {status_key(r): train_or_reuse(r) for r in runs}, "threads": used}


def chains(runs: list[Run]) -> list[list[Run]]:
    """The runs grouped by (method, seed), stages in order: one job each."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.method, run.seed), []).append(run)
    return list(groups.values())


def held(run: Run) -> bool:
    """Whether a live job holds this run's lock now (it is training there)."""
    with file_lock(lock_path(run.run_dir), f"run {run.run_dir}", wait=False) as got:
        return not got


def failure(run: Run, log_path: str, error: str) -> dict:
    return {"method": run.method, "seed": run.seed, "concept": run.concept, "run_dir": str(run.run_dir),
            "log": log_path, "error": error}


def last_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def launch_runs(cfg: DictConfig, runs: list[Run], out: Path, overrides: list[str]) -> Outcome:
    """Submit a job per chain with unfinished runs, wait for all of them, and say what became of every run."""
    launcher = launcher_config(overrides)
    done = Outcome()
    todo, elsewhere = [], []
    for chain in chains(runs):
        finished = 0
        while finished < len(chain) and is_done(chain[finished].run_dir, chain[finished].cfg):
            done.status[status_key(chain[finished])] = "reused"
            finished += 1
        rest = chain[finished:]
        if rest:
            (elsewhere if held(rest[0]) else todo).append(rest)
    threads = threads_per_job(launcher, len(todo), cfg.get("threads_per_job"))
    jobs = []
    if todo:
        executor = make_executor(launcher, out / ".submitit" / "%j", f"compare-{out.name}")
        with executor.batch():  # one array job on SLURM (array_parallelism applies)
            jobs = [executor.submit(run_chain, chain, threads) for chain in todo]
    for chain, job in zip(todo, jobs):
        log.info("job %s: %s (%d thread(s))", job.job_id, ", ".join(status_key(r) for r in chain), threads)
    for chain in elsewhere:
        log.info("%s: a live job holds its lock; waiting for it, not submitting it again", chain[0].run_dir)
    for chain, job in zip(todo, jobs):
        logs = str(job.paths.stderr if not launcher.get("stderr_to_stdout") else job.paths.stdout)
        try:
            result = job.result()
            done.status.update(result["runs"])
            done.jobs.append({"job": str(job.job_id), "runs": list(result["runs"]), "threads": result["threads"],
                              "log": logs})
        except Exception as e:  # noqa: BLE001 - failed or killed: named in the report, never missing from it
            error = last_line(e)
            done.jobs.append({"job": str(job.job_id), "runs": [status_key(r) for r in chain], "log": logs,
                              "error": error})
            settle(chain, done, logs, error, "trained")
    for chain in elsewhere:  # another invocation's job: finished once its lock frees, or failed there
        for run in chain:
            with file_lock(lock_path(run.run_dir), f"run {run.run_dir}"):
                pass
        settle(chain, done, f"the other invocation's job log, under {out / '.submitit'}", "its job did not finish",
               "reused")
    return done


def settle(chain: list[Run], done: Outcome, log_path: str, error: str, finished_as: str) -> None:
    """After a job ended: its runs that finished count (`finished_as`), the rest are failed with its log."""
    for run in chain:
        if is_done(run.run_dir, run.cfg):
            done.status[status_key(run)] = finished_as
        else:
            done.status[status_key(run)] = "failed"
            done.failed.append(failure(run, log_path, error))
