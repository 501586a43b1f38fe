"""SD-2.x: `model=sd2` (ε) and `model=sd2_v` (v-prediction) on tiny random SD-2-shaped pipelines (no download).

Every trained method's loss on a v-prediction model must be its ε-form: the UNet's raw output v converted here by
hand, ε = sqrt(ᾱ_t) v + sqrt(1 − ᾱ_t) x_t, and each loss recomputed from it. Each check also asserts that the loss
computed on the raw output differs, so removing the conversion (UnlearnModule.eps) fails it. Then every method runs
train -> export -> reload -> evaluate on the v model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from toy_helpers import assert_candidates_evaluate, compose_train

from unlearn.models.prediction import eps_from_prediction

TOKENS = 16


def build_tiny_sd2(folder, prediction_type: str):
    """A random pipeline shaped as SD-2 where it matters to this code: UNet heads per block (a tuple), linear
    projections in and out of its transformers, upcast attention; a GELU text encoder; a tokenizer padding with "!";
    DDIM with SD-2's training schedule and the given prediction type. 16x16 images, 4x8x8 latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from unlearn.toy import world
    from unlearn.toy.tokenizer import write_tokenizer_files

    tok = CLIPTokenizer.from_pretrained(write_tokenizer_files(folder / "tok", world.vocabulary() + ["painting"]),
                                        model_max_length=TOKENS, pad_token="!")
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TOKENS, hidden_act="gelu", eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return folder / "pipeline"


@pytest.fixture(scope="module")
def tiny_sd2_v(tmp_path_factory):
    return build_tiny_sd2(tmp_path_factory.mktemp("tiny_sd2_v"), "v_prediction")


