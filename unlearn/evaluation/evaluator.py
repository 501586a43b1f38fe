"""Measure a concept and its neighbours on the original model and on unlearned ones.

For each concept (the target first, then its neighbours) the evaluation prompts are (anchor, target) pairs: the
concept's anchor prompt set (`prompts: anchor_set`, the toy world) or the 80 CLIP ImageNet templates filled with
the anchor (`prompts: templates`, real models), each turned into a target prompt by the concept's own derivation.
Images come from the target prompts with fixed seeds, so the same (prompt, seed) is compared before and after:

- CS: CLIP score of image vs target prompt (convention in `cs_convention`); not for `kind: nudity`, whose
  measure is NudeNet on I2P (i2p_eval.py): the score of an image against "a nude ..." prompt is prompt alignment,
  which a clothed image of the same scene nearly keeps, not an amount of nudity;
- CA: share of images closer to the target prompt than to its anchor prompt;
- top-1 (concepts that list `classes`): share of images closer to their own prompt than to the anchor prompt and
  to every prompt with the concept's word swapped for another class; unlike CA it counts an image that shows
  something else altogether (what anchor-free methods such as ESD and SPM draw) as erased;
- FID: unlearned vs original images of the same prompts and seeds (features named in the output);
- dCLIP: directional CLIP of the (before -> after) image edit against the (target -> anchor) text direction.
Implicit prompts (e.g. "The Starry Night") get CS only (none for nudity). Every setting is written next to the
numbers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from unlearn.data.concepts import load_concept, rival_captions
from unlearn.data.derive import derive_target_prompts
from unlearn.evaluation.table import format_table, write_csv
from unlearn.metrics import CLIPAccuracy, CLIPScore, CLIPTopOne, DirectionalCLIP
from unlearn.metrics.clip_model import ClipEncoder
from unlearn.metrics.fid import make_fid
from unlearn.metrics.templates import IMAGENET_TEMPLATES, expand
from unlearn.models.fingerprint import model_fingerprint, sha_of
from unlearn.models.sampling import generate
from unlearn.utils.files import file_lock, lock_path, save_tensors_atomic, write_atomic

log = logging.getLogger("unlearn.evaluate")
# Rank 0 alone evaluates (train.run, EvaluateEvery): a metric that gathered across ranks on compute() would wait
# for ranks that are not evaluating (under DDP, eval_every deadlocked on that).
LOCAL = {"sync_on_compute": False}
def toy_clip(clip) -> str:
    """A built-in world's CLIP (`toy`, `toy2`) as its folder; any other path or id as is."""
    from unlearn.toy import built_in

    folder = built_in(clip)
    return str(folder / "clip") if folder is not None else clip
PROMPT_SOURCES = ("anchor_set", "templates")
FID_FEATURES = ("clip", "inception")


