"""RECE: the adversarial embedding's closed form against a stacked least-squares solve, what the rounds change,
the config, and the edit on the toy world."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from toy_helpers import compose_train as compose_cfg

from unlearn.methods.rece import RECE, adversarial_embedding_map
from unlearn.methods.uce import UCE
from unlearn.models import load_components


def layers(n_layers=3, n_in=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = [4, 9, 5][:n_layers]
    original = [torch.randn(o, n_in, generator=g, dtype=torch.float64) for o in outs]
    edited = [w + 0.5 * torch.randn(w.shape, generator=g, dtype=torch.float64) for w in original]
    return edited, original


def stacked_lstsq(edited, original, reg):
    """e' for every e at once: argmin_x ||[W'_1; ...; W'_L; sqrt(reg) I] x - [W_1 e; ...; W_L e; 0]||, i.e. the
    least-squares solution M of the stacked system A M = B (NumPy, no normal equations)."""
    n_in = edited[0].shape[1]
    a = np.concatenate([w.numpy() for w in edited] + [np.sqrt(reg) * np.eye(n_in)])
    b = np.concatenate([w.numpy() for w in original] + [np.zeros((n_in, n_in))])
    return np.linalg.lstsq(a, b, rcond=None)[0]


@pytest.mark.parametrize("reg", [1e-3, 0.1, 10.0])
def test_adversarial_map_matches_stacked_least_squares(reg):
    edited, original = layers()
    got = adversarial_embedding_map(edited, original, reg)
    np.testing.assert_allclose(got.numpy(), stacked_lstsq(edited, original, reg), rtol=1e-9, atol=1e-9)


def test_adversarial_embedding_brings_the_original_outputs_back():
    edited, original = layers()
    e = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    adv = e @ adversarial_embedding_map(edited, original, 1e-6).T

    def gap(x):
        return sum(float((x @ a.T - e @ b.T).norm() ** 2) for a, b in zip(edited, original))

    assert gap(adv) < 0.9 * gap(e)
    g = torch.Generator().manual_seed(2)
    assert all(gap(adv) < gap(adv + 0.01 * torch.randn(adv.shape, generator=g, dtype=torch.float64))
               for _ in range(20))  # a minimum: every nearby embedding does worse
    # unedited layers: the concept's own embedding is already the answer (up to the tiny penalty)
    same = adversarial_embedding_map(original, original, 1e-9)
    assert torch.allclose(same, torch.eye(6, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("args,match", [
    (([], [], 0.1), "one original weight per edited weight, got 0 and 0"),
    (([torch.zeros(3, 4)], [torch.zeros(3, 5)], 0.1), r"layer 0: edited \(3, 4\) and original \(3, 5\)"),
    (([torch.zeros(3, 4)], [torch.zeros(3, 4)], 0.0), "reg must be > 0 .*got 0.0"),
])
def test_adversarial_map_rejects_bad_input_naming_it(args, match):
    with pytest.raises(ValueError, match=match):
        adversarial_embedding_map(*args)


# ------------------------------------------------------------------------------------------------ the module
@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def kv_weights(components):
    return {k: v.clone() for k, v in components.unet.state_dict().items()
            if ("attn2.to_k." in k or "attn2.to_v." in k) and k.endswith("weight")}


def attack_residual(edited: dict, original: dict, erase_in: torch.Tensor, reg: float) -> float:
    """The best the linear attack can do: min_x sum_l ||W_l x - W0_l e||^2 + reg ||x||^2 over the erased rows."""
    a, b = list(edited.values()), list(original.values())
    adv = erase_in.double() @ adversarial_embedding_map(a, b, reg).T
    return sum(float((adv @ w.double().T - erase_in.double() @ w0.double().T).norm() ** 2) for w, w0 in zip(a, b))


def test_zero_epochs_is_uce_and_one_epoch_resists_the_linear_attack(tiny_pipeline_path):
    runs = {}
    for key, cls, kw in (("uce", UCE, {}), ("rece0", RECE, {"epochs": 0}), ("rece1", RECE, {"epochs": 1})):
        comp = load_components(str(tiny_pipeline_path))
        original = kv_weights(comp)
        module = cls(comp, "toy_stripes", erase="prompts", **kw)
        module.edit()
        runs[key] = (kv_weights(comp), original, module.rows()[0])
    assert all(torch.equal(runs["uce"][0][k], runs["rece0"][0][k]) for k in runs["uce"][0])
    assert any(not torch.equal(runs["uce"][0][k], runs["rece1"][0][k]) for k in runs["uce"][0])
    assert set(runs["rece1"][0]) == set(runs["uce"][0])  # still only attn2 to_k / to_v (test_uce checks which)
    uce_res, rece_res = (attack_residual(*runs[k], reg=1e-3) for k in ("uce", "rece1"))
    assert rece_res > 1.2 * uce_res, (uce_res, rece_res)


@pytest.mark.parametrize("kw,match", [({"epochs": -1}, r"epochs must be an integer >= 0 .*got -1"),
                                      ({"epochs": 1.5}, r"epochs must be an integer >= 0 .*got 1.5"),
                                      ({"reg": 0.0}, "reg must be > 0, got 0.0"),
                                      ({"adv_lamb": -1.0}, "adv_lamb must be > 0, got -1.0"),
                                      ({"adv_preserve_scale": -0.1}, "adv_preserve_scale must be >= 0, got -0.1"),
                                      ({"tokens": "first"}, "tokens='first'")])
def test_bad_options_raise_naming_the_value(components, kw, match):
    with pytest.raises(ValueError, match=match):
        RECE(components, "toy_stripes", **kw)


def test_rece_config_extends_uce(tmp_path):
    m = OmegaConf.to_container(compose_cfg(tmp_path, "model=sd14", "method=rece", "concept=van_gogh"),
                               resolve=True)["method"]
    assert m["_target_"] == "unlearn.methods.rece.RECE" and m["name"] == "rece"
    assert (m["epochs"], m["reg"], m["adv_lamb"], m["adv_erase_scale"], m["adv_preserve_scale"]) == \
        (1, 1e-3, 0.1, 1.0, 0.1)
    assert (m["lamb"], m["erase"], m["tokens"]) == (0.5, "words", "tail")  # the UCE round: uce.yaml's defaults
    toy = OmegaConf.to_container(compose_cfg(tmp_path, "experiment=toy_uce", "method=rece", "concept=toy_ring"),
                                 resolve=True)["method"]
    assert toy["_target_"] == "unlearn.methods.rece.RECE" and toy["erase"] == "prompts"


@pytest.mark.slow
def test_toy_rece_erases_stripes_and_keeps_neighbours(tmp_path, shared_cache):
    from toy_helpers import assert_erased_and_kept, train_and_measure

    payload = train_and_measure(tmp_path, shared_cache, "experiment=toy_uce", "method=rece", "concept=toy_stripes",
                                "eval.num_prompts=8", "eval.images_per_prompt=1")
    assert_erased_and_kept(payload, "rece")


def test_bad_option_is_caught_before_any_model_loads(tmp_path):
    from unlearn.validate import problems

    found = problems(compose_cfg(tmp_path, "method=rece", "method.epochs=-1"))
    assert [p.key for p in found] == ["method"] and "epochs must be an integer >= 0" in str(found[0])
