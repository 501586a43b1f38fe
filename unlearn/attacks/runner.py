"""One concept's robustness measures for one model after another: the clean detection rate, an attack's success
rate with its random-prefix control, and CCS / CRS (partial-diffusion recovery).

As in UnlearnDiffAtk's data sets, only prompts whose reference image (original model) shows the concept are
attacked (`attack.filter_references`); every number is written with the detector's and the attack's settings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from unlearn.attacks import build_attack, check_attack_config
from unlearn.attacks.base import Reference
from unlearn.attacks.common import Check, PrefixPrompt, random_tokens, sample_ids, sample_text
from unlearn.utils.labels import pipeline_label

log = logging.getLogger("unlearn.attack")


def _jobs(concept, n: int, seed0: int) -> tuple[list[str], list[str], list[int]]:
    pairs = concept.pairs(n)
    return [a for a, _ in pairs], [t for _, t in pairs], [seed0 + i for i in range(len(pairs))]


class Robustness:
    """Shared state for one concept: original model, detector, attack, prompts and the reference images."""

    def __init__(self, concept, attack_cfg: Mapping, model_cfg: Mapping, detector_cfg: Mapping | None = None,
                 recovery_cfg: Mapping | None = None, original=None, encoder=None):
        from unlearn.data.concepts import load_concept
        from unlearn.evaluation.evaluator import TOY_CLIP
        from unlearn.metrics.concept_recovery import PSI_GRID, check_psi
        from unlearn.metrics.detectors import make_detector

        self.concept = load_concept(concept)
        self.cfg = check_attack_config(attack_cfg, self.concept.kind)
        self.attack = build_attack(self.cfg)
        self.model_cfg = dict(model_cfg)
        self.recovery = dict(recovery_cfg or {"enabled": False})
        if self.recovery.get("enabled", False):
            self.recovery["psi"] = check_psi(list(self.recovery.get("psi") or PSI_GRID))
        self._encoder = encoder
        clip = self.model_cfg.get("clip", "toy")
        self.clip_source = str(TOY_CLIP) if clip in (None, "toy") else str(clip)
        det = dict(detector_cfg or {})
        needs_clip = det.get("name", "auto") == "clip" or (det.get("name", "auto") == "auto"
                                                            and self.concept.kind != "nudity")
        self.detector = make_detector(det, self.concept, clip=self.clip_source,
                                      encoder=self.encoder if needs_clip else None)
        if original is None:
            from unlearn.models.loading import load_components

            original = load_components(self.model_cfg["path"], revision=self.model_cfg.get("revision"),
                                       dtype=self.model_cfg.get("dtype", "float32"))
        self.original = original
        self.anchors, self.targets, self.seeds = _jobs(self.concept, self.cfg["num_prompts"],
                                                       int(self.cfg.get("seed", 100_000)))
        self._reference = None

    @property
    def encoder(self):
        if self._encoder is None:
            from unlearn.metrics.clip_model import ClipEncoder

            self._encoder = ClipEncoder.from_pretrained(self.clip_source)
        return self._encoder

    @property
    def settings(self) -> dict:
        return {"attack": {**self.cfg, "name": self.attack.name}, "detector": self.detector.settings,
                "recovery": self.recovery, "sample_steps": self.model_cfg["sample_steps"],
                "guidance_scale": self.model_cfg["guidance_scale"], "concept": self.concept.name,
                "prompts": len(self.targets)}

    def _generate(self, unet, prompts, seeds):
        from unlearn.models.sampling import generate

        return generate(self.original, prompts, seeds, unet=unet, steps=self.model_cfg["sample_steps"],
                        guidance_scale=self.model_cfg["guidance_scale"], return_latents=True)

    def reference(self) -> tuple[Tensor, Tensor, Tensor]:
        """The original model's images and x0 latents of every prompt, and which of them show the concept."""
        if self._reference is None:
            images, latents = self._generate(None, self.targets, self.seeds)
            shows = self.detector(images, self.targets, self.anchors)
            self._reference = (images.cpu(), latents.cpu(), shows)
        return self._reference

    def check(self, erased, i: int) -> Check:
        return Check(erased, self.detector, self.targets[i], self.anchors[i], self.seeds[i],
                     self.model_cfg["sample_steps"], self.model_cfg["guidance_scale"])

    def run(self, unet, label: str = "model") -> dict:
        ref_images, ref_latents, ref_shows = self.reference()
        keep = [i for i in range(len(self.targets)) if ref_shows[i] or not self.cfg.get("filter_references", True)]
        images, _ = self._generate(unet, self.targets, self.seeds)
        clean = self.detector(images, self.targets, self.anchors)
        erased = dataclasses.replace(self.original, unet=unet)
        shown = [i for i in range(len(self.targets)) if ref_shows[i]]
        concept_latents, concept_prompts = ref_latents[shown], [self.targets[i] for i in shown]
        per_prompt, found = [], 0
        unet.requires_grad_(False)
        for i in keep:
            row = {"prompt": self.targets[i], "seed": self.seeds[i], "clean": bool(clean[i])}
            if not clean[i] and self.attack.active:
                ref = Reference(image=ref_images[i:i + 1], latent=ref_latents[i:i + 1],
                                concept_latents=concept_latents, concept_prompts=concept_prompts)
                with torch.enable_grad():
                    res = self.attack.run(self.original, erased, self.targets[i], ref, self.check(erased, i),
                                          seed=int(self.cfg.get("seed", 0)) + i)
                row.update(attack=res.to_dict())
                found += res.success
            per_prompt.append(row)
        n = max(len(keep), 1)
        n_clean = sum(int(clean[i]) for i in keep)
        out = {"label": label, "attack": self.attack.name, "prompts_attacked": len(keep), "prompts": len(self.targets),
               "reference_rate": 100.0 * float(ref_shows.float().mean()),
               "clean_rate": 100.0 * n_clean / n, "asr": 100.0 * (n_clean + found) / n,
               "found_by_attack": found, "random_prefix_rate": self.random_prefix_rate(unet, keep),
               "per_prompt": per_prompt}
        if self.recovery.get("enabled", False):
            out.update(self.recover(unet, images))
        log.info("%s: clean %.1f %%, ASR %.1f %%", label, out["clean_rate"], out["asr"])
        return out

    @torch.no_grad()
    def random_prefix_rate(self, unet, keep: list[int]) -> float | None:
        """Control: detection rate with k random (non-special) prefix tokens and no optimisation - how much of the
        success rate the optimisation itself earns. Tried by the attack's readout (ids, or their text)."""
        if not keep or not self.attack.active or not self.attack.k:
            return None
        tok = self.original.tokenizer
        gen = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)))
        prefixes = [PrefixPrompt(tok, self.original.text_encoder, self.targets[i], self.attack.k) for i in keep]
        tokens = [random_tokens(tok, self.attack.k, gen) for _ in keep]
        seeds = [self.seeds[i] for i in keep]
        steps, guidance = self.model_cfg["sample_steps"], self.model_cfg["guidance_scale"]
        if self.attack.readout == "ids":
            ids = torch.cat([p.with_tokens(t) for p, t in zip(prefixes, tokens)])
            images = sample_ids(self.original, unet, ids, seeds, steps, guidance)
        else:
            texts = [p.text(t) for p, t in zip(prefixes, tokens)]
            images = sample_text(self.original, unet, texts, seeds, steps, guidance)
        shows = self.detector(images, [self.targets[i] for i in keep], [self.anchors[i] for i in keep])
        return 100.0 * shows.float().mean().item()

    def recover(self, unet, unlearned_images: Tensor) -> dict:
        from unlearn.metrics.concept_recovery import partial_diffusion, recovery_scores

        ref_images = self.reference()[0]
        if unet is self.original.unet:  # the original against itself: nothing to classify or recover
            return {"ccs": None, "crs": None}
        partial = partial_diffusion(self.original, self.original.unet, unet, self.targets, self.seeds,
                                    self.recovery["psi"], steps=self.model_cfg["sample_steps"],
                                    guidance_scale=self.model_cfg["guidance_scale"])
        return recovery_scores(self.encoder, ref_images, unlearned_images, partial,
                               l2=float(self.recovery.get("l2", 1e-3)))


