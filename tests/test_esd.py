"""ESD (esd_x / esd_u): the negative-guidance target, the loss on a tiny model, which weights train, the configs."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from unlearn.losses import esd_target
from unlearn.methods.esd import ESD
from unlearn.models import encode_prompts, load_components
from unlearn.models.loading import TOY_PIPELINE
from unlearn.models.sampling import sample_until

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPTS = ["a red circle", "a blue square"]


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def fake_batches(components, n: int, batch_size: int = 2):
    """What the datamodule yields (ESD reads the latents' shape and the target embeddings)."""
    g = torch.Generator().manual_seed(1)
    emb = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS)
    out = [{"latents": torch.randn(batch_size, 4, 8, 8, generator=g), "anchor_emb": emb[[0] * batch_size],
            "target_emb": emb[[1] * batch_size], "anchor_prompt": [PROMPTS[0]] * batch_size,
            "target_prompt": [PROMPTS[1]] * batch_size} for _ in range(n)]
    return torch.utils.data.DataLoader(out, batch_size=None)  # already batched


def fit(module, tmp_path, steps: int):
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=fake_batches(module.components, n=steps + 2))
    return trainer


def fit_one_step_recording_the_draw(module, tmp_path, monkeypatch):
    """One training step; returns the trainer and the (c, x_t, t) that step drew."""
    drawn = []
    sample = module.sample_latents

    def recording(c, shape):
        x_t, t = sample(c, shape)
        drawn.append((c, x_t, t))
        return x_t, t

    monkeypatch.setattr(module, "sample_latents", recording)
    trainer = fit(module, tmp_path, steps=1)
    (draw,) = drawn
    return trainer, draw


@torch.no_grad()
def perturb_cross_attention(unet, scale: float = 0.2) -> None:
    """Move eps_theta away from eps*, so the loss check is not the special case eps_theta == eps_cond."""
    g = torch.Generator().manual_seed(5)
    for name, p in unet.named_parameters():
        if "attn2." in name:
            p.add_(scale * torch.randn(p.shape, generator=g))


def numpy_esd_loss(unet, frozen, x_t, t, c, uncond, eta) -> float:
    """The loss re-derived outside the module: three UNet calls, the target and the MSE in float64 NumPy."""
    with torch.no_grad():
        e_theta = unet(x_t, t, encoder_hidden_states=c).sample.double().numpy()
        e_c = frozen(x_t, t, encoder_hidden_states=c).sample.double().numpy()
        e_0 = frozen(x_t, t, encoder_hidden_states=uncond.expand_as(c)).sample.double().numpy()
    return float(np.mean((e_theta - (e_0 - eta * (e_c - e_0))) ** 2))


# ------------------------------------------------------------------------------------------------ the target
def test_esd_target_by_hand():
    # u = 1, c = 3: eta 1 -> 1 - (3 - 1) = -1; eta 2 -> 1 - 2 (3 - 1) = -3; eta 0 -> the unconditional answer.
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert esd_target(u, c).item() == -1.0
    assert esd_target(u, c, negative_guidance=2.0).item() == -3.0
    assert esd_target(u, c, negative_guidance=0.0).item() == 1.0


