"""SDD's presets: sdd (the data module's batch) and sdd_official (train_sdd.py: one sample of the bare concept)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from toy_helpers import compose_train

from unlearn.methods.distill import SelfDistill
from unlearn.models import encode_prompts, load_components
from unlearn.validate import ConfigError, validate


@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def batches(components, n: int = 3, batch_size: int = 4):
    emb = encode_prompts(components.tokenizer, components.text_encoder, ["a red circle", "a red ring"])
    out = [{"latents": torch.randn(batch_size, 4, 8, 8), "anchor_emb": emb[[0] * batch_size],
            "target_emb": emb[[1] * batch_size], "anchor_prompt": ["a red circle"] * batch_size,
            "target_prompt": ["a red ring"] * batch_size} for _ in range(n)]
    return torch.utils.data.DataLoader(out, batch_size=None)


def method_options(tmp_path, preset: str) -> dict:
    m = OmegaConf.to_container(compose_train(tmp_path, f"method={preset}", "concept=toy_ring"), resolve=True)["method"]
    return {k: v for k, v in m.items() if k not in ("_target_",)}


@pytest.mark.parametrize("preset,batch", [("sdd", 4), ("sdd_official", 1)])
def test_each_iteration_distils_the_bare_concept_on_the_presets_batch(components, tmp_path, monkeypatch, preset,
                                                                      batch):
    options = {**method_options(tmp_path, preset), "steps": 2, "sample_steps": 3}
    assert options["prompt_source"] == "concept_text" and options["loss"] == "l2"
    module = SelfDistill(components, **options)
    seen = []
    original = module.teacher_latents

    def recording(c_s, b):
        seen.append(c_s)
        return original(c_s, b)

    monkeypatch.setattr(module, "teacher_latents", recording)
    L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp_path)).fit(module, train_dataloaders=batches(components))
    ring = encode_prompts(components.tokenizer, components.text_encoder, ["ring"])
    assert len(seen) == 2 and all(c.shape[0] == batch for c in seen)
    torch.testing.assert_close(seen[0], ring.expand(batch, -1, -1))  # the bare concept, not the target prompts


def test_batch_size_is_checked_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"method.batch_size=0"):
        validate(compose_train(tmp_path, "method=sdd_official", "method.batch_size=0"))
    with pytest.raises(ConfigError, match=r"method.batch_size=1: >= 2 with method.loss=cw"):
        validate(compose_train(tmp_path, "method=distill", "method.loss=cw", "method.batch_size=1"))