# ------------------------------------------------------------------------------------------------ the conversion
def test_conversion_inverts_diffusers_velocity():
    """diffusers' own v (DDPMScheduler.get_velocity) of known x0 and ε, converted back, is that ε; and the x0 it
    implies is DDIM's own pred_original_sample for a v model."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    ddpm = DDPMScheduler(prediction_type="v_prediction", **kw)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 421, 999])
    v, x_t = ddpm.get_velocity(x0, eps, t), ddpm.add_noise(x0, eps, t)
    got = eps_from_prediction(v, x_t, ddpm.alphas_cumprod[t], "v_prediction")
    torch.testing.assert_close(got, eps, rtol=1e-5, atol=1e-5)

    ddim = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **kw)
    ddim.set_timesteps(10)
    step = int(ddim.timesteps[3])
    a = ddim.alphas_cumprod[step]
    e = eps_from_prediction(v[:1], x_t[:1], a, "v_prediction")  # one sample, a scalar ᾱ (the attack's case)
    x0_ours = (x_t[:1] - (1 - a).sqrt() * e) / a.sqrt()
    torch.testing.assert_close(x0_ours, ddim.step(v[:1], step, x_t[:1]).pred_original_sample, rtol=1e-4, atol=1e-4)


def test_conversion_keeps_eps_and_dtype_and_refuses_sample_by_name():
    x = torch.randn(2, 4, 3, 3)
    assert eps_from_prediction(x, x, torch.tensor([0.5, 0.5]), "epsilon") is x
    half = eps_from_prediction(x.bfloat16(), x.bfloat16(), torch.tensor([0.5, 0.9]), "v_prediction")
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"prediction_type='sample' is not supported.*epsilon \| v_prediction"):
        eps_from_prediction(x, x, torch.tensor(0.5), "sample")


# ------------------------------------------------------------------------------------------------ every method's loss
def hand_eps(unet, x_t, t, emb, alphas):
    """ε from the raw UNet output, written out here rather than taken from unlearn."""
    v = unet(x_t, t, encoder_hidden_states=emb).sample
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * v + (1 - a).sqrt() * x_t, v


def raw_and_eps(unet, x_t, t, emb, alphas):
    e, v = hand_eps(unet, x_t, t, emb, alphas)
    return {"eps": e, "raw": v}


def module_for(tmp_path, path, method, *overrides):
    from hydra.utils import instantiate

    from unlearn.models.loading import load_components

    cfg = compose_train(tmp_path, "model=sd2_v", f"model.path={path}", f"method={method}", "concept=van_gogh",
                        "method.steps=1", *overrides)
    module = instantiate(cfg.method, components=load_components(str(path)), _convert_="object")
    assert module.prediction_type == "v_prediction"
    return module.train()  # as Lightning's fit leaves it


def fixed_batch(module):
    from unlearn.models.text import encode_prompts

    c = module.components
    enc = encode_prompts(c.tokenizer, c.text_encoder, ["a painting of a dog", "a painting by Van Gogh"])
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([150, 820])
    a = module.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    batch = {"latents": x0, "anchor_emb": enc[:1].expand(2, -1, -1).clone(),
             "target_emb": enc[1:].expand(2, -1, -1).clone(), "anchor_prompt": ["a painting of a dog"] * 2, "target_prompt": ["a painting by Van Gogh"] * 2}
    return batch, x_t, noise, t


def one_iteration(module, batch) -> dict:
    """Train one iteration with Lightning and return what the method logged (its losses, before any step)."""
    import lightning as L
    from torch.utils.data import DataLoader

    logged = {}
    module.track = lambda values, prog_bar=False: logged.update({k: v.detach().clone() for k, v in values.items()})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    return logged


def assert_eps_form(got, want: dict):
    """`got` is the ε-form; the same quantity from the raw v output is clearly another (so that a missing
    conversion fails here)."""
    torch.testing.assert_close(got, want["eps"], rtol=1e-5, atol=1e-6)
    gap = (want["eps"] - want["raw"]).abs().max()
    assert gap > 1e-2 * want["eps"].abs().max() + 1e-6, (gap, want)


@pytest.mark.parametrize("method", ["esd_x", "esd_x_diffusers"])
def test_esd_loss_is_its_eps_form(tmp_path, tiny_sd2_v, method):
    from unlearn.losses import esd_target
    from unlearn.methods.base import first_samples

    m = module_for(tmp_path, tiny_sd2_v, method)
    batch, x_t, _, t = fixed_batch(m)
    h, alphas = m.hparams, m.alphas_cumprod
    c = m.concept_embeddings(first_samples(batch, h.batch_size))  # esd_x_diffusers: one sample, the concept text
    n = c.shape[0]
    x_t, t = x_t[:n], t[:n]
    m.sample_latents = lambda c_, shape: (x_t, t)
    uncond = m.uncond_emb.expand(n, -1, -1)
    with torch.no_grad():
        want = {}
        for form in ("eps", "raw"):
            e_0 = raw_and_eps(m.original, x_t, t, uncond, alphas)[form]
            e_c = raw_and_eps(m.original, x_t, t, c, alphas)[form]
            target = esd_target(e_0, e_c, h.negative_guidance, form=h.target_form)
            want[form] = F.mse_loss(raw_and_eps(m.unet, x_t, t, c, alphas)[form], target)
    assert_eps_form(one_iteration(m, batch)["train/loss"], want)


@pytest.mark.parametrize("method,extra", [("distill", ("method.loss=js",)), ("sdd", ()),
                                          ("distill", ("method.loss=cw", "data.batch_size=2"))])
def test_distill_loss_is_its_eps_form(tmp_path, tiny_sd2_v, method, extra):
    m = module_for(tmp_path, tiny_sd2_v, method, *extra)
    batch, x_t, _, t = fixed_batch(m)
    m.teacher_latents = lambda c_s, b: (x_t, t)
    c_s = m.concept_embeddings(batch)
    uncond = m.uncond_emb.expand(2, -1, -1)
    with torch.no_grad():
        want = {form: m.hparams.loss_weight * m.distance(raw_and_eps(m.unet, x_t, t, c_s, m.alphas_cumprod)[form],
                                                         raw_and_eps(m.unet, x_t, t, uncond, m.alphas_cumprod)[form])
                for form in ("eps", "raw")}
    assert_eps_form(one_iteration(m, batch)["train/loss"], want)


@pytest.mark.parametrize("method", ["conabl", "conabl_official"])
def test_conabl_loss_is_its_eps_form(tmp_path, tiny_sd2_v, method):
    m = module_for(tmp_path, tiny_sd2_v, method)
    batch, x_t, noise, t = fixed_batch(m)
    m.noise = lambda latents, t_=None: (x_t, noise, t)
    with torch.no_grad():
        want = {form: F.mse_loss(raw_and_eps(m.unet, x_t, t, batch["target_emb"], m.alphas_cumprod)[form],
                                 raw_and_eps(m.unet, x_t, t, batch["anchor_emb"], m.alphas_cumprod)[form])
                for form in ("eps", "raw")}
    assert_eps_form(one_iteration(m, batch)["train/loss"], want)


@pytest.mark.parametrize("method", ["cdc_cpg", "cdc_cpg_official"])
def test_cdc_cpg_losses_are_their_eps_form(tmp_path, tiny_sd2_v, method):
    """G's adversarial loss, the retain loss and D's loss; D sees ε (paper) or x̂0 (official code), and x̂0 is
    checked against the v-form identity x̂0 = sqrt(ᾱ) x_t − sqrt(1 − ᾱ) v."""
    m = module_for(tmp_path, tiny_sd2_v, method, "method.warmup_steps=0", "method.warmup_compare=ge",
                   "method.retain_batch=same")
    batch, x_t, noise, t = fixed_batch(m)
    m.noise = lambda latents, t_=None: (x_t, noise, t)
    h, alphas = m.hparams, m.alphas_cumprod
    a = alphas[t].view(-1, 1, 1, 1)
    disc = copy.deepcopy(m.disc).train()
    real_net = m.original if m.original is not None else m.unet

    def view(out, form):
        if h.d_input == "eps":
            return out[form]
        if form == "raw":  # no conversion: x̂0 computed as if v were ε
            return (x_t - (1 - a).sqrt() * out["raw"]) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * out["raw"]

    bce = F.binary_cross_entropy_with_logits
    want = {"g": {}, "r": {}, "d": {}}
    with torch.no_grad():
        real_out = raw_and_eps(real_net, x_t, t, batch["anchor_emb"], alphas)
        fake_out = raw_and_eps(m.unet, x_t, t, batch["target_emb"], alphas)
        for form in ("eps", "raw"):
            lr_, lf = disc(view(real_out, form)), disc(view(fake_out, form))
            want["g"][form] = bce(lf, torch.ones_like(lf))
            want["d"][form] = bce(lr_, torch.ones_like(lr_)) + bce(lf, torch.zeros_like(lf)) + \
                (bce(lf, torch.ones_like(lf)) if h.d_keeps_g_grad else 0)
            want["r"][form] = F.mse_loss(raw_and_eps(m.unet, x_t, t, batch["anchor_emb"], alphas)[form], noise)
    seen = []  # what D is shown: G's fake, then D's real and fake
    m.disc.register_forward_pre_hook(lambda _mod, args: seen.append(args[0].detach().clone()))
    got = one_iteration(m, batch)
    assert len(seen) == 3
    for shown, out in ((seen[0], fake_out), (seen[1], real_out), (seen[2], fake_out)):
        assert_eps_form(shown, {form: view(out, form) for form in ("eps", "raw")})
    assert_eps_form(got["train/retain_loss"], want["r"])
    # A random D barely tells its inputs apart: its losses are checked for equality only (its inputs were above).
    torch.testing.assert_close(got["train/g_loss"], want["g"]["eps"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["train/d_loss"], want["d"]["eps"], rtol=1e-5, atol=1e-7)


def test_salun_losses_are_their_eps_form(tmp_path, tiny_sd2_v):
    """The forget loss (ε of the concept against ε of the pseudo prompt) and the retain diffusion loss."""
    m = module_for(tmp_path, tiny_sd2_v, "salun")
    batch, x_t, noise, t = fixed_batch(m)
    m.forget = {"latents": batch["latents"], "target_emb": batch["target_emb"], "pseudo_emb": batch["anchor_emb"]}
    m.noise = lambda latents, t_=None: (x_t, noise, t)
    alphas = m.alphas_cumprod
    with torch.no_grad():
        got = m.loss(batch)
        want = {}
        for form in ("eps", "raw"):
            forget = F.mse_loss(raw_and_eps(m.unet, x_t, t, batch["target_emb"], alphas)[form],
                                raw_and_eps(m.unet, x_t, t, batch["anchor_emb"], alphas)[form])
            retain = F.mse_loss(raw_and_eps(m.unet, x_t, t, batch["anchor_emb"], alphas)[form], noise)
            want[form] = {"forget": forget, "retain": retain}
    for key in ("forget", "retain"):
        assert_eps_form(got[key], {form: want[form][key] for form in want})


def test_spm_losses_are_their_eps_form(tmp_path, tiny_sd2_v):
    """ESD's target from the adapter-off model, the adapter-on answer, and the anchoring term on surrogates."""
    from unlearn.losses import esd_target

    m = module_for(tmp_path, tiny_sd2_v, "spm", "method.sample_steps=2")
    with torch.no_grad():
        for layer in m.spm.layers:  # an adapter that acts, so on and off differ
            layer.up.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    _, x_t, _, t = fixed_batch(m)
    x_t, t = x_t[:1], t[:1]
    c = m.concept_emb
    anchors = torch.randn(2, *c.shape[1:], generator=torch.Generator().manual_seed(8)) * c.norm() / c[0].numel() ** .5
    alphas, h = m.alphas_cumprod, m.hparams

    def at(strength, x, t_, emb, form):
        m.spm.multiplier = strength
        try:
            return raw_and_eps(m.unet, x, t_, emb, alphas)[form]
        finally:
            m.spm.multiplier = 0.0

    with torch.no_grad():
        got = m.losses(x_t, t, c, anchors)
        want = {"erase": {}, "anchoring": {}}
        x_a, t_a = x_t.repeat(2, 1, 1, 1), t.repeat(2)
        for form in ("eps", "raw"):
            target = esd_target(at(0.0, x_t, t, m.uncond_emb, form), at(0.0, x_t, t, c, form), h.negative_guidance)
            want["erase"][form] = F.mse_loss(at(1.0, x_t, t, c, form), target)
            want["anchoring"][form] = F.mse_loss(at(1.0, x_a, t_a, anchors, form), at(0.0, x_a, t_a, anchors, form))
    for key, forms in want.items():
        assert_eps_form(got[key], forms)