@pytest.mark.parametrize("eta", [1.0, 2.0])
def test_esd_target_matches_numpy_with_broadcasting(eta):
    rng = np.random.default_rng(0)
    uncond = rng.standard_normal((1, 4, 3, 3))  # one unconditional answer for the whole batch
    cond = rng.standard_normal((5, 4, 3, 3))
    expected = np.empty_like(cond)
    for b in range(cond.shape[0]):  # explicit loop over the batch: no reliance on broadcasting rules
        expected[b] = (1 + eta) * uncond[0] - eta * cond[b]
    out = esd_target(torch.from_numpy(uncond), torch.from_numpy(cond), negative_guidance=eta)
    assert out.shape == (5, 4, 3, 3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_diffusers_form_by_hand_and_as_the_paper_form_with_eta_minus_one():
    # u = 1, c = 3: eta 1 -> 3 - (3 - 1) = 1; eta 2 -> 3 - 2 (3 - 1) = -1, the paper's eta 1.
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert esd_target(u, c, 1.0, form="diffusers").item() == 1.0
    assert esd_target(u, c, 2.0, form="diffusers").item() == -1.0
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(1, 4, 3, 3, generator=g), torch.randn(3, 4, 3, 3, generator=g)
    for eta in (1.5, 2.0, 3.0):
        torch.testing.assert_close(esd_target(u, c, eta, form="diffusers"), esd_target(u, c, eta - 1.0))
    with pytest.raises(ValueError, match="form='eq7'"):
        esd_target(u, c, form="eq7")


# ------------------------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("eta", [1.0, 2.0])
def test_esd_loss_equals_independent_mse(components, tiny_pipeline_path, eta):
    module = ESD(components, negative_guidance=eta, sample_steps=3)
    perturb_cross_attention(module.unet)
    c = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS)
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""])
    torch.manual_seed(0)
    x_t, t = module.sample_latents(c, (2, 4, 8, 8))
    loss = module.esd_loss(x_t, t, c)
    frozen = load_components(str(tiny_pipeline_path)).unet.eval()  # eps*, read again from disk
    expected = numpy_esd_loss(module.unet, frozen, x_t, t, c, uncond, eta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.requires_grad  # the gradient flows into eps_theta only
    assert all(p.grad is None for p in module.original.parameters())


def test_training_step_logs_the_esd_loss(components, tiny_pipeline_path, tmp_path, monkeypatch):
    """The loss the training loop logs is the MSE of eps_theta against the target, on the x_t and t it drew."""
    module = ESD(components, negative_guidance=2.0, sample_steps=3, steps=1)
    perturb_cross_attention(module.unet)
    before = copy.deepcopy(module.unet)  # eps_theta as it was when the loss was computed
    trainer, (c, x_t, t) = fit_one_step_recording_the_draw(module, tmp_path, monkeypatch)
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""])
    frozen = load_components(str(tiny_pipeline_path)).unet.eval()
    expected = numpy_esd_loss(before, frozen, x_t, t, c, uncond, 2.0)
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(c, fake_batches(components, 1).dataset[0]["target_emb"])  # c = the target prompts


