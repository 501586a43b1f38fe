"""`python -m unlearn.evaluate` measures a pipeline folder with its own text encoder: an AdvUnlearn export (the UNet
untouched, the text encoder changed) gives other images than the original, which it would not with the base's
text encoder."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from toy_helpers import compose_train

from unlearn.methods.advunlearn import AdvUnlearn
from unlearn.models import load_components


def test_evaluate_generates_with_the_pipeline_folders_text_encoder(tiny_pipeline_path, tmp_path):
    from unlearn.evaluate import run as evaluate

    retain = tmp_path / "retain.txt"
    retain.write_text("a red square\n")
    module = AdvUnlearn(load_components(str(tiny_pipeline_path)), concept_target="ring", retain_prompts=str(retain))
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    module.export(tmp_path / "advrun" / "pipeline")
    evaluate(compose_train(tmp_path / "eval", f"model.path={tiny_pipeline_path}", "model=toy", "concept=toy_ring",
                           "model.sample_steps=2", "eval.num_prompts=1", "eval.images_per_prompt=2",
                           "eval.implicit=false", "eval.neighbours=false", "logger=none",
                           f"+candidates=[{tmp_path / 'advrun' / 'pipeline'}]"))
    images = tmp_path / "eval" / "run" / "eval" / "images"
    original = load_file(images / "original" / "toy_ring.safetensors")["images"]
    erased = load_file(images / "advrun" / "toy_ring.safetensors")["images"]
    assert not torch.equal(erased, original)  # the same UNet: only the text encoder can make them differ


def test_the_attack_runner_attacks_the_pipeline_folders_text_encoder(tiny_pipeline_path, tmp_path, monkeypatch):
    """Clean images, the control and every attack get the erased model's text encoder (AdvUnlearn's change), and
    CCS/CRS, whose partial diffusion conditions both UNets through one text encoder, are left unmeasured."""
    from unlearn.attacks import runner
    from unlearn.export.components import components_of

    (tmp_path / "r.txt").write_text("a red square\n")
    module = AdvUnlearn(load_components(str(tiny_pipeline_path)), concept_target="ring",
                        retain_prompts=str(tmp_path / "r.txt"))
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    module.export(tmp_path / "advrun" / "pipeline")
    base = load_components(str(tiny_pipeline_path))
    erased = components_of(tmp_path / "advrun" / "pipeline", base)
    assert erased.text_encoder is not base.text_encoder
    assert components_of(tiny_pipeline_path, base).text_encoder is base.text_encoder  # untouched: the base's own
    seen = []
    monkeypatch.setattr(runner.Robustness, "_generate",
                        lambda self, unet, prompts, seeds, components=None: seen.append(components) or (
                            torch.zeros(len(prompts), 3, 8, 8), torch.zeros(len(prompts), 4, 4, 4)))
    model_cfg = {"path": str(tiny_pipeline_path), "sample_steps": 1, "guidance_scale": 1.0}
    attack = {**runner.attack_config("toy"), "num_prompts": 1, "iterations": 0}
    rob = runner.Robustness("toy_ring", attack, model_cfg, recovery_cfg={"enabled": True}, original=base)
    monkeypatch.setattr(rob, "detector", lambda images, *a: torch.zeros(len(images), dtype=torch.bool))
    out = rob.run(erased, label="advrun")
    assert seen[-1] is erased and out["ccs"] is None
