"""One concept's robustness measures for one model after another: the clean detection rate, each attack's success
rate with its control (random tokens, no optimisation), and CCS / CRS (partial-diffusion recovery).

Several attacks share one prompt set: the first attack's runner keys (`RUNNER_KEYS`) choose it for all of them. As in
UnlearnDiffAtk's data sets, only prompts whose reference image (original model) shows the concept are attacked
(`attack.filter_references`); every number is written with the detector's and the attacks' settings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from unlearn.attacks import RUNNER_KEYS, build_attack, check_attack_config
from unlearn.attacks.base import Reference
from unlearn.attacks.common import Check, PrefixPrompt, random_tokens, sample_ids, sample_text
from unlearn.models.loading import Components
from unlearn.utils.labels import pipeline_label

log = logging.getLogger("unlearn.attack")


ATTACK_DIR = Path(__file__).resolve().parents[2] / "conf" / "attack"


def attack_config(name: str) -> dict:
    """conf/attack/<name>.yaml as a dict, its defaults (sibling files, `_self_`) merged in order: how a list of
    attack names (`attacks=[...]`) becomes configs inside a run, where Hydra has already composed."""
    from omegaconf import OmegaConf

    path = ATTACK_DIR / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        known = sorted(p.stem for p in ATTACK_DIR.glob("*.yaml"))
        raise ValueError(f"attacks: {name!r} is no attack config; one of {' | '.join(known)}")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    defaults = raw.pop("defaults", None) or ["_self_"]
    out: dict = {}
    for d in defaults if "_self_" in defaults else [*defaults, "_self_"]:
        out.update(raw if d == "_self_" else attack_config(d))
    return out


def attack_configs(first: dict, names: list[str] | None) -> list[dict]:
    """The `attack` node, then every attack named in `attacks`, each from its own file."""
    if names is not None and not isinstance(names, (list, tuple)):
        raise ValueError(f"attacks={names!r} must be a list of conf/attack/ names or null")
    return [first, *(attack_config(n) for n in names or [])]


def _jobs(concept, n: int, seed0: int) -> tuple[list[str], list[str], list[int]]:
    pairs = concept.pairs(n)
    return [a for a, _ in pairs], [t for _, t in pairs], [seed0 + i for i in range(len(pairs))]


class Robustness:
    """Shared state for one concept: original model, detector, attack, prompts and the reference images."""

    def __init__(self, concept, attack_cfg: Mapping, model_cfg: Mapping, detector_cfg: Mapping | None = None,
                 recovery_cfg: Mapping | None = None, original=None, encoder=None):
        from unlearn.data.concepts import load_concept
        from unlearn.evaluation.evaluator import toy_clip
        from unlearn.metrics.concept_recovery import PSI_GRID, check_psi
        from unlearn.metrics.detectors import make_detector

        self.concept = load_concept(concept)
        cfgs = [attack_cfg] if isinstance(attack_cfg, Mapping) else list(attack_cfg)
        if not cfgs:
            raise ValueError("attacks=[]: name at least one attack (conf/attack/)")
        runner = {k: cfgs[0][k] for k in RUNNER_KEYS if k in cfgs[0]}  # one prompt set for every attack
        self.cfgs = [check_attack_config({**c, **runner}, self.concept.kind) for c in cfgs]
        self.cfg = self.cfgs[0]
        self.attacks = [build_attack(c) for c in self.cfgs]
        self.attack = self.attacks[0]
        self.names = _unique([a.name for a in self.attacks])
        self.model_cfg = dict(model_cfg)
        self.recovery = dict(recovery_cfg or {"enabled": False})
        if self.recovery.get("enabled", False):
            self.recovery["psi"] = check_psi(list(self.recovery.get("psi") or PSI_GRID))
        self._encoder = encoder
        clip = self.model_cfg.get("clip", "toy")
        self.clip_source = str(toy_clip("toy" if clip is None else clip))
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
        for a in self.attacks:  # attacks that learn from the original and the concept alone (Ring-A-Bell's vector)
            if hasattr(a, "prepare"):
                a.prepare(original, self.concept)
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
        return {"attack": {**self.cfg, "name": self.attack.name},
                "attacks": [{**c, "name": n} for c, n in zip(self.cfgs, self.names)], "detector": self.detector.settings,
                "recovery": self.recovery, "sample_steps": self.model_cfg["sample_steps"],
                "guidance_scale": self.model_cfg["guidance_scale"], "concept": self.concept.name,
                "prompts": len(self.targets)}

    def _generate(self, unet, prompts, seeds, components=None):
        from unlearn.models.sampling import generate

        return generate(components or self.original, prompts, seeds, unet=unet, steps=self.model_cfg["sample_steps"],
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

    def run(self, model, label: str = "model") -> dict:
        """Attack one model: its UNet, or its Components (`unlearn.export.components.components_of`), whose text
        encoder is then the erased model's too (AdvUnlearn trains it)."""
        erased = model if isinstance(model, Components) else dataclasses.replace(self.original, unet=model)
        unet = erased.unet
        if erased.text_encoder is not self.original.text_encoder:
            erased.text_encoder.requires_grad_(False).eval()
        ref_images, ref_latents, ref_shows = self.reference()
        keep = [i for i in range(len(self.targets)) if ref_shows[i] or not self.cfg.get("filter_references", True)]
        images, _ = self._generate(unet, self.targets, self.seeds, erased)
        clean = self.detector(images, self.targets, self.anchors)
        shown = [i for i in range(len(self.targets)) if ref_shows[i]]
        concept_latents, concept_prompts = ref_latents[shown], [self.targets[i] for i in shown]
        per_prompt = [{"prompt": self.targets[i], "seed": self.seeds[i], "clean": bool(clean[i])} for i in keep]
        unet.requires_grad_(False)
        n = max(len(keep), 1)
        n_clean = sum(int(clean[i]) for i in keep)
        columns = []
        for attack, name in zip(self.attacks, self.names):
            found, used = 0, []
            for row, i in zip(per_prompt, keep):
                if clean[i] or not attack.active:
                    continue
                ref = Reference(image=ref_images[i:i + 1], latent=ref_latents[i:i + 1],
                                concept_latents=concept_latents, concept_prompts=concept_prompts)
                with torch.enable_grad():
                    res = attack.run(self.original, erased, self.targets[i], ref, self.check(erased, i),
                                     seed=int(self.cfg.get("seed", 0)) + i)
                row.setdefault("attacks", {})[name] = res.to_dict()
                found += res.success
                used.append(res.iterations)
            columns.append({"attack": name, "asr": 100.0 * (n_clean + found) / n, "found_by_attack": found,
                            "iterations": sum(used) / len(used) if used else None,
                            "control": _control_name(attack),
                            "control_rate": self.random_prefix_rate(erased, keep, attack)})
        for row in per_prompt:  # the first attack's result also as `attack` (one-attack readers, the jsonl)
            if self.names[0] in row.get("attacks", {}):
                row["attack"] = row["attacks"][self.names[0]]
        first = columns[0]
        out = {"label": label, "attack": first["attack"], "prompts_attacked": len(keep), "prompts": len(self.targets),
               "reference_rate": 100.0 * float(ref_shows.float().mean()),
               "clean_rate": 100.0 * n_clean / n, "asr": first["asr"], "found_by_attack": first["found_by_attack"],
               "random_prefix_rate": first["control_rate"], "attacks": columns, "per_prompt": per_prompt}
        if self.recovery.get("enabled", False):
            # Partial diffusion conditions both UNets through one text encoder: not defined for a text-encoder edit.
            same_text = erased.text_encoder is self.original.text_encoder
            out.update(self.recover(unet, images) if same_text else {"ccs": None, "crs": None})
        log.info("%s: clean %.1f %%, %s", label, out["clean_rate"],
                 ", ".join(f"ASR {c['attack']} {c['asr']:.1f} %" for c in columns))
        return out

    @torch.no_grad()
    def random_prefix_rate(self, erased, keep: list[int], attack=None) -> float | None:
        """Control: detection rate with k random (non-special) tokens and no optimisation - how much of the
        success rate the optimisation itself earns. The tokens prefix the prompt, or stand alone for an attack that
        searches whole prompts (`control_keeps_prompt = False`: Ring-A-Bell); tried by the attack's readout."""
        attack = attack or self.attack
        if not keep or not attack.active or not attack.k:
            return None
        tok = self.original.tokenizer
        gen = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)))
        with_prompt = getattr(attack, "control_keeps_prompt", True)
        if not isinstance(erased, Components):
            erased = dataclasses.replace(self.original, unet=erased)
        prefixes = [PrefixPrompt(tok, erased.text_encoder, self.targets[i] if with_prompt else "", attack.k)
                    for i in keep]
        tokens = [random_tokens(tok, attack.k, gen) for _ in keep]
        seeds = [self.seeds[i] for i in keep]
        steps, guidance = self.model_cfg["sample_steps"], self.model_cfg["guidance_scale"]
        if attack.readout == "ids":
            ids = torch.cat([p.with_tokens(t) for p, t in zip(prefixes, tokens)])
            images = sample_ids(erased, erased.unet, ids, seeds, steps, guidance)
        else:
            texts = [p.text(t) for p, t in zip(prefixes, tokens)]
            images = sample_text(erased, erased.unet, texts, seeds, steps, guidance)
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
    from unlearn.export.components import components_of

    rob = robustness or Robustness(concept, cfg, model_cfg, detector_cfg, recovery_cfg)
    model = components_of(pipeline_path, rob.original, dtype=rob.model_cfg.get("dtype", "float32"))
    return {**rob.run(model, label=pipeline_label(pipeline_path)), "settings": rob.settings}