def test_esd_x_diffusers_step_is_esd_sd_scripts_loss(components, tiny_pipeline_path, tmp_path, monkeypatch):
    """The preset's one training step by hand, as esd_sd.py computes it: one sample of the bare concept, x_t from
    the frozen UNet, t = the DDIM step's own timestep, target eps_c - eta (eps_c - eps_0)."""
    m = OmegaConf.to_container(make_cfg(tmp_path, "method=esd_x_diffusers", "concept=toy_ring"),
                               resolve=True)["method"]
    options = {k: v for k, v in m.items() if k not in ("_target_", "steps")}
    module = ESD(components, **{**options, "sample_steps": 4}, steps=1)
    perturb_cross_attention(module.unet)
    before = copy.deepcopy(module.unet)
    trainer, (c, x_t, t) = fit_one_step_recording_the_draw(module, tmp_path, monkeypatch)
    assert module.hparams.sample_with == "original"  # what that means: test_x_t_is_partial_ddim_sampling_...
    assert c.shape[0] == x_t.shape[0] == t.shape[0] == 1  # a batch of one (the data module's is 2 here)
    torch.testing.assert_close(c, encode_prompts(components.tokenizer, components.text_encoder, ["ring"]))
    module.scheduler.set_timesteps(4)
    assert int(t) in module.scheduler.timesteps.tolist()  # a DDIM step's own timestep, not one inside its slice
    frozen = load_components(str(tiny_pipeline_path)).unet.eval()
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""])
    with torch.no_grad():
        e_theta = before(x_t, t, encoder_hidden_states=c).sample.double().numpy()
        e_c = frozen(x_t, t, encoder_hidden_states=c).sample.double().numpy()
        e_0 = frozen(x_t, t, encoder_hidden_states=uncond).sample.double().numpy()
    expected = float(np.mean((e_theta - (e_c - 2.0 * (e_c - e_0))) ** 2))
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("sample_with", ["current", "original"])
def test_x_t_is_partial_ddim_sampling_by_the_chosen_unet(components, sample_with):
    steps, scale = 4, 3.0
    module = ESD(components, sample_steps=steps, guidance_scale=scale, sample_with=sample_with)
    perturb_cross_attention(module.unet)  # current and original now sample different x_t
    sampler = module.unet if sample_with == "current" else module.original
    other = module.original if sample_with == "current" else module.unet
    c = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS)
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""])
    sched = components.scheduler
    seen_k = set()
    for seed in range(6):
        torch.manual_seed(seed)
        x_t, t = module.sample_latents(c, (2, 4, 8, 8))
        torch.manual_seed(seed)  # replay the draws: z, then k
        z = torch.randn(2, 4, 8, 8)
        k = int(torch.randint(0, steps, ()))
        seen_k.add(k)
        sched.set_timesteps(steps)
        torch.testing.assert_close(x_t, sample_until(sampler, sched, c, uncond, z, k, scale))
        if k > 0:
            assert not torch.allclose(x_t, sample_until(other, sched, c, uncond, z, k, scale))
        # t lies in the slice of [0, 1000) that DDIM step k stands for (train-esd.py's t_enc_ddpm, t_enc = N-1-k)
        lo, hi = round((1 - (k + 1) / steps) * 1000), round((1 - k / steps) * 1000)
        assert t.shape == (2,) and int(t.min()) >= lo and int(t.max()) < hi
    assert any(k > 0 for k in seen_k)


@pytest.mark.parametrize(("trainable", "in_subset"), [("cross_attn", lambda n: "attn2." in n),
                                                      ("non_cross_attn", lambda n: "attn2." not in n)],
                         ids=["esd_x", "esd_u"])
def test_only_the_chosen_subset_trains(components, tmp_path, trainable, in_subset):
    module = ESD(components, trainable=trainable, steps=2, lr=1e-2, sample_steps=2)
    original = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    fit(module, tmp_path, steps=2)
    assert int(module.iteration) == 2
    changed = {n for n, p in module.unet.named_parameters() if not torch.equal(p, original[n])}
    assert changed, "nothing trained"
    assert all(in_subset(n) for n in changed), sorted(n for n in changed if not in_subset(n))
    assert len(changed) >= 0.5 * sum(in_subset(n) for n in original)  # the subset trains, not a stray tensor
    for n, p in module.original.named_parameters():
        assert torch.equal(p, original[n]), n  # eps* stays the original model
    assert module.export_unet() is module.unet


def test_concept_text_is_the_prompt(components, tmp_path):
    module = ESD(components, prompt_source="concept_text", concept_target=["red", "circle"], sample_steps=2)
    assert module.concept_prompts == ["red, circle"]
    emb = encode_prompts(components.tokenizer, components.text_encoder, ["red, circle"])
    batch = fake_batches(components, 1, batch_size=3).dataset[0]
    torch.testing.assert_close(module.concept_embeddings(batch), emb.expand(3, -1, -1))
    assert ESD(components, prompt_source="concept_text", concept_text="circle",
               concept_target="ring").concept_prompts == ["circle"]  # the explicit text wins


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"prompt_source": "captions"}, "prompt_source='captions'"),
    ({"sample_with": "teacher"}, "sample_with='teacher'"),
    ({"negative_guidance": -1.0}, "negative_guidance=-1.0"),
    ({"sample_steps": 0}, "sample_steps=0"),
    ({"lr": 0.0}, "lr=0.0"),
    ({"trainable": "attn3"}, "trainable='attn3'"),
    ({"prompt_source": "concept_text"}, "concept_text"),
    ({"target_form": "compvis"}, "target_form='compvis'"),
    ({"timestep": "uniform"}, "timestep='uniform'"),
    ({"batch_size": 0}, "batch_size=0"),
])
def test_bad_options_are_named(components, kwargs, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(".", r"\.")):
        ESD(components, **kwargs)


