"""Do the toy world's concepts exist? Generate with the toy pipeline, classify zero-shot with the toy CLIP.

    python -m unlearn.toy.check [--per-scene 2] [--out outputs/toy_check]
    python -m unlearn.toy.check --world v2 --model DIR/pipeline --clip DIR/clip   # a v2 build (check2.py)

Prints the object and style confusion tables (rows: prompted, columns: CLIP's zero-shot answer), the sampling
time of a batch of 16 and writes one grid per style and per object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unlearn.metrics.clip_model import ClipEncoder
from unlearn.models import generate, load_components
from unlearn.toy import world
from unlearn.toy.build import WEIGHTS


@torch.no_grad()
def class_texts(encoder: ClipEncoder, attribute: str) -> tuple[list[str], torch.Tensor]:
    """One prompt-ensemble embedding per shape (or style): the mean over every caption that names it."""
    names = list(world.SHAPES if attribute == "shape" else world.STYLES)
    feats = []
    for n in names:
        caps = [s.caption() for s in world.all_scenes() if getattr(s, attribute) == n]
        feats.append(torch.nn.functional.normalize(encoder.text_features(caps).mean(0), dim=-1))
    return names, torch.stack(feats)


@torch.no_grad()
def zero_shot(encoder: ClipEncoder, images: torch.Tensor, attribute: str) -> list[str]:
    names, text = class_texts(encoder, attribute)
    return [names[i] for i in (encoder.image_features(images) @ text.T).argmax(-1).tolist()]


def confusion(truth: list[str], pred: list[str], names: tuple[str, ...]) -> str:
    w = max(map(len, names)) + 1
    lines = [" " * w + "".join(f"{n[:7]:>8}" for n in names) + "     acc"]
    for a in names:
        row = [sum(1 for t, p in zip(truth, pred) if t == a and p == b) for b in names]
        lines.append(f"{a:<{w}}" + "".join(f"{c:>8}" for c in row) + f"  {row[names.index(a)] / max(sum(row), 1):6.1%}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--world", choices=("v1", "v2"), default="v1")
    chosen, rest = pre.parse_known_args(argv)
    if chosen.world == "v2":
        from unlearn.toy import check2

        return check2.main(rest)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=("v1", "v2"), default="v1", help="v2: a staged world-v2 build")
    p.add_argument("--model", default="toy")
    p.add_argument("--clip", default=str(WEIGHTS / "clip"))
    p.add_argument("--per-scene", type=int, default=2, help="images per (shape, colour, style)")
    p.add_argument("--out", type=Path, default=Path("outputs/toy_check"))
    a = p.parse_args(argv)
    from unlearn.utils.grid import save_grid

    comps = load_components(a.model)
    encoder = ClipEncoder.from_pretrained(a.clip)
    scenes = [s for s in world.all_scenes() for _ in range(a.per_scene)]
    prompts = [s.caption() for s in scenes]
    t0 = time.perf_counter()
    generate(comps, prompts[:16], list(range(16)))
    t16 = time.perf_counter() - t0
    images = torch.cat([generate(comps, prompts[i:i + 64], list(range(i, min(i + 64, len(prompts)))))
                        for i in range(0, len(prompts), 64)])
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"sample_16_seconds": round(t16, 2), "images": len(images)}
    for attribute, names in (("shape", world.SHAPES), ("style", world.STYLES)):
        truth = [getattr(s, attribute) for s in scenes]
        pred = zero_shot(encoder, images, attribute)
        acc = sum(t == q for t, q in zip(truth, pred)) / len(truth)
        report[f"{attribute}_accuracy"] = round(acc, 4)
        print(f"\n{attribute} (zero-shot toy CLIP on generated images): accuracy {acc:.1%}")
        print(confusion(truth, pred, names))
        for n in names:
            idx = [i for i, t in enumerate(truth) if t == n][:24]
            save_grid(images[idx], a.out / f"{attribute}_{n}.png", nrow=8)
    print(f"\nsampling 16 images: {t16:.2f} s ({torch.get_num_threads()} threads)")
    (a.out / "report.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
