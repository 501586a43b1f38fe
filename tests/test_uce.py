"""UCE: the closed form against a least-squares re-derivation, the rows it edits, and the edit run through train.run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from toy_helpers import compose_train as compose_cfg

from unlearn.methods.uce import UCE, change_positions, closed_form_edit
from unlearn.models import load_components


def random_problem(n_out=5, n_in=7, n_erase=3, n_keep=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_out, n_in, generator=g, dtype=torch.float64),
            torch.randn(n_erase, n_in, generator=g, dtype=torch.float64),
            torch.randn(n_erase, n_out, generator=g, dtype=torch.float64),
            torch.randn(n_keep, n_in, generator=g, dtype=torch.float64))


def lstsq_reference(w, ci, vi, cj, lamb, se, sp):
    """argmin lam||X-W||^2 + se sum||X c_i - v_i||^2 + sp sum||X c_j - W c_j||^2, as one stacked least-squares
    problem on the rows of X^T (NumPy, no normal equations)."""
    w, ci, vi, cj = (x.numpy() for x in (w, ci, vi, cj))
    a = np.concatenate([np.sqrt(lamb) * np.eye(w.shape[1]), np.sqrt(se) * ci, np.sqrt(sp) * cj])
    b = np.concatenate([np.sqrt(lamb) * w.T, np.sqrt(se) * vi, np.sqrt(sp) * cj @ w.T])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


# ------------------------------------------------------------------------------------------------ the closed form
@pytest.mark.parametrize("lamb,se,sp", [(0.5, 1.0, 1.0), (0.1, 2.0, 0.3), (3.0, 0.5, 0.0)])
def test_closed_form_matches_stacked_least_squares(lamb, se, sp):
    w, ci, vi, cj = random_problem(n_erase=9, n_keep=6)  # more rows than inputs: a real compromise
    got = closed_form_edit(w, ci, vi, cj, lamb=lamb, erase_scale=se, preserve_scale=sp)
    np.testing.assert_allclose(got.numpy(), lstsq_reference(w, ci, vi, cj, lamb, se, sp), rtol=1e-9, atol=1e-9)


def test_small_lambda_maps_erased_inputs_to_targets_and_keeps_preserved_outputs():
    w, ci, vi, cj = random_problem(n_in=8, n_erase=3, n_keep=4)  # 3 + 4 < 8: both can hold exactly
    new = closed_form_edit(w, ci, vi, cj, lamb=1e-8)
    assert torch.allclose(ci @ new.T, vi, atol=1e-5)
    assert torch.allclose(cj @ new.T, cj @ w.T, atol=1e-5)
    assert (ci @ w.T - vi).norm() > 1.0  # the erased outputs really moved


def test_no_preserved_rows_and_float32_in_float32_out():
    w, ci, vi, _ = random_problem()
    new = closed_form_edit(w.float(), ci.float(), vi.float(), torch.zeros(0, 7), lamb=0.5)
    assert new.dtype == torch.float32 and new.shape == w.shape
    np.testing.assert_allclose(new.double().numpy(), lstsq_reference(w, ci, vi, torch.zeros(0, 7, dtype=torch.float64),
                                                                      0.5, 1.0, 1.0), atol=1e-4)


def test_large_lambda_leaves_the_weight_alone():
    w, ci, vi, cj = random_problem()
    assert torch.allclose(closed_form_edit(w, ci, vi, cj, lamb=1e9), w, atol=1e-6)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(5), torch.zeros(3, 7), torch.zeros(3, 5), torch.zeros(0, 7)), r"weight must be 2-D.*\(5,\)"),
    ((torch.zeros(5, 7), torch.zeros(3, 6), torch.zeros(3, 5), torch.zeros(0, 7)), r"erase_in .*\(3, 6\)"),
    ((torch.zeros(5, 7), torch.zeros(3, 7), torch.zeros(3, 7), torch.zeros(0, 7)), r"erase_out .*\(3, 7\)"),
    ((torch.zeros(5, 7), torch.zeros(3, 7), torch.zeros(2, 5), torch.zeros(0, 7)), r"erase_out .*\(2, 5\)"),
    ((torch.zeros(5, 7), torch.zeros(3, 7), torch.zeros(3, 5), torch.zeros(2, 4)), r"preserve_in .*\(2, 4\)"),
])
def test_closed_form_rejects_bad_shapes_naming_them(args, match):
    with pytest.raises(ValueError, match=match):
        closed_form_edit(*args)


@pytest.mark.parametrize("kw,match", [({"lamb": 0.0}, r"lamb must be > 0 .*got 0.0"),
                                      ({"erase_scale": -1.0}, "erase_scale must be >= 0, got -1.0"),
                                      ({"preserve_scale": -0.5}, "preserve_scale must be >= 0, got -0.5")])
def test_closed_form_rejects_bad_scales(kw, match):
    w, ci, vi, cj = random_problem()
    with pytest.raises(ValueError, match=match):
        closed_form_edit(w, ci, vi, cj, **kw)


# ------------------------------------------------------------------------------------------------ rows and texts
@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def test_change_positions_start_at_the_last_changed_token(components):
    tok = components.tokenizer

    def pos(a, b):
        batch = tok([a, b], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        return change_positions(batch.input_ids[0], batch.attention_mask[0], batch.input_ids[1],
                                batch.attention_mask[1])

    # suffix: the last word of each text (BOS is position 0)
    assert pos("a red ring in the style of stripes", "a red ring") == (8, 3)
    # replaced mid-prompt: the replaced word itself, in both
    assert pos("a red ring in the style of night", "a red circle in the style of night") == (3, 3)
    # nothing differs: every word (the common ending stops one word short, so never BOS)
    assert pos("a red ring", "a red ring") == (1, 1)
    # one text is the other's ending: the shorter one's last word, aligned (BOS is the same in every text)
    assert pos("a ring", "ring") == (2, 1)


def test_texts_prompts_and_words(components):
    uce = UCE(components, "toy_stripes", erase="prompts")
    pairs, keep = uce.texts()
    assert pairs[1] == ("a red ring in the style of stripes", "a red ring")
    assert "" in keep and "a red ring" in keep and "a red ring in the style of checker" in keep
    assert not {t for t, _ in pairs} & set(keep)
    pairs, keep = UCE(components, "van_gogh", erase="words", preserve_empty=False).texts()
    assert pairs == [("Van Gogh", "painting")]
    assert keep[:2] == ["Picasso", "Rembrandt"] and "painting" in keep and "" not in keep
    assert UCE(components, "van_gogh", preserve="none", preserve_empty=False).texts()[1] == []


def test_last_token_gives_one_row_per_text(components):
    uce = UCE(components, "toy_ring", erase="prompts", tokens="last")
    pairs, keep = uce.texts()
    erase_in, guide_in, preserve_in = uce.rows()
    assert erase_in.shape == guide_in.shape == (len(pairs), 16)
    assert preserve_in.shape == (len(keep), 16)
    tail = UCE(components, "toy_ring", erase="prompts", tokens="tail").rows()[0]
    assert len(tail) > len(erase_in)


@pytest.mark.parametrize("kw,match", [({"erase": "everything"}, "erase='everything'"),
                                      ({"tokens": "first"}, "tokens='first'"),
                                      ({"preserve": "all"}, "preserve='all'"),
                                      ({"lamb": -1.0}, "lamb must be > 0, got -1.0"),
                                      ({"erase_scale": -2.0}, "erase_scale must be >= 0, got -2.0"),
                                      ({"num_prompts": 0}, r"num_prompts must be >= 1 or null .*got 0")])
def test_bad_options_raise_naming_the_value(components, kw, match):
    with pytest.raises(ValueError, match=match):
        UCE(components, "toy_stripes", **kw)


# ------------------------------------------------------------------------------------------------ the edit
def test_edit_changes_exactly_the_cross_attention_keys_and_values(components):
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in components.text_encoder.state_dict().items()}
    uce = UCE(components, "toy_stripes", erase="prompts")
    uce.edit()
    after = components.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    kv = {k for k in before if ("attn2.to_k." in k or "attn2.to_v." in k) and k.endswith("weight")}
    assert kv and changed == kv
    assert all(torch.equal(v, components.text_encoder.state_dict()[k]) for k, v in text_before.items())
    assert set(uce.trainable_names) == kv


@pytest.mark.parametrize("model", ["toy", "sd14"])
def test_uce_config_composes(tmp_path, model):
    cfg = OmegaConf.to_container(compose_cfg(tmp_path, f"model={model}", "method=uce", "concept=snoopy"),
                                 resolve=True)
    m = cfg["method"]
    assert m["_target_"] == "unlearn.methods.uce.UCE" and m["name"] == "uce"
    assert m["concept"]["name"] == "snoopy" and m["concept"]["target"] == "Snoopy"
    assert (m["lamb"], m["erase_scale"], m["preserve_scale"], m["erase"], m["tokens"]) == \
        (0.5, 1.0, 1.0, "words", "tail")
    toy = OmegaConf.to_container(compose_cfg(tmp_path, "experiment=toy_uce", "concept=toy_ring"), resolve=True)
    assert toy["method"]["erase"] == "prompts" and toy["method"]["concept"]["name"] == "toy_ring"


def test_uce_runs_through_train_and_saves_a_loadable_pipeline(tmp_path, tiny_pipeline_path):
    from diffusers import StableDiffusionPipeline

    from unlearn.train import run

    cfg = compose_cfg(tmp_path, "model=sd14", f"model.path={tiny_pipeline_path}", "method=uce", "concept=van_gogh",
                      f"paths.cache={tmp_path}/cache", "evaluate=false", "logger=none", "trainer=cpu",
                      "trainer.enable_progress_bar=false")
    res = run(cfg)
    edited = StableDiffusionPipeline.from_pretrained(res["pipeline"]).unet.state_dict()
    original = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path).unet.state_dict()
    changed = {k for k in original if not torch.equal(edited[k], original[k])}
    assert changed and all("attn2.to_k" in k or "attn2.to_v" in k for k in changed)
    assert not (tmp_path / "cache" / "prepared").exists()  # a closed-form method prepares no data
    texts = json.loads((tmp_path / "run" / "edit_texts.json").read_text())  # enough to recompute the edit
    assert (texts["erase"], texts["guide"]) == (["Van Gogh"], ["painting"])
    assert texts["preserve"][:3] == ["", "Picasso", "Rembrandt"]
    assert texts["rule"] == {"erase": "words", "start": "change", "tokens": "tail", "preserve_tokens": "start",
                             "lamb": 0.5, "erase_scale": 1.0, "preserve_scale": 1.0}


@pytest.mark.slow
def test_toy_uce_erases_stripes_and_keeps_neighbours(tmp_path, shared_cache):
    from toy_helpers import assert_erased_and_kept, train_and_measure

    payload = train_and_measure(tmp_path, shared_cache, "experiment=toy_uce", "concept=toy_stripes",
                                "eval.num_prompts=8", "eval.images_per_prompt=1")
    assert payload["results"]["uce"]["toy_stripes"]["ca"] < payload["results"]["original"]["toy_stripes"]["ca"]
    assert_erased_and_kept(payload, "uce")


# ------------------------------------------------------------------------------------------------ released rules
def test_prompts_mode_preserves_the_anchor_prompts_no_neighbour_shares(components):
    # snoopy's anchors are dog prompts; none of its neighbours (mickey, pikachu, ...) has them.
    uce = UCE(components, "snoopy", erase="prompts", num_prompts=4)
    pairs, keep = uce.texts()
    anchors = [a for _, a in pairs]
    assert anchors and all(a in keep for a in anchors)
    neighbour_anchors = {a for n in uce.concept.neighbour_concepts() for a, _ in n.pairs(4)}
    assert not set(anchors) & neighbour_anchors  # so only the concept's own pairs can keep them


def encode_rows(components, texts):
    """(attention masks, last hidden states) of `texts` padded to the tokenizer's length, as the UNet sees them."""
    tok = components.tokenizer
    batch = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return batch.attention_mask, components.text_encoder(batch.input_ids)[0].double()


