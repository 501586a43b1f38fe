"""python -m unlearn.train concept=<c> method=<m> [model=toy|sd14] [experiment=...] [logger=wandb]

Compose the config, load the model, prepare the anchor/target set, measure before, train, save the pipeline
folder, measure after. Method logic lives in unlearn/methods/, never here.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from unlearn.cli import preflight
from unlearn.utils import resolvers
from unlearn.utils.marker import read_done, where_things_are, write_done
from unlearn.validate import ConfigError, validate

if TYPE_CHECKING:
    import lightning as L

# torch, Lightning and diffusers are imported inside the functions that use them: a command line naming no config
# file (`method=nosuch`) is refused before they load, and everything else is checked before any model loads.

log = logging.getLogger("unlearn.train")
resolvers.register()  # before Hydra composes: conf/logger/wandb.yaml groups a sweep's runs by ${sweep_group:}


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks=()) -> L.Trainer:
    from hydra.utils import instantiate

    from unlearn.utils.checkpoint import IterationCheckpoint
    from unlearn.utils.progress_bar import iteration_bar

    loggers = [instantiate(c) for c in cfg.logger] if cfg.logger else False
    # Named by iteration (Lightning's step counts optimizer steps: two per iteration with two optimizers), written
    # atomically, with the RNG states; it also stops the run at a non-finite loss or gradient. Last in the list, so
    # the RNG states go back after every other callback's on_train_batch_start.
    ckpt = IterationCheckpoint(run_dir / "checkpoints", every=cfg.get("checkpoint_every", 200))
    # The method stops itself after method.steps iterations; the data module orders data itself (also per rank).
    # The bar counts iterations of method.steps (Lightning's would read `Epoch 0/-2` with max_epochs=-1).
    # trainer.enable_checkpointing is Lightning's own ModelCheckpoint, in addition to ckpt (off in conf/trainer).
    bar = [iteration_bar()] if cfg.trainer.get("enable_progress_bar", True) else []
    return instantiate(cfg.trainer, logger=loggers, callbacks=[*callbacks, *bar, ckpt], max_steps=-1,
                       max_epochs=-1, default_root_dir=str(run_dir), use_distributed_sampler=False)


def resume_point(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(the run folder to write into, the checkpoint to start from). `resume=<run folder>` continues that run in
    its own folder from checkpoints/last.ckpt; `resume=<file>.ckpt` starts this run's folder from that file."""
    from unlearn.utils.checkpoint import LAST

    resume = cfg.get("resume")
    if not resume:
        return Path(cfg.paths.run_dir), None
    path = Path(str(resume))
    if path.is_dir():
        return path, path / "checkpoints" / LAST
    return Path(cfg.paths.run_dir), path


