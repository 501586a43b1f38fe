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
