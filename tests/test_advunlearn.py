"""AdvUnlearn: the adversarial token's insertion, the inner attack, the outer loss by hand, which text-encoder layers
train, checkpoints and export of the text encoder, an evaluation with the run's own text encoder, the configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from toy_helpers import compose_train

from unlearn.methods.advunlearn import (
    AdvUnlearn,
    encode_embeds,
    insert_after_start,
    insert_ids_after_start,
    select_text_trainable,
)
from unlearn.models import load_components
from unlearn.models.loading import TOY_PIPELINE

SHAPE = (4, 8, 8)  # the tiny pipeline's latent


@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def retain_file(tmp_path: Path, *prompts: str) -> str:
    path = tmp_path / f"retain{len(list(tmp_path.glob('retain*.txt')))}.txt"  # a file per list
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def make(components, tmp_path, **kw) -> AdvUnlearn:
    kw = {"concept_target": "ring", "retain_prompts": retain_file(tmp_path, "a red square", "a blue cross"),
          "retain_batch": 1, "sample_steps": 2, "warmup_steps": 0, "attack_steps": 3, **kw}
    return AdvUnlearn(components, **kw)


@torch.no_grad()
def perturb(module, scale=0.3, seed=5):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------ insertion
def test_insertion_puts_the_tokens_after_the_start_token_and_keeps_the_length():
    b, length, d, k = 2, 7, 3, 2
    words = torch.arange(b * length * d, dtype=torch.float).view(b, length, d)
    adv = -torch.arange(1, k * d + 1, dtype=torch.float).view(k, d)
    out = insert_after_start(words, adv)
    assert out.shape == (b, length, d)
    for i in range(b):  # position by position
        expected = [words[i, 0], *adv, *[words[i, j] for j in range(1, length - k)]]
        torch.testing.assert_close(out[i], torch.stack(expected))
    ids = torch.tensor([[49406, 5, 6, 49407, 49407, 49407, 49407]])
    assert insert_ids_after_start(ids, 2, 0).tolist() == [[49406, 0, 0, 5, 6, 49407, 49407]]


def test_encoding_from_embeddings_is_the_text_encoders_own(components):
    te, tok = components.text_encoder, components.tokenizer
    ids = tok(["a red ring"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    word = te.get_input_embeddings()(ids)
    torch.testing.assert_close(encode_embeds(te, ids, word), te(ids)[0])
    # a vocabulary row as the adversarial embedding = the prompt with that token after the start token
    square = tok("square", add_special_tokens=False).input_ids
    adv = te.get_input_embeddings().weight[square]
    with_token = tok.pad_token_id * torch.ones_like(ids)
    plain = tok("a red ring").input_ids
    with_token[0, : len(plain) + 1] = torch.tensor([plain[0], square[0], *plain[1:]])
    got = encode_embeds(te, insert_ids_after_start(ids, 1, tok.pad_token_id), insert_after_start(word, adv))
    torch.testing.assert_close(got, te(with_token)[0])


# ------------------------------------------------------------------------------------------------ layers
def test_layer_selection_takes_whole_indices_and_freezes_embeddings():
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=12,
                                      num_attention_heads=2, max_position_embeddings=6))
    names = select_text_trainable(te, layers=[1], final_layer_norm=False)
    assert names and all(n.startswith("encoder.layers.1.") for n in names)  # not 10 or 11
    every = select_text_trainable(te)
    layers = {n.split(".")[2] for n in every if n.startswith("encoder.layers.")}
    assert layers == {str(i) for i in range(12)} and any("final_layer_norm" in n for n in every)
    assert not any("embeddings" in n for n in every)
    assert not any(p.requires_grad for n, p in te.named_parameters() if "embeddings" in n)
    with pytest.raises(ValueError, match="layers 0..11"):
        select_text_trainable(te, layers=[12])


@pytest.mark.skipif(not (TOY_PIPELINE / "unet").exists(), reason="toy weights not built")
def test_one_step_changes_only_the_chosen_text_encoder_layers(tmp_path):
    """The toy model (3 encoder layers): layer 1 alone trains; the UNet, the embeddings, the other layers and the
    frozen original encoder keep every byte."""
    comps = load_components("toy")
    module = make(comps, tmp_path, layers=[1], final_layer_norm=False, attack_steps=2)
    te0 = {k: v.clone() for k, v in module.text_encoder.state_dict().items()}
    unet0 = {k: v.clone() for k, v in module.unet.state_dict().items()}
    opt = module.configure_optimizers()
    module.advance = lambda: None  # no trainer here
    loss = module.training_step({"latents": torch.zeros(1, *SHAPE)}, 0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = {k for k, v in module.text_encoder.state_dict().items() if not torch.equal(v, te0[k])}
    assert changed and all(k.startswith("encoder.layers.1.") for k in changed), changed
    assert all(torch.equal(v, unet0[k]) for k, v in module.unet.state_dict().items())
    assert all(torch.equal(v, te0[k]) for k, v in module.original_text_encoder.state_dict().items())


# ------------------------------------------------------------------------------------------------ the attack
def fixed_draws(module, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    draws = [(torch.randn(1, *SHAPE, generator=g), torch.randint(100, 900, (1,), generator=g)) for _ in range(n)]
    it = iter(draws * 100)

    def sample(cond, n_, shape, k=None):
        x_t, t = next(it)
        return x_t.expand(n_, -1, -1, -1), t.expand(n_), 0
    return draws, sample


def mean_objective(module, adv, draws):
    ids, cond = module.concept_ids[:1], module.concept_emb[:1]
    with torch.no_grad():
        return sum(module.attack_objective(adv, ids, x, t, module.eps_of(x, t, cond)).item() for x, t in draws)


def test_the_attack_lowers_its_objective_and_does_nothing_with_no_steps(components, tmp_path, monkeypatch):
    module = make(components, tmp_path, attack_steps=20, attack_lr=5e-2)
    perturb(module.text_encoder)  # an "erased" encoder, so the original's prediction is not already matched
    draws, sample = fixed_draws(module)
    monkeypatch.setattr(module, "sample_latents", sample)
    torch.manual_seed(0)
    init = module.random_tokens()
    te0 = {k: v.clone() for k, v in module.text_encoder.state_dict().items()}
    adv, _ = module.attack(0, init, SHAPE)
    assert mean_objective(module, adv, draws) < 0.9 * mean_objective(module, init, draws)
    assert all(p.grad is None for p in module.text_encoder.parameters())  # the encoder gets no gradient
    assert all(torch.equal(v, te0[k]) for k, v in module.text_encoder.state_dict().items())
    module.hparams.attack_steps = 0
    same, loss = module.attack(0, init, SHAPE)
    assert torch.equal(same, init) and loss is None


def test_no_attack_before_the_warmup_nor_with_zero_steps(components, tmp_path, monkeypatch):
    for kw in ({"warmup_steps": 5}, {"attack_steps": 0}):
        module = make(components, tmp_path, **kw)
        module.advance = lambda: None
        monkeypatch.setattr(module, "attack", lambda *a: pytest.fail("attacked"))
        module.training_step({"latents": torch.zeros(1, *SHAPE)}, 0)
    module = make(components, tmp_path, warmup_steps=0)
    module.advance = lambda: None
    calls = []
    monkeypatch.setattr(module, "attack", lambda i, init, s: calls.append(1) or (init, torch.zeros(())))
    module.training_step({"latents": torch.zeros(1, *SHAPE)}, 0)
    assert calls == [1]


# ------------------------------------------------------------------------------------------------ the outer loss
def test_outer_loss_by_hand(components, tiny_pipeline_path, tmp_path, monkeypatch):
    """ESD's target from the frozen UNet with the *original* encoder on the adversarial prompt's prediction with
    the *new* encoder, plus 0.3 x the retain MSE (new against original encoder), recomputed outside the module:
    the adversarial token as a vocabulary row, so its prompt is a plain token sequence."""
    tok = components.tokenizer
    module = make(components, tmp_path, retain_prompts=retain_file(tmp_path, "a blue cross"))
    perturb(module.text_encoder)
    module.advance = lambda: None
    square = tok("square", add_special_tokens=False).input_ids[0]
    adv = module.text_encoder.get_input_embeddings().weight[[square]].detach()
    monkeypatch.setattr(module, "attack", lambda i, init, s: (adv, torch.zeros(())))
    g = torch.Generator().manual_seed(3)
    x, xr = torch.randn(1, *SHAPE, generator=g), torch.randn(1, *SHAPE, generator=g)
    t = torch.tensor([417])
    queue = iter([(x, t, 0), (xr, torch.tensor([9]), 0)])
    monkeypatch.setattr(module, "sample_latents", lambda cond, n, shape, k=None: next(queue))
    loss = module.training_step({"latents": torch.zeros(1, *SHAPE)}, 0).item()

    fresh = load_components(str(tiny_pipeline_path))  # the original, read again from disk
    unet, te_orig, te_new = fresh.unet, fresh.text_encoder, module.text_encoder

    def ids(text, extra=()):
        plain = tok(text).input_ids
        row = [plain[0], *extra, *plain[1:]]
        return torch.tensor([row + [tok.pad_token_id] * (tok.model_max_length - len(row))])

    with torch.no_grad():
        def e(x_, t_, te, i):
            return unet(x_, t_, encoder_hidden_states=te(i)[0]).sample.double().numpy()
        e_theta = e(x, t, te_new, ids("ring", [square]))
        e_c, e_0 = e(x, t, te_orig, ids("ring")), e(x, t, te_orig, ids(""))
        erase = np.mean((e_theta - (e_0 - (e_c - e_0))) ** 2)
        retain = np.mean((e(xr, t, te_new, ids("a blue cross")) - e(xr, t, te_orig, ids("a blue cross"))) ** 2)
    assert loss == pytest.approx(erase + 0.3 * retain, rel=1e-5)
    assert retain > 0  # the perturbed encoder differs from the original


# ------------------------------------------------------------------------------------------------ outputs
def test_checkpoint_keeps_the_trained_text_encoder_tensors_and_export_saves_them(components, tmp_path):
    from transformers import CLIPTextModel

    module = make(components, tmp_path)
    perturb(module.text_encoder)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    kept = set(ckpt["state_dict"])
    assert {k for k in kept if k.startswith("text_encoder.")} == \
        {f"text_encoder.{n}" for n in module.text_trainable_names}
    assert not any(k.startswith(("unet.", "original_text_encoder.")) for k in kept) and "last_adv" in kept
    again = make(load_components(components.source), tmp_path)
    again.load_state_dict(ckpt["state_dict"], strict=False)
    for n in module.text_trainable_names:
        torch.testing.assert_close(again.text_encoder.state_dict()[n], module.text_encoder.state_dict()[n])
    folder = module.export(tmp_path / "pipeline")
    saved = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    original = CLIPTextModel.from_pretrained(Path(components.source) / "text_encoder").state_dict()
    assert all(torch.equal(saved[n], module.text_encoder.state_dict()[n].cpu()) for n in saved)
    assert any(not torch.equal(saved[n], original[n]) for n in module.text_trainable_names)


def test_an_evaluation_of_the_pipeline_folder_uses_its_own_text_encoder(components, tiny_pipeline_path, tmp_path):
    from unlearn.export.components import components_of
    from unlearn.models.sampling import generate

    module = make(components, tmp_path)
    perturb(module.text_encoder)
    folder = module.export(tmp_path / "pipeline")
    base = load_components(str(tiny_pipeline_path))
    model = components_of(folder, base)
    assert all(torch.equal(v, module.text_encoder.state_dict()[k]) for k, v in model.text_encoder.state_dict().items())
    prompts, seeds = ["a red ring"], [0]
    own = generate(model, prompts, seeds, unet=model.unet, steps=2)
    torch.testing.assert_close(own, generate(module.components, prompts, seeds, steps=2))
    assert not torch.equal(own, generate(base, prompts, seeds, unet=model.unet, steps=2))


# ------------------------------------------------------------------------------------------------ configs
def test_sd14_composes_with_the_released_defaults_and_bad_values_are_named(tmp_path):
    from unlearn.validate import ConfigError, validate

    m = OmegaConf.to_container(compose_train(tmp_path, "model=sd14", "method=advunlearn", "concept=nudity"),
                               resolve=True)["method"]
    assert (m["steps"], m["warmup_steps"], m["attack_steps"], m["adv_tokens"], m["retain_batch"]) == \
        (1000, 200, 30, 1, 5)
    assert (m["lr"], m["attack_lr"], m["retain_weight"], m["layers"]) == (1e-5, 1e-3, 0.3, None)
    assert m["concept_target"] == "nudity" and m["retain_prompts"] == "retain_coco_object"
    from unlearn.data.prompts import load_prompt_set

    assert len(load_prompt_set("retain_coco_object", n=None)) == 243
    for override, key in (("export=delta", "export"), ("method.layers=[1,1]", "method.layers"),
                          ("method.attack_init=best", "method.attack_init"),
                          ("method.attack_steps=-1", "method.attack_steps")):
        with pytest.raises(ConfigError) as e:
            validate(compose_train(tmp_path, "method=advunlearn", override))
        assert [p.key for p in e.value.problems] == [key], override


@pytest.mark.skipif(not (TOY_PIPELINE / "unet").exists(), reason="toy weights not built")
def test_the_toy_recipe_drops_retain_prompts_of_the_concept(tmp_path):
    m = OmegaConf.to_container(compose_train(tmp_path, "experiment=toy_advunlearn", "concept=toy_ring"),
                               resolve=True)["method"]
    assert m["retain_prompts"] == "retain_toy" and m["concept_target"] == "ring"
    module = AdvUnlearn(load_components("toy"), concept_target="ring", retain_prompts="retain_toy")
    assert len(module.retain_prompts) == 45 and not any("ring" in p.split() for p in module.retain_prompts)


def test_advunlearn_runs_through_train_on_the_sd14_path(tmp_path, tiny_pipeline_path):
    """model=sd14 on the tiny random pipeline, the attack on from the second iteration: the pipeline folder holds
    the trained text encoder (layers and final norm changed, embeddings not) beside the untouched UNet."""
    from diffusers import StableDiffusionPipeline

    from unlearn.train import run

    res = run(compose_train(tmp_path, "model=sd14", f"model.path={tiny_pipeline_path}", "method=advunlearn",
                            "concept=van_gogh", "method.steps=3", "method.warmup_steps=1", "method.attack_steps=2",
                            "method.sample_steps=2", "method.retain_batch=2", "method.lr=1e-3", "data.num_prompts=2",
                            "data.images_per_prompt=1", "data.batch_size=1", "data.gen_batch_size=2",
                            "model.sample_steps=2", "evaluate=false", "logger=none", "trainer=cpu",
                            "trainer.enable_progress_bar=false", f"paths.cache={tmp_path}/cache"))
    out, base = StableDiffusionPipeline.from_pretrained(res["pipeline"]), StableDiffusionPipeline.from_pretrained(
        tiny_pipeline_path)
    te, te0 = out.text_encoder.state_dict(), base.text_encoder.state_dict()
    changed = {k for k in te0 if not torch.equal(te[k], te0[k])}
    assert changed and not any("embeddings" in k for k in changed) and any("final_layer_norm" in k for k in changed)
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in out.unet.state_dict().items())


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.extended  # 300 iterations with the inner attack: ~4 min on 2 cores, so `make test-extended`
@pytest.mark.skipif(not (TOY_PIPELINE / "unet").exists(), reason="toy weights not built")
def test_advunlearn_erases_the_toy_ring_by_top1_and_keeps_every_neighbour(tmp_path, shared_cache):
    """The toy recipe, with 8 anchor images (AdvUnlearn reads only their latent shape) and 12 evaluation prompts.
    Erased is read by top-1, as for SPM: the erased rings are neither rings nor the anchor's circles."""
    from toy_helpers import assert_erased_and_kept, train_and_measure

    payload = train_and_measure(tmp_path, shared_cache, "experiment=toy_advunlearn", "concept=toy_ring",
                                "data.num_prompts=8", "data.images_per_prompt=1")
    before, after = payload["results"]["original"]["toy_ring"], payload["results"]["advunlearn"]["toy_ring"]
    assert after["cs"] <= 0.8 * before["cs"], (before, after)
    assert_erased_and_kept(payload, "advunlearn", by="top1")
