"""python -m unlearn.evaluate concept=<c> model=<m> [+candidates=[<pipeline folder, run folder or delta>, ...]]

Measures the model config's pipeline (`model.path`, "original") and then each candidate (the `pipeline/` folder of
a training run or a Hub id; a run's delta.safetensors, made from `model.path`, or the run folder holding it; or
several methods' side by side) on the concept and its neighbours; FID and directional CLIP compare each candidate
with the original on the same prompts and seeds. Writes metrics.json, table.md/.csv and grids to the run folder and
prints the table.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from unlearn.cli import preflight
from unlearn.export.components import components_of
from unlearn.export.load import check_deltas
from unlearn.models.loading import ModelLoadError, load_components
from unlearn.utils.labels import pipeline_label


def run(cfg: DictConfig) -> dict:
    from unlearn.utils.quiet import quiet_third_party

    quiet_third_party()
    out = Path(cfg.paths.run_dir) / "eval"
    evaluator = instantiate(cfg.eval, concept=cfg.concept, model_cfg=cfg.model, out_dir=out)
    original = load_components(cfg.model.path, revision=cfg.model.revision, dtype=cfg.model.dtype)
    check_deltas(cfg.get("candidates"), original)  # a delta of another base model fails now, before any image
    evaluator.measure("original", original)
    for i, path in enumerate(cfg.get("candidates") or []):
        model = components_of(path, original, dtype=cfg.model.dtype)  # a pipeline's own text encoder too
        label = pipeline_label(path)
        evaluator.measure(label if label not in evaluator.results else f"{label}#{i}", model, unet=model.unet)
    loggers = [instantiate(c) for c in cfg.logger] if cfg.logger else []
    payload = evaluator.report(loggers=loggers)
    for lg in loggers:
        lg.finalize("success")
    return payload


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ModelLoadError as e:
        remove_if_empty(Path(cfg.paths.run_dir))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def remove_if_empty(run_dir: Path) -> None:
    """A run that failed before measuring anything leaves no folder: only Hydra's config and log were there."""
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" or p.is_dir() and not any(p.iterdir())
                                for p in run_dir.iterdir()):
        shutil.rmtree(run_dir)


def main() -> None:
    # --help, and every bad override refused in one line each (exit 2) before anything loads (unlearn/cli.py).
    sys.argv = [sys.argv[0], *preflight(sys.argv[1:], "train", "unlearn.evaluate", __doc__)]
    hydra_main()


if __name__ == "__main__":
    main()
