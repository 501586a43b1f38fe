"""Concept Ablation: the loss against a NumPy re-derivation, the module's loss and gradients on a tiny random SD,
its trainable subset, option checks, config wiring, and one cheap end-to-end toy run."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from toy_helpers import compose_train as make_cfg

from unlearn.losses import concept_ablation_loss
from unlearn.methods.conabl import ConceptAblation
from unlearn.models import encode_prompts, load_components

PROMPTS = ["a red circle", "a red circle in the style of stripes"]  # anchor c, target c*


# ------------------------------------------------------------------------------------------------ the pure loss
def np_mse(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.mean((a - b) ** 2))


def three_tensors(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("variant", ["model", "noise"])
@pytest.mark.parametrize("prior_weight", [0.0, 0.7])
def test_loss_matches_numpy(variant, prior_weight):
    e_tgt, e_anc, noise = three_tensors()
    out = concept_ablation_loss(e_tgt, e_anc, noise, variant=variant, prior_weight=prior_weight)
    regress_to = e_anc.numpy() if variant == "model" else noise.numpy()
    ablation = np_mse(e_tgt.numpy(), regress_to)
    prior = np_mse(e_anc.numpy(), noise.numpy()) if prior_weight else 0.0
    assert out.ablation.item() == pytest.approx(ablation, rel=1e-6)
    assert out.prior.item() == pytest.approx(prior, rel=1e-6, abs=0)
    assert out.total.item() == pytest.approx(ablation + prior_weight * prior, rel=1e-6)


def test_noise_variant_needs_no_anchor_prediction():
    e_tgt, _, noise = three_tensors(1)
    out = concept_ablation_loss(e_tgt, None, noise, variant="noise")
    assert out.total.item() == pytest.approx(np_mse(e_tgt.numpy(), noise.numpy()), rel=1e-6)


@pytest.mark.parametrize("prior_weight", [0.0, 0.5])
def test_model_target_is_stop_gradient(prior_weight):
    """The anchor prediction is a constant target; its only gradient is the prior term's, 2 w (e_c - eps) / N."""
    e_tgt, e_anc, noise = three_tensors(2)
    e_tgt.requires_grad_(), e_anc.requires_grad_()
    concept_ablation_loss(e_tgt, e_anc, noise, variant="model", prior_weight=prior_weight).total.backward()
    n = e_tgt.numel()
    expected_tgt = 2 * (e_tgt.detach().numpy() - e_anc.detach().numpy()) / n
    np.testing.assert_allclose(e_tgt.grad.numpy(), expected_tgt, rtol=1e-10, atol=1e-14)
    if prior_weight == 0:
        assert e_anc.grad is None
    else:
        expected_anc = 2 * prior_weight * (e_anc.detach().numpy() - noise.detach().numpy()) / n
        np.testing.assert_allclose(e_anc.grad.numpy(), expected_anc, rtol=1e-10, atol=1e-14)


def test_loss_bad_arguments_are_named():
    e_tgt, e_anc, noise = three_tensors()
    with pytest.raises(ValueError, match="'kl'"):
        concept_ablation_loss(e_tgt, e_anc, noise, variant="kl")
    with pytest.raises(ValueError, match="-0.5"):
        concept_ablation_loss(e_tgt, e_anc, noise, prior_weight=-0.5)
    with pytest.raises(ValueError, match="eps_anchor_cond"):
        concept_ablation_loss(e_tgt, None, noise, variant="model")
    with pytest.raises(ValueError, match=r"\(3, 4, 5, 5\) and \(4, 5, 5\)"):
        concept_ablation_loss(e_tgt, e_anc[0], noise, variant="model")


# ------------------------------------------------------------------------------------------------ the module
@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def make_batch(components, n=4):
    g = torch.Generator().manual_seed(3)
    emb = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS)
    c = components.unet.config
    return {"latents": torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g),
            "anchor_emb": emb[[0] * n], "target_emb": emb[[1] * n]}