def uce_sd_erase_rows(components, pairs, keep):
    """uce_sd_erase.py: one row per text, at `attention_mask.sum() - 2`."""
    def last(texts):
        mask, emb = encode_rows(components, texts)
        return torch.stack([emb[k, int(mask[k].sum()) - 2] for k in range(len(texts))])
    return last([t for t, _ in pairs]), last([a for _, a in pairs]), last(keep)


def train_erase_rows(components, pairs, keep):
    """train_erase.py: each erase text from its last word, both cut to the shorter tail; every row of a kept text."""
    erase, guide = [], []
    for old, new in pairs:
        mask, emb = encode_rows(components, [old, new])
        fo, fn = int(mask[0].sum()) - 2, int(mask[1].sum()) - 2
        far, length = max(fo, fn), emb.shape[1]
        erase.append(emb[0, fo:length - max(0, far - fo)])
        guide.append(emb[1, fn:length - max(0, far - fn)])
    return torch.cat(erase), torch.cat(guide), encode_rows(components, keep)[1].reshape(-1, erase[0].shape[1])


@pytest.mark.parametrize("preset,rows", [("uce_official", uce_sd_erase_rows), ("uce_train_erase", train_erase_rows)])
def test_presets_edit_the_weights_the_released_scripts_rules_give(tmp_path, components, preset, rows):
    """The preset's options, the rows chosen here by the script's own rule, the closed form by least squares."""
    m = OmegaConf.to_container(compose_cfg(tmp_path, f"method={preset}", "concept=toy_ring"), resolve=True)["method"]
    options = {k: m[k] for k in ("start", "tokens", "preserve_tokens", "preserve_empty", "lamb", "erase_scale",
                                 "preserve_scale")}
    originals = {n: mod.weight.detach().double().clone() for n, mod in UCE(components, "toy_ring").edited_modules()
                 .items()}
    uce = UCE(components, "toy_ring", erase="prompts", num_prompts=4, **options)
    pairs, keep = uce.texts()
    assert any(t.split()[-1] != t.split()[2] for t, _ in pairs)  # "ring" mid-prompt: the start rule matters here
    ci, cg, cj = rows(components, pairs, keep)
    uce.edit()
    for name, module in uce.edited_modules().items():
        w = originals[name]
        want = lstsq_reference(w, ci, cg @ w.T, cj, options["lamb"], options["erase_scale"],
                               options["preserve_scale"])
        np.testing.assert_allclose(module.weight.detach().double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_start_rule_matters_only_where_a_word_is_replaced_mid_prompt(components):
    def erase_rows(concept, start):
        return UCE(components, concept, erase="prompts", num_prompts=4, start=start).rows()[0]
    assert torch.equal(erase_rows("toy_stripes", "change"), erase_rows("toy_stripes", "last_word"))  # suffix
    assert erase_rows("toy_ring", "change").shape != erase_rows("toy_ring", "last_word").shape  # "ring" replaced


@pytest.mark.parametrize("kw,match", [({"start": "first"}, "start='first'"),
                                      ({"preserve_tokens": "some"}, "preserve_tokens='some'")])
def test_bad_row_rules_raise_naming_the_value(components, kw, match):
    with pytest.raises(ValueError, match=match):
        UCE(components, "toy_stripes", **kw)


@pytest.mark.parametrize("override,line", [("method.start=first", "method.start=first: one of change | last_word"),
                                           ("method.preserve_tokens=some", "method.preserve_tokens=some: one of"),
                                           ("method.tokens=all", "method.tokens=all: one of tail | last")])
def test_row_rules_are_checked_with_the_config(tmp_path, override, line):
    from unlearn.validate import ConfigError, validate

    for preset in ("uce", "uce_official", "rece"):
        with pytest.raises(ConfigError, match=line.replace("|", r"\|")):
            validate(compose_cfg(tmp_path, "experiment=toy_uce", f"method={preset}", override))
