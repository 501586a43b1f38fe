"""`cdc_cpg_official` = DoCo's released code (yongliang-wu/DoCo), one test per point where our paper variant differs.

Each test checks that the switch does what the released code does, on the tiny random pipeline; where it can, it
re-derives the code's rule independently (DoCo's loops and layers written out here) and compares.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from test_cdc_cpg import FixedPairs, fit, unet_state
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader

import unlearn.methods.cdc_cpg as cdc_mod
from unlearn.losses import concept_preserving_gradient
from unlearn.methods.cdc_cpg import CDCCPG, clip_global_norm, resolve_d_lr
from unlearn.models import load_components
from unlearn.nets import PatchDiscriminator
from unlearn.nets.attention import detach_first_token

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL_D = {"base_channels": 8}


def official_cfg(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=["method=cdc_cpg_official", *overrides])


def changed_keys(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# 1. train.py create_custom_diffusion / parameter_group cross-attn: only attn2.to_k and attn2.to_v are trained.
def test_1_only_cross_attention_keys_and_values_train(tiny_pipeline_path):
    comps = load_components(str(tiny_pipeline_path))
    before = unet_state(comps)
    fit(comps, steps=3, warmup_steps=1, lr=1e-3, trainable="cross_attn_kv", discriminator=SMALL_D)
    changed = changed_keys(before, comps.unet.state_dict())
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), changed
    assert any(".to_k." in k for k in changed) and any(".to_v." in k for k in changed)
    assert official_cfg().method.trainable == "cross_attn_kv"


# 2. model_pipeline.py CustomDiffusionAttnProcessor: the first (start-of-text) token's key/value are detached.
@pytest.mark.parametrize("proj", ["to_k", "to_v"])
def test_2_start_of_text_key_value_get_no_gradient(tiny_pipeline_path, proj):
    comps = load_components(str(tiny_pipeline_path))
    unet = comps.unet.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    plain = unet(x, t, encoder_hidden_states=emb).sample.detach()
    handles = detach_first_token(unet)
    layer = next(m for n, m in unet.named_modules() if n.endswith(f"attn2.{proj}"))
    seen = {}

    def record(module, inputs, output):  # runs after the detaching hook: sees its output
        output.retain_grad()
        seen["in"], seen["out"] = inputs[0], output

    layer.register_forward_hook(record)
    out = unet(x, t, encoder_hidden_states=emb).sample
    assert torch.equal(out.detach(), plain), "detaching must not change the forward pass"
    out.pow(2).sum().backward()
    # dL/dW = sum over batch and tokens of dL/d(out)_bt (x) in_bt; the code drops token 0 from the sum.
    g_out, e = seen["out"].grad, seen["in"]
    expected = torch.einsum("btd,bte->de", g_out[:, 1:], e[:, 1:])
    with_sot = torch.einsum("btd,bte->de", g_out, e)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(with_sot, expected, rtol=1e-3, atol=1e-6), "token 0 contributes nothing: vacuous test"
    assert len(handles) == 2 * sum(n.endswith("attn2") for n, _ in unet.named_modules())


def test_2_only_the_trained_unet_is_hooked(tiny_pipeline_path):
    module = CDCCPG(load_components(str(tiny_pipeline_path)), detach_sot=True, real_branch="frozen",
                    discriminator=SMALL_D)
    hooked = [n for n, m in module.unet.named_modules() if m._forward_hooks]
    assert hooked and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in hooked)
    assert not any(m._forward_hooks for m in module.original.modules())
    assert official_cfg().method.detach_sot is True


# 3. gradient_clip.py adjust_gradient: G_r and G_u are each clipped to max_grad_norm (norm_grad() right after each
#    backward), then the per-tensor normalised projection; the result is not clipped again.
def doco_adjust(g_u, g_r, max_norm, lam):
    """DoCo's adjust_gradient on gradients held by fresh parameters, with torch's clip_grad_norm_."""
    ps_b = [nn.Parameter(torch.zeros_like(b)) for b in g_r]
    ps_a = [nn.Parameter(torch.zeros_like(a)) for a in g_u]
    for p, b in zip(ps_b, g_r):
        p.grad = b.clone()
    torch.nn.utils.clip_grad_norm_(ps_b, max_norm)
    b_grads = [p.grad.clone() for p in ps_b]
    for p, a in zip(ps_a, g_u):
        p.grad = a.clone()
    torch.nn.utils.clip_grad_norm_(ps_a, max_norm)
    for p, b in zip(ps_a, b_grads):
        b_n = b / (torch.linalg.norm(b) + 1e-8)
        a_n = p.grad / (torch.linalg.norm(p.grad) + 1e-8)
        dot = torch.dot(a_n.flatten(), b_n.flatten())
        if dot < 0:
            p.grad -= lam * dot * b_n
    return [p.grad for p in ps_a]


def test_3_clip_each_then_project_matches_the_code():
    g = torch.Generator().manual_seed(1)
    shapes = [(6, 5), (7,), (3, 3, 2)]
    g_u = [3 * torch.randn(s, generator=g) for s in shapes]
    g_r = [5 * torch.randn(s, generator=g) for s in shapes]
    ours = concept_preserving_gradient(clip_global_norm(g_u, 1.0), clip_global_norm(g_r, 1.0), lam=1.0,
                                       granularity="per_tensor", normalize=True)
    for a, b in zip(ours, doco_adjust(g_u, g_r, 1.0, 1.0)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for grads in (g_u, g_r):  # the pure clip is torch's clip_grad_norm_
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in clip_global_norm(grads, 1)]))
        assert abs(float(norm) - 1.0) < 1e-5
    assert clip_global_norm([torch.ones(2) * 1e-3, None], 1.0)[1] is None
    torch.testing.assert_close(clip_global_norm([torch.ones(2) * 1e-3], 1.0)[0], torch.ones(2) * 1e-3)


@pytest.mark.parametrize("clip_when", ["before", "after"])
def test_3_where_the_module_clips(tiny_pipeline_path, monkeypatch, clip_when):
    max_norm = 1e-5  # far below the tiny model's raw gradients (checked below): clipping binds
    calls, applied = [], []
    real_cpg = cdc_mod.concept_preserving_gradient

    def spy(g_u, g_r, **kw):
        out = real_cpg(g_u, g_r, **kw)
        calls.append((g_u, g_r, out))
        return out

    def on_step(opt, args, kwargs):
        if opt.param_groups[0]["betas"] == (0.9, 0.999):  # the UNet's optimizer (D's has 0.5 here)
            applied.append([None if p.grad is None else p.grad.clone() for p in opt.param_groups[0]["params"]])

    monkeypatch.setattr(cdc_mod, "concept_preserving_gradient", spy)
    handle = register_optimizer_step_pre_hook(on_step)
    try:
        fit(load_components(str(tiny_pipeline_path)), steps=3, warmup_steps=1, lr=1e-3, trainable="cross_attn_kv",
            granularity="per_tensor", normalize=True, max_grad_norm=max_norm, clip_when=clip_when,
            d_betas=(0.5, 0.999), discriminator=SMALL_D)
    finally:
        handle.remove()

    def norm(gs):
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in gs if x is not None])))

    assert len(calls) == 2 and len(applied) == 2
    for (g_u, g_r, out), grads in zip(calls, applied):
        if clip_when == "before":
            assert norm(g_u) == pytest.approx(max_norm, rel=1e-2) and norm(g_r) == pytest.approx(max_norm, rel=1e-2)
            assert all(torch.equal(a, b) for a, b in zip(grads, out)), "the projected gradient must not be clipped"
        else:
            assert norm(g_u) > 10 * max_norm and norm(g_r) > 10 * max_norm
            assert norm(grads) <= max_norm * (1 + 1e-3)


# 4. train.py: torch.optim.AdamW with --adam_weight_decay 1e-2 (and betas 0.9/0.999, eps 1e-8).
def test_4_adamw_with_weight_decay(tiny_pipeline_path):
    comps = load_components(str(tiny_pipeline_path))
    m = official_cfg().method
    module = CDCCPG(comps, optimizer=m.optimizer, weight_decay=m.weight_decay, trainable=m.trainable,
                    discriminator=SMALL_D)
    opt_g, _ = module.configure_optimizers()
    assert type(opt_g) is torch.optim.AdamW
    group = opt_g.param_groups[0]
    assert group["weight_decay"] == 1e-2 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert {id(p) for p in group["params"]} == {id(p) for p in module.trainable_parameters()}
    paper = CDCCPG(load_components(str(tiny_pipeline_path)), discriminator=SMALL_D).configure_optimizers()[0]
    assert type(paper) is torch.optim.Adam and paper.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="sgd"):
        CDCCPG(comps, optimizer="sgd")


# 5. train.py / utils.py collate_fn: the retain (prior-preservation) loss is on its own anchor examples, with their
#    own noise and timesteps (the second half of the batch), not on the unlearning branch's x_t.
@pytest.mark.parametrize("mode", ["same", "separate"])
def test_5_retain_batch_is_drawn_separately(tiny_pipeline_path, monkeypatch, mode):
    comps = load_components(str(tiny_pipeline_path))
    data = FixedPairs(comps)
    draws = []
    real_noise = CDCCPG.noise

    def noise(self, latents, t=None):
        out = real_noise(self, latents, t)
        rows = [int(torch.nonzero((data.latents == x).flatten(1).all(1))[0]) for x in latents]
        draws.append((self.done_iterations, rows, out[1], out[2]))
        return out

    monkeypatch.setattr(CDCCPG, "noise", noise)
    fit(comps, steps=6, warmup_steps=1, lr=1e-3, retain_batch=mode, discriminator=SMALL_D)
    per_iter = {}
    for it, rows, eps, t in draws:
        per_iter.setdefault(it, []).append((rows, eps, t))
    assert len(per_iter[0]) == 1  # warm-up: no retain loss
    g_iters = [per_iter[i] for i in range(1, 6)]
    if mode == "same":
        assert all(len(d) == 1 for d in g_iters)
        return
    assert all(len(d) == 2 for d in g_iters)
    assert all(not torch.equal(d[0][1], d[1][1]) for d in g_iters), "the retain batch needs its own noise"
    assert any(not torch.equal(d[0][2], d[1][2]) for d in g_iters), "the retain batch needs its own timesteps"
    assert any(d[0][0] != d[1][0] for d in g_iters), "the retain examples must be drawn apart from the main ones"
    assert official_cfg().method.retain_batch == "separate"


@pytest.mark.parametrize(("compare", "iteration", "drawn"), [("ge", 5, 3), ("gt", 5, 2), ("gt", 1, 0), ("ge", 2, 0)])
def test_5_retain_stream_resumes_where_it_stood(tiny_pipeline_path, compare, iteration, drawn):
    # One retain batch per generator step: a run resumed at `iteration` re-enters the retain stream there.
    module = CDCCPG(load_components(str(tiny_pipeline_path)), warmup_steps=2, warmup_compare=compare,
                    discriminator=SMALL_D)
    module.done_iterations = iteration
    assert module.retained_so_far() == drawn


# 7. train.py: `if global_step > args.warm_up` with global_step from 0: warm_up + 1 discriminator-only iterations.
@pytest.mark.parametrize(("compare", "moved"), [("gt", False), ("ge", True)])
def test_7_warmup_count(tiny_pipeline_path, compare, moved):
    comps = load_components(str(tiny_pipeline_path))
    before = unet_state(comps)
    fit(comps, steps=3, warmup_steps=2, lr=1e-3, warmup_compare=compare, discriminator=SMALL_D)
    assert bool(changed_keys(before, comps.unet.state_dict())) is moved
    assert official_cfg().method.warmup_compare == "gt"


# 8. README commands: --dlr 5e-4 for styles, 1e-4 for objects and nudity (argparse's 1e-2 is never used).
@pytest.mark.parametrize(("concept", "lr"), [("toy_stripes", 5e-4), ("van_gogh", 5e-4), ("toy_ring", 1e-4),
                                             ("nudity", 1e-4)])
def test_8_discriminator_lr_by_concept_kind(tiny_pipeline_path, concept, lr):
    m = official_cfg(f"concept={concept}").method
    assert resolve_d_lr(m.d_lr, m.d_lr_by_kind, m.concept_kind) == lr
    module = CDCCPG(load_components(str(tiny_pipeline_path)), d_lr=None, d_lr_by_kind=dict(m.d_lr_by_kind),
                    concept_kind=m.concept_kind, discriminator=SMALL_D)
    assert module.configure_optimizers()[1].param_groups[0]["lr"] == lr
    assert tuple(official_cfg().method.d_betas) == (0.5, 0.999)


def test_8_missing_kind_is_named():
    with pytest.raises(ValueError, match="'abstract'"):
        resolve_d_lr(None, {"style": 5e-4}, "abstract")
    assert resolve_d_lr(3e-4, {"style": 5e-4}, "style") == 3e-4  # an explicit d_lr wins


# 9. gan.py PatchGANDiscriminator: biased convs (also before BatchNorm), last conv stride 1.
def doco_discriminator(c=4):
    def block(i, o, norm=True):
        return [nn.Conv2d(i, o, 4, stride=2, padding=1), *([nn.BatchNorm2d(o)] if norm else []), nn.LeakyReLU(0.2)]
    return nn.Sequential(*block(c, 64, False), *block(64, 128), *block(128, 256), *block(256, 512),
                         nn.Conv2d(512, 1, 4, padding=1))


def test_9_discriminator_is_the_code_s():
    d_cfg = dict(official_cfg().method.discriminator)
    ours, theirs = PatchDiscriminator(**d_cfg), doco_discriminator()
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]
    with torch.no_grad():
        for a, b in zip(ours.parameters(), theirs.parameters()):
            a.copy_(torch.randn_like(a) * 0.05)
            b.copy_(a)
    x = torch.randn(3, 4, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))  # train mode: batch statistics, as in the code
    assert ours(x).shape == (3, 1, 3, 3)
    assert ours(torch.randn(3, 4, 16, 16)).shape == (3, 1, 1, 1)  # toy latents: padded to 32, then 1x1
    convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs) and convs[-1].stride == (1, 1)
    with pytest.raises(ValueError, match="last_stride=3"):
        PatchDiscriminator(last_stride=3)


# 10. train.py: D's gradients are not zeroed between G's backward (which reaches D) and D's step, so D's step
#     descends G's loss too. Re-derived here in the code's order on a copy of D.
@pytest.mark.parametrize("keep", [True, False])
def test_10_discriminator_step_keeps_generator_gradient(tiny_pipeline_path, keep):
    comps = load_components(str(tiny_pipeline_path))
    seen = {}
    inputs = []

    def on_step(opt, args, kwargs):
        if opt.param_groups[0]["betas"] == (0.5, 0.999):  # D's optimizer
            seen["grads"] = [p.grad.clone() for p in opt.param_groups[0]["params"]]
            seen["disc"] = copy.deepcopy(opt.param_groups[0]["params"])

    handle = register_optimizer_step_pre_hook(on_step)
    torch.manual_seed(0)
    module = CDCCPG(comps, steps=2, warmup_steps=1, lr=1e-3, d_betas=(0.5, 0.999), d_keeps_g_grad=keep,
                    d_input="x0", real_branch="frozen", discriminator={**SMALL_D, "norm": "batch"})
    module.disc.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().clone()))
    try:
        L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(
            module, DataLoader(FixedPairs(comps), batch_size=4))
    finally:
        handle.remove()
    # Last iteration: D(fake) for G, then D(real), D(fake) for D. Rebuild D at its pre-step weights.
    fake_g, real, fake = inputs[-3:]
    assert torch.equal(fake_g, fake)
    disc = copy.deepcopy(module.disc)
    with torch.no_grad():
        for p, q in zip(disc.parameters(), seen["disc"]):
            p.copy_(q)
    disc.zero_grad()
    if keep:  # DoCo: loss = criterion(D(x0_fake), label G wants); backward reaches D and stays
        lg = disc(fake)
        F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg)).backward()
    lr_, lf = disc(real), disc(fake)
    (F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_))
     + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))).backward()
    for got, p in zip(seen["grads"], disc.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)
    assert official_cfg().method.d_keeps_g_grad is True