def run(cfg: DictConfig) -> dict:
    validate(cfg)  # every bad value, before any model is loaded or image generated (unlearn/validate.py)
    import lightning as L
    import torch
    from hydra.utils import get_class, instantiate
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from unlearn.evaluation.progress import EvaluateEvery
    from unlearn.export.delta import base_record, export_run
    from unlearn.models.loading import load_components
    from unlearn.utils.files import write_atomic
    from unlearn.utils.quiet import quiet_third_party

    quiet_third_party()
    run_dir, ckpt_path = resume_point(cfg)
    if read_done(run_dir) is not None and ckpt_path is not None:  # resuming a finished run: nothing to do
        log.info("%s is already finished (its DONE marker); nothing to resume", run_dir)
        metrics = run_dir / "eval" / "metrics.json"
        return {"run_dir": str(run_dir), "pipeline": str(run_dir / "pipeline"),
                "metrics": json.loads(metrics.read_text()) if metrics.exists() else None}
    if ckpt_path is not None and run_dir != Path(cfg.paths.run_dir):
        log.info("resuming %s from %s (this session's log: %s)", run_dir, ckpt_path, cfg.paths.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    components = load_components(cfg.model.path, revision=cfg.model.revision, dtype=cfg.model.dtype)
    # What a delta applies to, taken before the method edits the components in place (unlearn/export/).
    base = base_record(cfg.model, components) if cfg.get("export", "pipeline") != "pipeline" else None
    closed_form = getattr(get_class(cfg.method._target_), "closed_form", False)  # e.g. UCE: no data, no loop
    datamodule = None if closed_form else \
        instantiate(cfg.data, components=components, concept=cfg.concept, model_cfg=cfg.model)
    if datamodule is not None and cfg.prepare:
        datamodule.prepare_data()
    elif datamodule is not None:  # prepare: false: the cached set, whole, or a one-line error; never generate
        datamodule.require_prepared()
    evaluator = instantiate(cfg.eval, concept=cfg.concept, model_cfg=cfg.model, out_dir=run_dir / "eval") \
        if cfg.evaluate else None
    # Under DDP every process runs this function (Lightning re-launches the script): rank 0 alone measures.
    if evaluator is not None and rank_zero_only.rank == 0:
        evaluator.measure("original", components)
    module = instantiate(cfg.method, components=components, _convert_="object")
    if "speed" in cfg and not closed_form:
        module.configure_speed(**cfg.speed)  # conf/speed: attention, checkpointing, channels_last, compile
    every = cfg.get("eval_every", 0)
    progress = [EvaluateEvery(evaluator, components, every, cfg.method.name)] if evaluator and every else []
    trainer = build_trainer(cfg, run_dir, progress)
    if closed_form:
        module.edit()
    else:
        # weights_only: a checkpoint holds tensors and plain Python only (RNG states included), never pickled code.
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=True)
    results = {"run_dir": str(run_dir), "pipeline": None, "metrics": None}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Training is over and the other ranks leave: rank 0 exports and evaluates alone. Without the group,
        # torchmetrics does not wait for ranks that have gone to gather its states.
        torch.distributed.destroy_process_group()
    if trainer.is_global_zero:
        results["pipeline"] = str(export_run(module, run_dir, cfg, base))  # pipeline/ or delta.safetensors
        for name, payload in module.records().items():  # e.g. UCE's edit_texts.json
            write_atomic(run_dir / name, json.dumps(payload, indent=2))
        log.info("saved the unlearned pipeline to %s", results["pipeline"])
        if evaluator is not None:
            evaluator.measure(cfg.method.name, components, unet=module.export_unet())
            results["metrics"] = evaluator.report(loggers=trainer.loggers)
        write_done(run_dir, cfg, method=cfg.method.name, concept=cfg.concept.name)  # last: the run is complete
    return results


def fail(cfg: DictConfig, lines: list[str], code: int) -> None:
    # Nothing half-written: a run that failed before training leaves no run folder behind.
    run_dir = Path(cfg.paths.run_dir)
    if run_dir.exists() and not any(p.name not in (".hydra", "train.log") for p in run_dir.iterdir()):
        shutil.rmtree(run_dir)
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    from unlearn.data.concepts import ConceptError
    from unlearn.data.datamodule import CacheMismatchError
    from unlearn.data.prompts import PromptSetError
    from unlearn.models.loading import ModelLoadError
    from unlearn.utils.checkpoint import NonFiniteError

    try:
        results = run(cfg)
        if results["pipeline"] is not None:  # rank 0: the paths a user opens next
            print("\n" + where_things_are(results["run_dir"]))
    except ConfigError as e:
        fail(cfg, [str(p) for p in e.problems], 2)
    except (ModelLoadError, PromptSetError, ConceptError, CacheMismatchError) as e:
        fail(cfg, [str(e)], 2)
    except NonFiniteError as e:  # the run folder stays, with its last good checkpoint
        fail(cfg, [str(e)], 1)


def main() -> None:
    # --help, and every bad override refused in one line each (exit 2) before Hydra composes, creates the run
    # folder or loads anything (unlearn/cli.py).
    sys.argv = [sys.argv[0], *preflight(sys.argv[1:], "train", "unlearn.train", __doc__)]
    hydra_main()


if __name__ == "__main__":
    main()