def independent_loss(unet, alphas_cumprod, batch, seed, variant, prior_weight):
    """The same draw (t, then eps, as UnlearnModule.noise makes them), noised and scored by hand with NumPy."""
    torch.manual_seed(seed)
    x0 = batch["latents"]
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],))
    noise = torch.randn_like(x0)
    a = alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()
    with torch.no_grad():
        e_tgt = unet(x_t, t, encoder_hidden_states=batch["target_emb"]).sample.numpy()
        e_anc = unet(x_t, t, encoder_hidden_states=batch["anchor_emb"]).sample.numpy()
    ablation = np_mse(e_tgt, e_anc if variant == "model" else noise.numpy())
    return ablation + prior_weight * (np_mse(e_anc, noise.numpy()) if prior_weight else 0.0)


@pytest.mark.parametrize(("variant", "prior_weight"), [("model", 0.0), ("noise", 0.0), ("model", 1.0), ("noise", 0.3)])
def test_module_loss_equals_independent_value(components, variant, prior_weight):
    reference = copy.deepcopy(components.unet).eval()  # untouched by the module
    alphas = components.scheduler.alphas_cumprod.clone()
    module = ConceptAblation(components, variant=variant, prior_weight=prior_weight)
    batch = make_batch(components)
    torch.manual_seed(11)
    got = module.loss(batch).total.item()
    want = independent_loss(reference, alphas, batch, 11, variant, prior_weight)
    assert got == pytest.approx(want, rel=1e-4)


def test_model_variant_sends_no_gradient_through_the_anchor_branch(components):
    """The UNet's gradient equals that of ||eps(x_t, c*) - K||^2 with K the anchor prediction taken as a constant."""
    module = ConceptAblation(components, variant="model")
    batch = make_batch(components)
    x_t, _, t = module.noise(batch["latents"])
    e_tgt, e_anc = module.predictions(batch, x_t, t)
    assert not e_anc.requires_grad
    params = module.trainable_parameters()
    grads = torch.autograd.grad(concept_ablation_loss(e_tgt, e_anc, None, variant="model").total, params)
    with torch.no_grad():
        constant = module.eps(module.unet, x_t, t, batch["anchor_emb"]).clone()
    by_hand = ((module.eps(module.unet, x_t, t, batch["target_emb"]) - constant) ** 2).mean()
    for g, h in zip(grads, torch.autograd.grad(by_hand, params)):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in grads)


def test_default_trains_only_cross_attention_keys_and_values(components):
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    torch.manual_seed(0)
    module = ConceptAblation(components, steps=3, lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    batch = make_batch(components)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 3, batch_size=None))
    assert int(module.iteration) == 3
    after = components.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    kv = {k for k in before if "attn2.to_k" in k or "attn2.to_v" in k}
    assert kv and changed == kv, sorted(changed ^ kv)


BAD_OPTIONS = [({"variant": "kl"}, "'kl'"), ({"prior_weight": -1.0}, "-1.0"), ({"trainable": "lora"}, "lora"),
               ({"max_grad_norm": 0.0}, "max_grad_norm=0.0"), ({"lr": 0.0}, "lr=0.0"), ({"steps": 0}, "steps=0")]


@pytest.mark.parametrize(("kw", "word"), BAD_OPTIONS)
def test_bad_options_are_named(components, kw, word):
    with pytest.raises(ValueError, match=word):
        ConceptAblation(components, **kw)


# ------------------------------------------------------------------------------------------------ config wiring


def test_sd14_conabl_composes_with_the_released_defaults(tmp_path):
    m = OmegaConf.to_container(make_cfg(tmp_path, "model=sd14", "method=conabl", "concept=van_gogh"),
                               resolve=True)["method"]
    assert m["_target_"] == "unlearn.methods.conabl.ConceptAblation"
    assert (m["variant"], m["trainable"], m["prior_weight"], m["steps"]) == ("model", "cross_attn_kv", 0.0, 100)
    assert m["lr"] == pytest.approx(1.6e-5)
    toy = OmegaConf.to_container(make_cfg(tmp_path, "experiment=toy_conabl"), resolve=True)
    assert toy["method"]["name"] == "conabl" and toy["method"]["steps"] <= 300


