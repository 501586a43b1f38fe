"""python -m unlearn.train concept=<c> method=<m> [model=toy|sd14] [experiment=...] [logger=wandb]

Compose the config, load the model, prepare the anchor/target set, measure before, train, save the pipeline
folder, measure after. Method logic lives in unlearn/methods/, never here.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from unlearn.data.concepts import ConceptError
from unlearn.data.datamodule import CacheMismatchError
from unlearn.data.prompts import PromptSetError
from unlearn.evaluation.progress import EvaluateEvery
from unlearn.models.loading import ModelLoadError, load_components
from unlearn.utils.marker import write_done

log = logging.getLogger("unlearn.train")


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks=()) -> L.Trainer:
    loggers = [instantiate(c) for c in cfg.logger] if cfg.logger else False
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True,
                                               every_n_train_steps=cfg.get("checkpoint_every", 200))
    # The method stops itself after method.steps iterations; Lightning's step counter counts optimizer steps.
    return instantiate(cfg.trainer, logger=loggers, callbacks=[ckpt, *callbacks], max_steps=-1, max_epochs=-1,
                       default_root_dir=str(run_dir))


def run(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    components = load_components(cfg.model.path, revision=cfg.model.revision, dtype=cfg.model.dtype)
    closed_form = getattr(get_class(cfg.method._target_), "closed_form", False)  # e.g. UCE: no data, no loop
    datamodule = None if closed_form else \
        instantiate(cfg.data, components=components, concept=cfg.concept, model_cfg=cfg.model)
    if datamodule is not None and cfg.prepare:
        datamodule.prepare_data()
    evaluator = instantiate(cfg.eval, concept=cfg.concept, model_cfg=cfg.model, out_dir=run_dir / "eval") \
        if cfg.evaluate else None
    if evaluator is not None:
        evaluator.measure("original", components)
    module = instantiate(cfg.method, components=components, _convert_="object")
    every = cfg.get("eval_every", 0)
    progress = [EvaluateEvery(evaluator, components, every, cfg.method.name)] if evaluator and every else []
    trainer = build_trainer(cfg, run_dir, progress)
    resume = cfg.get("resume")
    if closed_form:
        module.edit()
    else:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume if resume else None)
    results = {"pipeline": None, "metrics": None}
    if trainer.is_global_zero:
        results["pipeline"] = str(module.export(run_dir / "pipeline"))
        log.info("saved the unlearned pipeline to %s", results["pipeline"])
        if evaluator is not None:
            evaluator.measure(cfg.method.name, components, unet=module.export_unet())
            results["metrics"] = evaluator.report(loggers=trainer.loggers)
        write_done(run_dir, cfg, method=cfg.method.name, concept=cfg.concept.name)  # last: the run is complete
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ModelLoadError, PromptSetError, ConceptError, CacheMismatchError) as e:
        # Nothing half-written: a run that failed before training leaves no run folder behind.
        run_dir = Path(cfg.paths.run_dir)
        if run_dir.exists() and not any(p.name not in (".hydra", "train.log") for p in run_dir.iterdir()):
            shutil.rmtree(run_dir)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
