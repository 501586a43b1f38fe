"""Check a world-v2 build: does its generator draw what v2 captions say, read by its own CLIP, zero-shot?

    python -m unlearn.toy.check --world v2 --model /tmp/toy2/pipeline --clip /tmp/toy2/clip
    python -m unlearn.toy.check --world v2 --clean --clip /tmp/toy2/clip    # the CLIP alone, on rendered images

Reports shape and style accuracy on the plainest captions (with confusion tables), accuracy per word (every
synonym, every style form), per concept on its implicit prompts, per side of two-object scenes, and how often each
new concept is read as the one it imitates (arc -> ring, ...) and back. With --clean the images are rendered, not
generated, and a word or implicit prompt counts as read when its text lands nearest its class's images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from unlearn.toy import language as lang
from unlearn.toy import world2
from unlearn.toy.check import confusion


@torch.no_grad()
def classifier(encoder, captions_of: dict[str, list[str]]):
    """Zero-shot over classes, each the mean text embedding of the captions that name it (a prompt ensemble)."""
    names = list(captions_of)
    text = torch.stack([torch.nn.functional.normalize(encoder.text_features(captions_of[n]).mean(0), dim=-1)
                        for n in names])
    return lambda images: [names[i] for i in (encoder.image_features(images) @ text.T).argmax(-1).tolist()]


@torch.no_grad()
def text_reader(encoder, images: torch.Tensor, truth: list[str]):
    """Each text -> the class whose images' mean embedding is nearest: does a word, as text, mean its class?"""
    feats, names = encoder.image_features(images), sorted(set(truth))
    centre = torch.stack([torch.nn.functional.normalize(feats[[i for i, t in enumerate(truth) if t == n]].mean(0),
                                                        dim=-1) for n in names])
    return lambda texts: [names[i] for i in (encoder.text_features(texts) @ centre.T).argmax(-1).tolist()]


def rendered(scenes: list, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([world2.render(s, rng) for s in scenes])).permute(0, 3, 1, 2).float() / 255


def word_prompts(per_word: int) -> list[tuple[str, str, str, str]]:
    """(attribute, class, word or form, prompt): every way the language names each shape and style."""
    out = []
    for shape, words in lang.all_words(lang.SHAPE_WORDS).items():
        out += [("shape", shape, w, f"a {lang.COLOURS[i % 4]} {w}") for w in words for i in range(per_word)]
    for style in lang.STYLES[1:]:
        adjectives, phrases = lang.style_forms(style)
        for k, form in enumerate(adjectives + phrases):
            for i in range(per_word):
                noun = f"{lang.COLOURS[(i + k) % 4]} {('square', 'circle', 'triangle')[i % 3]}"
                out.append(("style", style, form, f"a {form} {noun}" if form in adjectives else f"a {noun} {form}"))
    return out