def test_conabl_runs_through_train_on_the_sd14_path(tmp_path, tiny_pipeline_path):
    from diffusers import StableDiffusionPipeline

    from unlearn.train import run

    cfg = make_cfg(tmp_path, "model=sd14", f"model.path={tiny_pipeline_path}", "method=conabl", "concept=van_gogh",
                   "method.steps=2", "method.lr=1e-3", "data.num_prompts=2", "data.images_per_prompt=2",
                   "data.batch_size=2", "data.gen_batch_size=2", "model.sample_steps=2", "evaluate=false",
                   "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false")
    res = run(cfg)
    out = StableDiffusionPipeline.from_pretrained(res["pipeline"]).unet.state_dict()
    original = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path).unet.state_dict()
    changed = {k for k in original if not torch.equal(out[k], original[k])}
    assert changed and all("attn2.to_k" in k or "attn2.to_v" in k for k in changed)


# ------------------------------------------------------------------------------------------------ end to end (toy)
@pytest.mark.slow
def test_toy_conabl_lowers_the_target_accuracy(tmp_path, shared_cache):
    from toy_helpers import train_and_measure

    from unlearn.models.loading import TOY_PIPELINE

    if not (TOY_PIPELINE / "unet").exists():
        pytest.skip("toy weights not built")
    # Cheap: 32 anchor images, 100 iterations at 3x the recipe's lr (the recipe's 300 at 1e-4 take minutes), 8 prompts.
    payload = train_and_measure(tmp_path, shared_cache, "experiment=toy_conabl", "concept=toy_stripes",
                                "data.num_prompts=8", "method.steps=100", "method.lr=3e-4",
                                "eval.num_prompts=8", "eval.neighbours=false")
    before, after = payload["results"]["original"]["toy_stripes"], payload["results"]["conabl"]["toy_stripes"]
    assert before["ca"] >= 90 and after["ca"] <= before["ca"] - 40, (before, after)


def test_detach_start_token_removes_exactly_the_start_tokens_share_of_the_gradient(tiny_pipeline_path):
    """With the switch, each to_k / to_v gradient is the plain one minus token 0's outer product g_0^T c_0 (g_0 the
    loss's gradient at that token's key or value, c_0 its text row), summed over the batch; the loss is the same."""
    plain = ConceptAblation(load_components(str(tiny_pipeline_path)))
    detached = ConceptAblation(load_components(str(tiny_pipeline_path)), detach_start_token=True)
    batch = make_batch(plain.components)
    outputs = {}

    def keep_output(name):
        def hook(module, inputs, out):
            if out.requires_grad:  # the target branch (the anchor's runs under no_grad)
                out.retain_grad()
                outputs[name] = (inputs[0], out)
        return hook

    for name, m in plain.unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            m.register_forward_hook(keep_output(name))
    losses = {}
    for label, module in (("plain", plain), ("detached", detached)):
        torch.manual_seed(5)
        losses[label] = module.loss(batch).total
        losses[label].backward()
    assert losses["plain"].item() == pytest.approx(losses["detached"].item(), rel=1e-6)
    weights = dict(detached.unet.named_modules())
    for name, (c, out) in outputs.items():
        g0, c0 = out.grad[:, 0], c[:, 0]  # (batch, out), (batch, in)
        by_hand = dict(plain.unet.named_modules())[name].weight.grad - g0.T @ c0
        torch.testing.assert_close(weights[name].weight.grad, by_hand, rtol=1e-4, atol=1e-7)
        assert g0.abs().sum() > 0  # the start token did carry gradient

def test_conabl_official_preset_detaches_the_start_token(tmp_path):
    m = OmegaConf.to_container(make_cfg(tmp_path, "method=conabl_official", "concept=toy_ring"), resolve=True)["method"]
    assert m["detach_start_token"] is True and m["name"] == "conabl_official"
    assert m["steps"] == 100 and m["trainable"] == "cross_attn_kv"  # everything else is conabl's