def attack_success(pipeline_path: str | Path, concept, cfg: Mapping, model_cfg: Mapping,
                   detector_cfg: Mapping | None = None, recovery_cfg: Mapping | None = None,
                   robustness: Robustness | None = None) -> dict:
    """Clean detection rate and success rate (and CCS/CRS when `recovery_cfg.enabled`) of one pipeline folder, run
    folder or delta, with the settings that produced them. Pass `robustness` to reuse the original model and
    reference images."""
    from unlearn.export.load import unet_of

    rob = robustness or Robustness(concept, cfg, model_cfg, detector_cfg, recovery_cfg)
    unet = unet_of(pipeline_path, rob.original, dtype=rob.model_cfg.get("dtype", "float32"))
    return {**rob.run(unet, label=pipeline_label(pipeline_path)), "settings": rob.settings}


def format_robustness(rows: list[dict]) -> str:
    def f(v):
        return "—" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    name = rows[0].get("attack", "attack") if rows else "attack"
    head = ["model", "reference det. %", "clean det. %", "random-prefix det. %", f"ASR % ({name})",
            "found by attack", "CCS", "CRS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        crs = "—" if r.get("crs") is None else f"{r['crs']:.4f}"
        cells = [r["label"], f(r["reference_rate"]), f(r["clean_rate"]), f(r.get("random_prefix_rate")),
                 f(r["asr"]), f"{r['found_by_attack']}/{r['prompts_attacked']}", f(r.get("ccs")), crs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def found_prompts(rows: list[dict]) -> list[dict]:
    """Every attacked prompt of every model, with the prompt the attack found as text (one JSON object a line in
    `adversarial_prompts.jsonl`, to paste into a pipeline)."""
    out = []
    for r in rows:
        for p in r["per_prompt"]:
            if "attack" in p:
                a = p["attack"]
                out.append({"model": r["label"], "attack": r.get("attack"), "prompt": p["prompt"], "seed": p["seed"],
                            "success": a["success"], "adversarial_prompt": a["prompt"],
                            "readout": a.get("readout"), "iterations": a["iterations"]})
    return out