def test_advunlearn_losses_are_their_eps_form(tmp_path, tiny_sd2_v):
    """ESD's target from the frozen UNet with the original encoder's prompt, the new encoder's answer against it,
    and the retain MSE, new encoder against original."""
    from unlearn.losses import esd_target

    m = module_for(tmp_path, tiny_sd2_v, "advunlearn", "method.sample_steps=2")
    batch, x_t, _, t = fixed_batch(m)
    cond_new, cond_orig = batch["anchor_emb"][:1], batch["target_emb"][:1]
    retain_new, retain_orig = batch["target_emb"], batch["anchor_emb"]
    alphas, g = m.alphas_cumprod, m.hparams.negative_guidance
    with torch.no_grad():
        erase, retain = m.loss_terms(x_t[:1], t[:1], cond_new, cond_orig, x_t, t, retain_new, retain_orig)
        want = {"erase": {}, "retain": {}}
        for form in ("eps", "raw"):
            e_0 = raw_and_eps(m.unet, x_t[:1], t[:1], m.uncond_emb, alphas)[form]
            e_c = raw_and_eps(m.unet, x_t[:1], t[:1], cond_orig, alphas)[form]
            want["erase"][form] = F.mse_loss(raw_and_eps(m.unet, x_t[:1], t[:1], cond_new, alphas)[form],
                                             esd_target(e_0, e_c, g))
            want["retain"][form] = F.mse_loss(raw_and_eps(m.unet, x_t, t, retain_new, alphas)[form],
                                              raw_and_eps(m.unet, x_t, t, retain_orig, alphas)[form])
    assert_eps_form(erase, want["erase"])
    assert_eps_form(retain, want["retain"])