# ------------------------------------------------------------------------------------------------ configs
def make_cfg(tmp_path, *overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.root={tmp_path}", f"paths.run_dir={tmp_path}/run", *overrides])


@pytest.mark.parametrize(("method", "trainable"), [("esd_x", "cross_attn"), ("esd_u", "non_cross_attn")])
def test_sd14_configs_compose_with_the_paper_defaults(tmp_path, components, method, trainable):
    cfg = make_cfg(tmp_path, "model=sd14", f"method={method}", "concept=van_gogh")
    m = OmegaConf.to_container(cfg, resolve=True)["method"]
    assert m["_target_"] == "unlearn.methods.esd.ESD" and m["name"] == method and m["trainable"] == trainable
    assert (m["steps"], m["lr"], m["negative_guidance"]) == (1000, 1e-5, 1.0)
    assert (m["sample_with"], m["sample_steps"], m["guidance_scale"]) == ("current", 50, 3.0)
    assert m["concept_target"] == "Van Gogh"
    module = instantiate(cfg.method, components=components, _convert_="object")
    assert module.method_name == method and module.hparams.trainable == trainable
    assert module.trainable_names and all(("attn2." in n) == (trainable == "cross_attn")
                                          for n in module.trainable_names)


@pytest.mark.parametrize("method", ["esd_x", "esd_u", "esd_x_diffusers"])
def test_toy_recipe_composes_for_both_variants(tmp_path, method):
    m = OmegaConf.to_container(make_cfg(tmp_path, "experiment=toy_esd", f"method={method}"), resolve=True)["method"]
    assert m["name"] == method and 0 < m["steps"] <= 300


def test_esd_runs_through_train(tmp_path, tiny_pipeline_path):
    from diffusers import StableDiffusionPipeline

    from unlearn.train import run

    cfg = make_cfg(tmp_path, f"model.path={tiny_pipeline_path}", "method=esd_u", "concept=toy_ring",
                   "method.steps=2", "method.sample_steps=2", "data.num_prompts=2", "data.images_per_prompt=2",
                   "data.batch_size=2", "data.gen_batch_size=2", "model.sample_steps=2", "evaluate=false",
                   "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false")
    res = run(cfg)
    saved = StableDiffusionPipeline.from_pretrained(res["pipeline"]).unet.state_dict()
    before = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path).unet.state_dict()
    changed = {k for k in before if not torch.equal(saved[k], before[k])}
    assert changed and all("attn2." not in k for k in changed)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.skipif(not (TOY_PIPELINE / "unet").exists(), reason="toy weights not built")
def test_esd_x_erases_the_toy_ring(tmp_path, shared_cache):
    """The toy recipe (100 iterations), cheaper: 8 anchor images, of which ESD reads only the latent shape, and 8
    evaluation prompts per concept. Measured with the full recipe: ring CA 100 -> 43.8 %, neighbours 100 %."""
    from toy_helpers import train_and_measure

    payload = train_and_measure(tmp_path, shared_cache, "experiment=toy_esd", "concept=toy_ring",
                                "data.num_prompts=8", "data.images_per_prompt=1", "eval.num_prompts=8",
                                "method.sample_steps=5")
    before, after = payload["results"]["original"], payload["results"]["esd_x"]
    assert before["toy_ring"]["ca"] >= 90, before
    assert after["toy_ring"]["ca"] < before["toy_ring"]["ca"] - 30, after
    for name in ("toy_diamond", "toy_triangle", "toy_cross"):
        assert after[name]["ca"] >= 0.9 * before[name]["ca"], (name, before[name], after[name])
