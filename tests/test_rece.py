"""RECE: the adversarial embedding's closed form against a stacked least-squares solve, what the rounds change,
rece_official against the released object script's rules computed here,
the config, and the edit on the toy world."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from toy_helpers import compose_train as compose_cfg

from unlearn.methods.rece import RECE, adversarial_embedding_map, tensor_target
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


# ------------------------------------------------------------------------------------------------ released rules
def lstsq_edit(w, ci, vi, cj, lamb, se, sp):
    """UCE's objective lam||X-W||^2 + se sum||X c_i - v_i||^2 + sp sum||X c_j - W c_j||^2 as one stacked
    least-squares problem on the rows of X^T (NumPy)."""
    w, ci, vi, cj = (x.numpy() for x in (w, ci, vi, cj))
    a = np.concatenate([np.sqrt(lamb) * np.eye(w.shape[1]), np.sqrt(se) * ci, np.sqrt(sp) * cj])
    b = np.concatenate([np.sqrt(lamb) * w.T, np.sqrt(se) * vi, np.sqrt(sp) * cj @ w.T])
    return torch.from_numpy(np.linalg.lstsq(a, b, rcond=None)[0].T)


def encode(components, text):
    tok = components.tokenizer
    batch = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return int(batch.attention_mask.sum()), components.text_encoder(batch.input_ids)[0][0].double()


def test_rece_official_edits_the_weights_the_released_object_script_gives(tmp_path, components):
    """The UCE checkpoint by train_erase.py's rule, then train_object.py's round, each solved here by least squares."""
    m = OmegaConf.to_container(compose_cfg(tmp_path, "method=rece_official", "concept=toy_ring"),
                               resolve=True)["method"]
    m.pop("_target_")
    rece = RECE(components, **m)
    names = list(rece.edited_modules())
    w0 = {n: mod.weight.detach().double().clone() for n, mod in rece.edited_modules().items()}
    # UCE round: "ring" -> " " from each text's last word (attention_mask.sum() - 2), cut to the shorter tail;
    # every row of "" kept; lamb 0.5, s_e 1, s_p = max(0.1, 1/len([""])) = 1.
    (n_old, old), (n_new, new), (_, empty) = (encode(components, t) for t in ("ring", " ", ""))
    fo, fn = n_old - 2, max(n_new - 2, 0)
    far, length = max(fo, fn), old.shape[0]
    ci, cg = old[fo:length - (far - fo)], new[fn:length - (far - fn)]
    w1 = {n: lstsq_edit(w, ci, cg @ w.T, empty, 0.5, 1.0, 1.0) for n, w in w0.items()}
    # The adversarial round: e' for every row of "ring" against the original weights, sent to W1 " " (every row).
    adv = old @ torch.from_numpy(stacked_lstsq([w1[n] for n in names], [w0[n] for n in names], 1e-3)).T
    want = {n: lstsq_edit(w, adv, new @ w.T, empty, 0.1, 1.0, 0.1) for n, w in w1.items()}
    rece.edit()
    for name, module in rece.edited_modules().items():
        np.testing.assert_allclose(module.weight.detach().double().numpy(), want[name].numpy(), rtol=1e-4, atol=1e-5)
    texts = rece.records()["edit_texts.json"]
    assert (texts["erase"], texts["guide"], texts["preserve"]) == (["ring"], [" "], [""])
    assert (texts["rule"]["adv_rows"], texts["rule"]["technique"]) == ("all", "replace")


def test_tensor_target_removes_the_erased_direction_per_text():
    g = torch.Generator().manual_seed(3)
    erase_out, guide_out = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    got = tensor_target(erase_out, guide_out, group=3)
    for rows in (slice(0, 3), slice(3, 6)):  # one erased text = 3 rows, projected as one flattened vector
        u = erase_out[rows].flatten() / erase_out[rows].flatten().norm()
        v = guide_out[rows].flatten()
        np.testing.assert_allclose(got[rows].flatten().numpy(), (v - (v @ u) * u).numpy(), atol=1e-12)
    assert abs(float((got[:3] * erase_out[:3]).sum())) < 1e-10  # orthogonal to what it erases


def test_rece_defaults_keep_ours_and_tensor_changes_the_edit(tiny_pipeline_path):
    edits = {}
    for technique in ("replace", "tensor"):
        comp = load_components(str(tiny_pipeline_path))
        RECE(comp, "toy_stripes", erase="prompts", technique=technique).edit()
        edits[technique] = kv_weights(comp)
    assert any(not torch.allclose(edits["replace"][k], edits["tensor"][k]) for k in edits["replace"])


@pytest.mark.parametrize("override,line", [
    ("method.adv_rows=some", "method.adv_rows=some: one of uce | all"),
    ("method.technique=project", "method.technique=project: one of replace | tensor"),
    ("method.guide=[1]", r"method.guide=\[1\]: a text, or null"),
    ("method.preserve_texts=plain", "method.preserve_texts=plain: a list of texts, or null")])
def test_new_switches_are_checked_with_the_config_in_one_line(tmp_path, override, line):
    from unlearn.validate import ConfigError, validate

    for preset in ("rece", "rece_official"):
        with pytest.raises(ConfigError, match=line.replace("|", r"\|")) as err:
            validate(compose_cfg(tmp_path, "experiment=toy_uce", f"method={preset}", override))
        assert len(str(err.value).splitlines()) == 1, str(err.value)


def test_rece_official_config_is_the_released_object_script(tmp_path):
    m = OmegaConf.to_container(compose_cfg(tmp_path, "method=rece_official", "concept=toy_stripes"),
                               resolve=True)["method"]
    assert (m["erase"], m["guide"], m["preserve_texts"], m["adv_rows"], m["technique"]) == \
        ("words", " ", [""], "all", "replace")
    assert (m["lamb"], m["preserve_scale"], m["adv_lamb"], m["adv_preserve_scale"], m["reg"], m["epochs"]) == \
        (0.5, 1.0, 0.1, 0.1, 1e-3, 1)