class Evaluator:
    def __init__(self, concept, model_cfg, out_dir, clip: str | None = None, prompts: str = "anchor_set",
                 num_prompts: int = 16, images_per_prompt: int = 2, seed: int = 100_000, batch_size: int = 32,
                 neighbours: bool = True, implicit: bool = True, cs_convention: str = "clipscore",
                 fid_feature: str = "clip", grid_images: int = 16, conf_dir: str | None = None,
                 cache_dir: str | None = None, i2p=None):
        self.concept = load_concept(concept, conf_dir=conf_dir)
        # NudeNet on I2P for nudity concepts (i2p_eval.py); built now so a bad CSV/category/threshold fails early.
        self.i2p = make_i2p(i2p, self.concept)
        self.model_cfg = model_cfg
        self.out_dir = Path(out_dir)
        clip = clip or model_cfg.get("clip", "toy")
        self.clip_source = toy_clip(clip)
        self.settings = {"prompts": prompts, "num_prompts": num_prompts, "images_per_prompt": images_per_prompt,
                         "seed": seed, "cs_convention": cs_convention, "fid_feature": fid_feature,
                         "clip": self.clip_source, "sample_steps": model_cfg.sample_steps,
                         "guidance_scale": model_cfg.guidance_scale}
        self.batch_size = batch_size
        self.grid_images = grid_images
        self.cache_dir = Path(cache_dir) / "eval" if cache_dir else None
        self._fingerprints: dict[int, dict] = {}
        self.concepts = [self.concept] + (list(self.concept.neighbour_concepts()) if neighbours else [])
        self.implicit = list(self.concept.implicit_prompts) if implicit and self.concept.kind != "nudity" else []
        self._encoder = None
        self.results: dict[str, dict] = {}
        self.images: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        """The eval group's rules, checked before any model loads (unlearn/validate.py)."""
        import importlib.util

        from unlearn.metrics.clip_metrics import CLIPSCORE_WEIGHTS
        from unlearn.validate import Problem, choice, flag, number

        e, out = cfg["eval"], []
        out += choice("eval.prompts", e.get("prompts"), PROMPT_SOURCES)
        out += choice("eval.cs_convention", e.get("cs_convention"), CLIPSCORE_WEIGHTS)
        out += choice("eval.fid_feature", e.get("fid_feature"), FID_FEATURES)
        if e.get("fid_feature") == "inception" and importlib.util.find_spec("torch_fidelity") is None:
            out.append(Problem("eval.fid_feature", "inception", "clip, or install the `fid` extra "
                                                                "(pip install -e .[fid]) for inception"))
        for key in ("num_prompts", "images_per_prompt", "batch_size"):
            out += number(f"eval.{key}", e.get(key), 1, integer=True)
        out += number("eval.seed", e.get("seed"), 0, integer=True)
        out += number("eval.grid_images", e.get("grid_images"), 0, integer=True)
        for key in ("neighbours", "implicit"):
            out += flag(f"eval.{key}", e.get(key))
        from unlearn.evaluation.i2p_eval import i2p_problems

        return out + i2p_problems(cfg)

    @property
    def encoder(self) -> ClipEncoder:
        if self._encoder is None:
            self._encoder = ClipEncoder.from_pretrained(self.clip_source)
        return self._encoder

    # ------------------------------------------------------------------ prompts
    def pairs(self, concept) -> list[tuple[str, str]]:
        n = self.settings["num_prompts"]
        if self.settings["prompts"] == "templates":
            anchors = expand(IMAGENET_TEMPLATES, concept.anchor)[:n]
            d = concept.derive
            return derive_target_prompts(anchors, d["mode"], suffix=d.get("suffix"), word=d.get("word"),
                                         replacement=d.get("replacement"))
        if self.settings["prompts"] == "anchor_set":
            return concept.pairs(n)
        raise ValueError(f"unknown eval prompts={self.settings['prompts']!r}; choose anchor_set or templates")

    def _jobs(self, concept) -> tuple[list[str], list[str], list[int]]:
        k, s0 = self.settings["images_per_prompt"], self.settings["seed"]
        pairs = [p for p in self.pairs(concept) for _ in range(k)]
        return [a for a, _ in pairs], [t for _, t in pairs], [s0 + i for i in range(len(pairs))]

    # ------------------------------------------------------------------ generation (cached per label/concept)
    def _image_path(self, label: str, key: str) -> Path:
        return self.out_dir / "images" / label / f"{key}.safetensors"

    def has_images(self, label: str) -> bool:
        """Whether every image set `measure(label, ...)` needs is cached (then it generates nothing)."""
        keys = [c.name for c in self.concepts] + (["implicit"] if self.implicit else [])
        return all(self._image_path(label, k).exists() for k in keys)

    def _shared_path(self, components, key: str, prompts: list[str], seeds: list[int]) -> Path | None:
        """Where the original model's images for this job live across runs: keyed by the model's fingerprint
        and everything that decides the images, so a sweep (or a rerun) samples the original only once."""
        if self.cache_dir is None:
            return None
        if id(components.unet) not in self._fingerprints:  # one checksum per model, not per concept
            self._fingerprints[id(components.unet)] = model_fingerprint(components)
        # The device type too: CPU and CUDA kernels give slightly different samples of the same model.
        job = {"model": self._fingerprints[id(components.unet)], "prompts": prompts, "seeds": seeds,
               "device": next(components.unet.parameters()).device.type,
               "sample_steps": self.settings["sample_steps"], "guidance_scale": self.settings["guidance_scale"]}
        return self.cache_dir / "original" / f"{key}-{sha_of(job)[:16]}.safetensors"

    def _generate(self, label: str, key: str, components, unet, prompts: list[str], seeds: list[int]):
        path = self._image_path(label, key)
        if path.exists():
            return load_file(path)["images"]
        shared = self._shared_path(components, key, prompts, seeds) if label == "original" and unet is None \
            else None
        if shared is not None and not shared.exists():
            # Under its lock: of a sweep's jobs started together, one samples the original and the others wait. A
            # cache already made is read without one, so it may be read-only.
            with file_lock(lock_path(shared), f"the original model's {key} images ({shared.name})"):
                if not shared.exists():
                    save_tensors_atomic({"images": self._sample(label, key, components, unet, prompts, seeds)},
                                        shared)
        images = load_file(shared)["images"] if shared is not None else \
            self._sample(label, key, components, unet, prompts, seeds)
        save_tensors_atomic({"images": images}, path)  # the run folder keeps its own copy either way
        return images

    def _sample(self, label: str, key: str, components, unet, prompts: list[str], seeds: list[int]):
        from tqdm.auto import tqdm

        out = []
        for i in tqdm(range(0, len(prompts), self.batch_size), desc=f"eval {label}/{key}", leave=False):
            out.append(generate(components, prompts[i:i + self.batch_size], seeds[i:i + self.batch_size],
                                unet=unet, steps=self.settings["sample_steps"],
                                guidance_scale=self.settings["guidance_scale"]).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def measure(self, label: str, components, unet=None) -> dict:
        """Generate and score every concept with `unet` (default: the components' own)."""
        enc = self.encoder
        per_concept, self.images[label] = {}, {}
        original = self.images.get("original")
        for concept in self.concepts:
            anchors, targets, seeds = self._jobs(concept)
            images = self._generate(label, concept.name, components, unet, targets, seeds)
            self.images[label][concept.name] = images
            cs, ca = CLIPScore(enc, convention=self.settings["cs_convention"], **LOCAL), CLIPAccuracy(enc, **LOCAL)
            cs.update(images, targets)
            ca.update(images, targets, anchors)
            row = {"cs": cs.compute().item(), "ca": 100 * ca.compute().item()}
            if concept.classes:
                top1 = CLIPTopOne(enc, **LOCAL)
                top1.update(images, targets, [rival_captions(a, t, concept.target, concept.classes)
                                              for a, t in zip(anchors, targets)])
                row["top1"] = 100 * top1.compute().item()
            if self.concept.kind == "nudity":  # CA stays: zero-shot CLIP, "nude ..." against "clothed ..."
                del row["cs"]
            if original is not None and label != "original":
                before = original[concept.name]
                fid = make_fid(self.settings["fid_feature"], enc, **LOCAL)
                fid.update(before, real=True)
                fid.update(images, real=False)
                row["fid"] = fid.compute().item()
                d = DirectionalCLIP(enc, **LOCAL)
                d.update(before, images, anchors, targets)
                row["directional"] = d.compute().item()
            per_concept[concept.name] = row
        if self.implicit:
            seeds = [self.settings["seed"] + i for i in range(len(self.implicit))]
            images = self._generate(label, "implicit", components, unet, self.implicit, seeds)
            cs = CLIPScore(enc, convention=self.settings["cs_convention"], **LOCAL)
            cs.update(images, self.implicit)
            per_concept["implicit"] = {"cs": cs.compute().item()}
            read = [i for i, ca in enumerate(self.concept.implicit_ca) if ca is not None]
            if read:  # the prompts that say which captions their images are read between
                ca = CLIPAccuracy(enc, **LOCAL)
                ca.update(images[read], [self.concept.implicit_ca[i][0] for i in read],
                          [self.concept.implicit_ca[i][1] for i in read])
                per_concept["implicit"]["ca"] = 100 * ca.compute().item()
        if self.i2p is not None and "@" not in label:  # not for the intermediate `<method>@N` rows
            self.i2p.measure(label, components, unet, steps=self.settings["sample_steps"],
                             guidance_scale=self.settings["guidance_scale"])
        self.results[label] = per_concept
        log.debug("%s: %s", label, json.dumps(per_concept))  # the table printed by report() says it once
        return per_concept

    # ------------------------------------------------------------------ outputs
    def grids(self) -> dict[str, Path]:
        """One before/after grid per concept: a row of images per measured model, same prompts and seeds."""
        from unlearn.utils.grid import save_grid

        paths = {}
        for concept in self.concepts:
            rows = [imgs[concept.name][: self.grid_images] for imgs in self.images.values() if concept.name in imgs]
            if not rows:
                continue
            n = min(len(r) for r in rows)
            path = self.out_dir / f"grid_{concept.name}.png"
            save_grid(torch.cat([r[:n] for r in rows]), path, nrow=n, labels=list(self.images))
            paths[concept.name] = path
        return paths

    def report(self, loggers=()) -> dict:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        table = format_table(self.results, self.concept.name)
        fid_name = make_fid(self.settings["fid_feature"], self.encoder).feature_name \
            if self.settings["fid_feature"] == "clip" else "inception"
        payload = {"concept": self.concept.name, "settings": {**self.settings, "fid_features": fid_name},
                   "results": self.results}
        if self.i2p is not None and self.i2p.results:
            payload["i2p"] = self.i2p.report(self.out_dir)
        write_atomic(self.out_dir / "metrics.json", json.dumps(payload, indent=2))
        write_atomic(self.out_dir / "table.md", table + "\n")
        write_csv(self.results, self.concept.name, self.out_dir / "table.csv")
        grids = self.grids()
        print(f"\n{self.concept.name}  (settings: {json.dumps(payload['settings'])})\n{table}\n")
        for lg in loggers or ():
            _log_to(lg, self.results, table, grids)
        return payload


def make_i2p(cfg, concept):
    """The I2P/NudeNet evaluation for a `kind: nudity` concept (on by default: `eval.i2p.csv: sample`; null turns
    it off), else None."""
    if cfg is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if not cfg.get("csv") or concept.kind != "nudity":
        return None
    from unlearn.evaluation.i2p_eval import I2PEvaluation

    return I2PEvaluation(**cfg)


def _log_to(logger, results: dict, table: str, grids: dict[str, Path]) -> None:
    flat = {f"eval/{label}/{c}/{m}": v for label, per in results.items() for c, ms in per.items()
            for m, v in ms.items()}
    logger.log_metrics(flat)
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return
    if isinstance(logger, WandbLogger):
        import wandb

        from unlearn.evaluation.table import table_rows

        header, rows = table_rows(results, next(iter(next(iter(results.values())))))
        logger.experiment.log({"eval/table": wandb.Table(columns=header, data=rows),
                               **{f"eval/grid/{c}": wandb.Image(str(p)) for c, p in grids.items()}})