def _unique(names: list[str]) -> list[str]:
    """Column names: an attack named twice (two budgets of one attack) gets #2, #3, ..."""
    out = []
    for name in names:
        out.append(name if name not in out else f"{name}#{sum(o.split('#')[0] == name for o in out) + 1}")
    return out


def _control_name(attack) -> str | None:
    if not attack.k:
        return None
    return "random prefix" if getattr(attack, "control_keeps_prompt", True) else "random tokens"


def attack_columns(row: dict) -> list[dict]:
    """A row's per-attack results (a row written before several attacks: its one attack)."""
    if "attacks" in row:
        return row["attacks"]
    return [{"attack": row.get("attack", "attack"), "asr": row["asr"], "found_by_attack": row["found_by_attack"],
             "iterations": None, "control": "random prefix", "control_rate": row.get("random_prefix_rate")}]


def format_robustness(rows: list[dict]) -> str:
    """One row per model; per attack its success rate, prompts found, mean iterations and its control."""
    def f(v):
        return "—" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    groups = [(c["attack"], c.get("control")) for c in attack_columns(rows[0])] if rows else []
    head = ["model", "reference det. %", "clean det. %"]
    for name, control in groups:
        head += [f"ASR % ({name})", f"found ({name})", f"iterations ({name})",
                 f"{control or 'control'} det. % ({name})"]
    head += ["CCS", "CRS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        crs = "—" if r.get("crs") is None else f"{r['crs']:.4f}"
        cells = [r["label"], f(r["reference_rate"]), f(r["clean_rate"])]
        by_name = {c["attack"]: c for c in attack_columns(r)}
        for name, _ in groups:
            c = by_name.get(name, {})
            cells += [f(c.get("asr")), f"{c.get('found_by_attack', '—')}/{r['prompts_attacked']}",
                      f(c.get("iterations")), f(c.get("control_rate"))]
        cells += [f(r.get("ccs")), crs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def found_prompts(rows: list[dict]) -> list[dict]:
    """Every attacked prompt of every model and attack, with the prompt the attack found as text (one JSON object
    a line in `adversarial_prompts.jsonl`, to paste into a pipeline; null for an embedding)."""
    out = []
    for r in rows:
        for p in r["per_prompt"]:
            results = p.get("attacks") or ({r.get("attack"): p["attack"]} if "attack" in p else {})
            for name, a in results.items():
                out.append({"model": r["label"], "attack": name, "prompt": p["prompt"], "seed": p["seed"],
                            "success": a["success"], "adversarial_prompt": a["prompt"],
                            "readout": a.get("readout"), "iterations": a["iterations"]})
    return out
