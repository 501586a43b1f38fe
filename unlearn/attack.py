"""python -m unlearn.attack concept=<c> pipelines=[<run>/pipeline, ...] [attack=toy|paper|<name>] [detector.name=...]

Robustness of erasure, one table: for the original model (`model.path`) and each pipeline folder, the clean
detection rate, the attack's success rate with its random-prefix control, and CCS / CRS (partial-diffusion
recovery). The attack is chosen by config (`conf/attack/<name>.yaml`, classes in `unlearn/attacks/`; `toy` and
`paper` are UnlearnDiffAtk's budgets); the measures are `unlearn.attacks.runner.Robustness`. Writes
`robustness.md`, `robustness.json` (every setting) and `adversarial_prompts.jsonl` (the prompts found, as text).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Importable from here as before the attacks moved to unlearn/attacks/ (unlearn.validate, unlearn.comparison).
from unlearn.attacks.runner import Robustness
from unlearn.utils.files import write_atomic
from unlearn.utils.labels import pipeline_label


def run(cfg) -> dict:
    from omegaconf import OmegaConf

    from unlearn.attacks.runner import format_robustness, found_prompts
    from unlearn.export.load import check_deltas, unet_of
    from unlearn.utils.quiet import quiet_third_party

    quiet_third_party()
    c = OmegaConf.to_container(cfg, resolve=True)
    rob = Robustness(cfg.concept, c["attack"], c["model"], c.get("detector"), c.get("recovery"))
    check_deltas(c.get("pipelines"), rob.original)  # a delta of another base fails before any attack
    rows = []
    if c.get("include_original", True):
        rows.append(rob.run(rob.original.unet, label="original"))
    labels = {"original"}
    for i, path in enumerate(c.get("pipelines") or []):
        label = pipeline_label(path)
        label = label if label not in labels else f"{label}#{i}"
        labels.add(label)
        unet = unet_of(path, rob.original, dtype=c["model"].get("dtype", "float32"))  # pipeline, run folder or delta
        rows.append(rob.run(unet, label=label))
    table = format_robustness(rows)
    out = Path(c["paths"]["run_dir"])
    out.mkdir(parents=True, exist_ok=True)
    payload = {"concept": rob.concept.name, "settings": rob.settings, "results": rows}
    write_atomic(out / "robustness.json", json.dumps(payload, indent=2))
    write_atomic(out / "robustness.md", table + "\n")
    write_atomic(out / "adversarial_prompts.jsonl",
                 "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in found_prompts(rows)))
    print(f"\n{rob.concept.name}  (settings: {json.dumps(rob.settings)})\n{table}\n\nwritten to {out}")
    return payload


def _main() -> None:
    import hydra
    from omegaconf import DictConfig

    from unlearn.cli import preflight
    from unlearn.models.loading import ModelLoadError

    # --help, and every bad override refused in one line each (exit 2) before anything loads (unlearn/cli.py).
    sys.argv = [sys.argv[0], *preflight(sys.argv[1:], "attack", "unlearn.attack", __doc__)]

    @hydra.main(version_base="1.3", config_path="../conf", config_name="attack")
    def main(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except (ModelLoadError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    main()


if __name__ == "__main__":
    _main()