def cycled(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def accuracy(pairs) -> float:
    pairs = list(pairs)
    return round(sum(t == p for t, p in pairs) / max(len(pairs), 1), 4)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a v2 pipeline folder (not with --clean)")
    p.add_argument("--clean", action="store_true", help="read rendered images: checks the CLIP alone")
    p.add_argument("--clip", required=True, help="its CLIP folder")
    p.add_argument("--scenes", type=int, default=448, help="one-object scenes, cycled over all 224")
    p.add_argument("--per-word", type=int, default=2, help="prompts per synonym or style form")
    p.add_argument("--implicit", type=int, default=8, help="implicit prompts per concept (cycled)")
    p.add_argument("--pairs", type=int, default=64, help="two-object scenes")
    p.add_argument("--out", type=Path, default=Path("outputs/toy_check_v2"))
    a = p.parse_args(argv)
    if (a.model is None) != a.clean:
        p.error("give --model, or --clean to check the CLIP alone")
    from unlearn.metrics.clip_model import ClipEncoder
    from unlearn.models import generate, load_components
    from unlearn.utils.grid import save_grid

    rng = np.random.default_rng(0)
    scenes = world2.all_scenes()
    one = [scenes[i % len(scenes)] for i in rng.permutation(max(a.scenes, len(scenes)))[:a.scenes]]
    words = word_prompts(a.per_word)
    concepts = list(lang.ANCHORS)
    implicit = [(c, q) for c in concepts for q in cycled(lang.implicit_prompts(c), a.implicit)]
    plain = [lang.Object(s, c) for s in lang.SHAPES for c in lang.COLOURS]
    pairs = [lang.Scene(plain[i], plain[j]) for i, j in rng.integers(len(plain), size=(a.pairs, 2))]
    prompts = ([lang.canonical(s) for s in one] + [w[3] for w in words] + [q for _, q in implicit]
               + [lang.canonical(s) for s in pairs])

    enc = ClipEncoder.from_pretrained(a.clip)
    t0 = time.perf_counter()
    if a.clean:
        img_one, img_pairs = rendered(one, 1), rendered(pairs, 2)
        images = torch.cat([img_one, img_pairs])
    else:
        comps = load_components(a.model)
        images = torch.cat([generate(comps, prompts[i:i + 64], list(range(i, min(i + 64, len(prompts)))))
                            for i in range(0, len(prompts), 64)])
        cuts = np.cumsum([len(one), len(words), len(implicit)])
        img_one, img_words, img_implicit, img_pairs = torch.tensor_split(images, cuts.tolist())
    seconds = time.perf_counter() - t0

    def by(attribute: str, two: str | None = None) -> dict[str, list[str]]:
        pool = [lang.Scene(o, other) for o in plain for other in plain] if two else scenes
        return {n: [lang.canonical(s) for s in pool if getattr(getattr(s, two or "left"), attribute) == n]
                for n in (lang.SHAPES if attribute == "shape" else lang.STYLES)}

    read = {"shape": classifier(enc, by("shape")), "style": classifier(enc, by("style"))}
    report: dict = {"images": "rendered" if a.clean else "generated", "n_images": len(images),
                    "seconds": round(seconds, 1)}
    a.out.mkdir(parents=True, exist_ok=True)
    for attribute, names in (("shape", lang.SHAPES), ("style", lang.STYLES)):
        truth = [getattr(s.left, attribute) for s in one]
        pred = read[attribute](img_one) if len(one) else []
        report[f"{attribute}_accuracy"] = accuracy(zip(truth, pred))
        print(f"\n{attribute} (plainest captions): accuracy {report[f'{attribute}_accuracy']:.1%}")
        print(confusion(truth, pred, names))
        for n in names:
            idx = [i for i, t in enumerate(truth) if t == n][:24]
            if idx:
                save_grid(img_one[idx], a.out / f"{attribute}_{n}.png", nrow=8)
        for new, old in lang.NEAR.items():
            for x, y in ((new, old), (old, new)) if new in names else ():
                read_as = [q for t, q in zip(truth, pred) if t == x]
                report.setdefault("near", {})[f"{x}->{y}"] = round(read_as.count(y) / max(len(read_as), 1), 4)
    if a.clean:  # texts read against the rendered images of each class
        text = {att: text_reader(enc, img_one, [getattr(s.left, att) for s in one]) for att in ("shape", "style")}
        pred_words = {att: text[att]([w[3] for w in words]) for att in text}
        pred_imp = {att: text[att]([q for _, q in implicit]) for att in text}
    else:
        pred_words = {att: read[att](img_words) if len(words) else [] for att in ("shape", "style")}
        pred_imp = {att: read[att](img_implicit) if len(implicit) else [] for att in ("shape", "style")}
    report["per_word"] = {}
    for k, (att, cls, word, _) in enumerate(words):
        report["per_word"].setdefault(f"{cls}: {word}", []).append(pred_words[att][k] == cls)
    report["per_word"] = {k: round(float(np.mean(v)), 4) for k, v in report["per_word"].items()}
    report["implicit"] = {c: accuracy((c, pred_imp["shape" if c in lang.SHAPES else "style"][k])
                                      for k, (cc, _) in enumerate(implicit) if cc == c) for c in concepts}
    for side in ("left", "right"):
        pred = classifier(enc, by("shape", side))(img_pairs) if len(pairs) else []
        report[f"two_object_{side}_shape"] = accuracy(zip((getattr(s, side).shape for s in pairs), pred))
    if len(pairs):
        save_grid(img_pairs[:24], a.out / "two_objects.png", nrow=8)
    print("\nper word (synonyms and style forms):")
    print("\n".join(f"  {k:<40} {v:6.1%}" for k, v in report["per_word"].items()))
    print("implicit prompts per concept: " + ", ".join(f"{c} {v:.0%}" for c, v in report["implicit"].items()))
    print(f"two objects, shape read on the left {report['two_object_left_shape']:.1%}, "
          f"right {report['two_object_right_shape']:.1%}")
    print("near neighbours (fraction of one read as the other): "
          + ", ".join(f"{k} {v:.0%}" for k, v in report.get("near", {}).items()))
    print(f"\n{len(images)} {report['images']} images in {seconds:.0f} s ({torch.get_num_threads()} threads)")
    (a.out / "report.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
