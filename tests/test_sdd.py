"""`method=sdd`: SDD as a config over the self-distillation module (L2, the bare concept text as c_s)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from toy_helpers import compose_train as compose_cfg


@pytest.mark.parametrize("model", ["toy", "sd14"])
def test_sdd_composes_to_self_distill_with_l2(tmp_path, model):
    cfg = compose_cfg(tmp_path, f"model={model}", "method=sdd", "concept=van_gogh")
    m = OmegaConf.to_container(cfg.method, resolve=True)
    assert m["_target_"] == "unlearn.methods.distill.SelfDistill"
    assert (m["name"], m["loss"], m["prompt_source"], m["concept_target"]) == ("sdd", "l2", "concept_text", "Van Gogh")
    assert (m["steps"], m["lr"], m["ema_decay"], m["trainable"]) == (1500, 1e-5, 0.999, "cross_attn")  # from distill
    assert cfg.run_name == "van_gogh-sdd"


def test_sdd_overrides_the_toy_distill_recipe_method(tmp_path):
    m = OmegaConf.to_container(compose_cfg(tmp_path, "experiment=toy_distill", "method=sdd").method, resolve=True)
    assert (m["name"], m["loss"], m["steps"], m["ema_decay"]) == ("sdd", "l2", 200, 0.98)


def test_sdd_conditions_on_the_concept_text(tmp_path, tiny_pipeline_path):
    from unlearn.models import load_components

    cfg = compose_cfg(tmp_path, "model=sd14", f"model.path={tiny_pipeline_path}", "method=sdd", "concept=nudity")
    module = instantiate(cfg.method, components=load_components(str(tiny_pipeline_path)), _convert_="object")
    assert module.concept_prompts == ["nudity"] and module.concept_emb.shape[0] == 1