def test_unlearndiffatk_loss_is_its_eps_form(tiny_sd2_v):
    """The attack's diffusion loss on the erased model: ε-MSE also when the model predicts v."""
    from unlearn.attacks.base import Reference
    from unlearn.attacks.unlearndiffatk import UnlearnDiffAtk
    from unlearn.models.loading import load_components

    class Recording(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet, self.calls = unet, []

        def forward(self, x_t, t, encoder_hidden_states):
            out = self.unet(x_t, t, encoder_hidden_states=encoder_hidden_states)
            self.calls.append((x_t.detach(), int(t), out.sample.detach()))
            return out

    class Never:  # the detector's check: nothing found, so the attack runs its whole (one-step) budget
        def ids(self, ids):
            return False

        text = ids

    original = load_components(str(tiny_sd2_v))
    erased = copy.copy(original)
    erased.unet = Recording(original.unet)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    attack = UnlearnDiffAtk(k=2, iterations=1, num_timesteps=1, lr=0.1)
    result = attack.run(original, erased, "a painting of a dog", Reference(latent=x0), Never())
    ((x_t, t, v),) = erased.unet.calls
    a = original.scheduler.alphas_cumprod[t]
    noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    want = {"eps": F.mse_loss(a.sqrt() * v + (1 - a).sqrt() * x_t, noise), "raw": F.mse_loss(v, noise)}
    assert_eps_form(torch.tensor(result.details["losses"][0]), want)


def test_cce_inversion_loss_is_its_eps_form(tiny_sd2_v, monkeypatch):
    """CCE's textual-inversion loss on the erased model: ε-MSE when the model predicts v, and its learning loop
    passes the model's own prediction type."""
    from unlearn.attacks import cce
    from unlearn.attacks.common import PrefixPrompt
    from unlearn.models.loading import load_components

    model = load_components(str(tiny_sd2_v))
    prefix = PrefixPrompt(model.tokenizer, model.text_encoder, "a painting of a dog", 1)
    hidden = prefix.hidden_embeds(torch.randn(1, 16, generator=torch.Generator().manual_seed(6))).detach()
    g = torch.Generator().manual_seed(7)
    x0, noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([90, 640])
    hiddens, alphas = hidden.expand(2, -1, -1), model.scheduler.alphas_cumprod
    with torch.no_grad():
        got = cce.inversion_loss(model.unet, hiddens, x0, t, noise, alphas, "v_prediction")
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        e, v = hand_eps(model.unet, x_t, t, hiddens, alphas)
    assert_eps_form(got, {"eps": F.mse_loss(e, noise), "raw": F.mse_loss(v, noise)})

    used = []
    real = cce.inversion_loss
    monkeypatch.setattr(cce, "inversion_loss", lambda *args: used.append(args[-1]) or real(*args))
    attack = cce.CCE(steps=1, lr=1e-3, batch_size=2)
    list(attack.learn(model, model, x0, ["a painting of a dog", "a painting"], seed=0, stops=[1]))
    assert used == ["v_prediction"]


# ------------------------------------------------------------------------------------------------ end to end
TRAINED = {"esd_x": (), "esd_u": (), "conabl": (), "distill": (), "sdd": (), "cdc_cpg": ("method.warmup_steps=0",),
           "uce": (), "rece": ("method.epochs=1",), "salun": (),
           "spm": ("method.sample_steps=2", "method.warmup_steps=0", "method.lr=1e-2"),
           "advunlearn": ("method.warmup_steps=0", "method.attack_steps=1", "method.sample_steps=2",
                          "method.retain_batch=2", "method.lr=1e-3")}
TEXT_TRAINED, ADAPTER = {"advunlearn"}, {"spm"}  # the text encoder changes, not the UNet | spm.safetensors only


def test_train_export_reload_evaluate_on_a_v_model(tmp_path, tiny_sd2_v):
    """Every method on the tiny v-model: train (data sampled by the v model), export, reload with
    StableDiffusionPipeline.from_pretrained (still v; AdvUnlearn: its text encoder changed, not the UNet) or, for
    SPM's adapter file, load_pipeline; then `unlearn.evaluate` measures every result."""
    from diffusers import StableDiffusionPipeline

    from unlearn.export.load import load_pipeline
    from unlearn.train import run as train

    common = [f"model.path={tiny_sd2_v}", "model=sd2_v", "model.clip=toy", "model.sample_steps=2",
              "concept=van_gogh", "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false",
              f"paths.cache={tmp_path}/cache"]
    base = StableDiffusionPipeline.from_pretrained(tiny_sd2_v)
    original, text = base.unet.state_dict(), base.text_encoder.state_dict()
    folders = []
    for method, extra in TRAINED.items():
        res = train(compose_train(tmp_path / method, *common, f"method={method}", "method.steps=1", "evaluate=false",
                                  "data.num_prompts=2", "data.images_per_prompt=1", "data.batch_size=2",
                                  "data.gen_batch_size=2", *extra))
        folders.append(res["pipeline"])
        pipe = load_pipeline(tiny_sd2_v, res["pipeline"]) if method in ADAPTER else \
            StableDiffusionPipeline.from_pretrained(res["pipeline"])
        assert pipe.scheduler.config.prediction_type == "v_prediction", method
        unet_changed = any(not torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items() if k in original)
        text_changed = any(not torch.equal(v, text[k]) for k, v in pipe.text_encoder.state_dict().items())
        assert unet_changed == (method not in TEXT_TRAINED | ADAPTER), method
        assert text_changed == (method in TEXT_TRAINED), method
        if method in ADAPTER:
            assert hasattr(pipe.unet, "spm_adapter")
    assert len(folders) == len(TRAINED)
    assert_candidates_evaluate(tmp_path, common, folders, "van_gogh")


def test_a_v_model_samples_other_images_than_the_same_weights_read_as_eps(tmp_path, tiny_sd2_v):
    """The caches of prepared data and original images are keyed by the model's fingerprint: it must tell the two
    apart (an ε model's fingerprint is unchanged)."""
    from unlearn.models.fingerprint import model_fingerprint
    from unlearn.models.loading import load_components

    v = load_components(str(tiny_sd2_v))
    eps = copy.copy(v)
    eps.scheduler = type(v.scheduler).from_config(v.scheduler.config, prediction_type="epsilon")
    fv, fe = model_fingerprint(v), model_fingerprint(eps)
    assert fv["prediction_type"] == "v_prediction" and "prediction_type" not in fe
    assert {k: fv[k] for k in fe} == fe
    assert json.dumps(fv) != json.dumps(fe)
