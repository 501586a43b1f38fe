"""python -m unlearn.attack concept=<c> pipelines=[<run>/pipeline, ...] [attack=toy|paper|<name>|[<a>,<b>,...]]

Robustness of erasure, one table: for the original model (`model.path`) and each pipeline folder, the clean
detection rate, each attack's success rate, prompts found, iterations and control (random tokens without
optimisation), and CCS / CRS (partial-diffusion recovery). An attack is chosen by config (`conf/attack/<name>.yaml`,
classes in `unlearn/attacks/`; `toy` and `paper` are UnlearnDiffAtk's budgets); several with `attack=[a,b,c]`
(short for `attack=a attacks=[b,c]`: `attacks` names the attacks after the first; the first's `attack.*`
overrides apply to it alone and choose the prompt set of all). The measures are `unlearn.attacks.runner.Robustness`. Writes `robustness.md`, `robustness.json` (every
setting) and `adversarial_prompts.jsonl` (the prompts found, as text).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Importable from here as before the attacks moved to unlearn/attacks/ (unlearn.validate, unlearn.comparison).
from unlearn.attacks.runner import Robustness
from unlearn.utils.files import write_atomic
from unlearn.utils.labels import pipeline_label


def list_choice(argv: list[str]) -> list[str]:
    """`attack=[a,b,c]` -> `attack=a attacks=[b,c]` (Hydra would merge the three files into one node)."""
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "attack" and value.startswith("[") and value.endswith("]"):
            names = [v.strip() for v in value[1:-1].split(",") if v.strip()]
            out += [f"attack={names[0] if names else 'null'}", f"++attacks=[{','.join(names[1:])}]"]
        else:
            out.append(arg)
    return out


def check_listed(argv: list[str]) -> None:
    """The attacks named in `attacks=[...]`, read and checked before Hydra makes a run folder (ValueError)."""
    from unlearn.attacks import check_attack_config
    from unlearn.attacks.runner import attack_config

    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "attacks" and value.startswith("[") and value.endswith("]"):
            for name in (v.strip() for v in value[1:-1].split(",") if v.strip()):
                check_attack_config(attack_config(name))


def run(cfg) -> dict:
    from omegaconf import OmegaConf

    from unlearn.attacks.runner import attack_configs, format_robustness, found_prompts
    from unlearn.export.components import components_of
    from unlearn.export.load import check_deltas
    from unlearn.utils.quiet import quiet_third_party

    quiet_third_party()
    c = OmegaConf.to_container(cfg, resolve=True)
    rob = Robustness(cfg.concept, attack_configs(c["attack"], c.get("attacks")), c["model"], c.get("detector"),
                     c.get("recovery"))
    check_deltas(c.get("pipelines"), rob.original)  # a delta of another base fails before any attack
    rows = []
    if c.get("include_original", True):
        rows.append(rob.run(rob.original.unet, label="original"))
    labels = {"original"}
    for i, path in enumerate(c.get("pipelines") or []):
        label = pipeline_label(path)
        label = label if label not in labels else f"{label}#{i}"
        labels.add(label)
        # a pipeline (its own UNet and text encoder), a run folder or a delta
        rows.append(rob.run(components_of(path, rob.original, dtype=c["model"].get("dtype", "float32")), label=label))
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
    argv = list_choice(sys.argv[1:])
    try:
        check_listed(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *preflight(argv, "attack", "unlearn.attack", __doc__)]

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
