"""python -m unlearn.prepare concept=<c> model=<m> [data.num_prompts=...] [data.images_per_prompt=...]

Generate (or resume, or just check) the concept's anchor/target set with the original model, print where it
is, and save `anchor_grid.png` beside it. Several GPUs: `torchrun --nproc_per_node=K -m unlearn.prepare ...`
shares the shards among the processes (see unlearn/data/datamodule.py).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from unlearn.cli import preflight
from unlearn.data.concepts import ConceptError
from unlearn.data.datamodule import CacheMismatchError
from unlearn.data.prompts import PromptSetError
from unlearn.models.loading import ModelLoadError, load_components
from unlearn.utils.grid import save_grid

log = logging.getLogger("unlearn.prepare")
GRID_IMAGES = 16  # images shown in anchor_grid.png


def run(cfg: DictConfig) -> dict:
    components = load_components(cfg.model.path, revision=cfg.model.revision, dtype=cfg.model.dtype)
    datamodule = instantiate(cfg.data, components=components, concept=cfg.concept, model_cfg=cfg.model)
    summary = datamodule.prepare_data()
    if summary["rank"] == 0:
        images = datamodule.anchor_images(GRID_IMAGES)
        labels = [datamodule.plan.anchors[i] for i in range(len(images))]
        summary["grid"] = str(save_grid(images, datamodule.folder / "anchor_grid.png", nrow=4, labels=labels))
        rate = summary["generated"] / summary["generation_s"] if summary["generation_s"] else 0.0
        s = summary
        others = f", {s['by_others']} by other processes" if s["by_others"] else ""  # jobs sharing the cache
        print(f"prepared {cfg.concept.name} with {cfg.model.name}: {s['folder']}\n"
              f"  {s['images']} images ({s['prompts']} prompts x {cfg.data.images_per_prompt}) in "
              f"{s['shards']} shards: {s['generated']} generated, {s['reused']} reused{others}\n"
              f"  generation {s['generation_s']:.1f} s ({rate:.2f} images/s), total {s['seconds']:.1f} s\n"
              f"  grid: {s['grid']}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ModelLoadError, PromptSetError, ConceptError, CacheMismatchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    # --help, and every bad override refused in one line each (exit 2) before anything loads (unlearn/cli.py).
    sys.argv = [sys.argv[0], *preflight(sys.argv[1:], "train", "unlearn.prepare", __doc__)]
    hydra_main()


if __name__ == "__main__":
    main()
