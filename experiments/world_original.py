"""The original model of a built-in world on each of its concepts: CA on the target's prompts, on every
neighbour's, and on the implicit prompts (those that never name the concept), read by the world's own CLIP.

    python experiments/world_original.py                      # model=toy2, every toy2_* concept
    python experiments/world_original.py --model toy --concepts toy_ring toy_stripes
    python experiments/world_original.py --out outputs/world_original --num-prompts 16 --images 2

Each concept is one `unlearn.evaluate` run (`<out>/<concept>/eval/metrics.json`); the original's images are
shared through one cache, so a neighbour's images are drawn once. Prints the table and writes `<out>/table.md`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(model: str, concept: str, out: Path, num_prompts: int, images: int) -> dict:
    from hydra import compose, initialize_config_dir

    from unlearn.evaluate import run

    metrics = out / concept / "eval" / "metrics.json"
    if not metrics.exists():
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[
                f"model={model}", f"concept={concept}", f"paths.root={out}", f"paths.run_dir={out / concept}",
                f"paths.cache={out / 'cache'}", "logger=none", f"eval.num_prompts={num_prompts}",
                f"eval.images_per_prompt={images}"])
        run(cfg)
    return json.loads(metrics.read_text())


def row(concept: str, payload: dict) -> str:
    from unlearn.data.concepts import load_concept

    c = load_concept(concept)
    res = payload["results"]["original"]
    neighbours = ", ".join(f"{n.removeprefix('toy2_').removeprefix('toy_')} {res[n]['ca']:.0f}"
                           for n in c.neighbours)
    implicit = res.get("implicit", {})
    reads = sum(ca is not None for ca in c.implicit_ca)
    imp = f"{implicit['ca']:.1f} ({reads})" if "ca" in implicit else "–"
    return f"| {concept} | {c.kind} | {c.anchor} | {res[concept]['ca']:.1f} | {neighbours} | {imp} |"


def main(argv=None) -> None:
    from unlearn.data.concepts import known_concepts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy2")
    p.add_argument("--concepts", nargs="*", default=None, help="default: every <model>_* concept")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "world_original")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--images", type=int, default=2, help="images per prompt")
    a = p.parse_args(argv)
    concepts = a.concepts or [c for c in known_concepts() if c.startswith(f"{a.model}_")]
    lines = ["| concept | kind | anchor | target CA % | neighbours' CA % | implicit CA % (prompts) |",
             "|---|---|---|---|---|---|"]
    for concept in concepts:
        lines.append(row(concept, measure(a.model, concept, a.out, a.num_prompts, a.images)))
    table = "\n".join(lines)
    (a.out / "table.md").write_text(table + "\n")
    print(f"\nmodel={a.model}, {a.num_prompts} prompts x {a.images} images per concept (implicit: one image each)\n"
          f"{table}")


if __name__ == "__main__":
    main()
