"""SalUn: the saliency mask against NumPy, the mask's gradient and one step's loss by hand on a tiny random SD, a
masked step that moves only masked weights, the forget set's images, config rules, one cheap toy run."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from toy_helpers import compose_train as make_cfg

from unlearn.losses.saliency import guided_forget_loss, mask_gradients, random_label_loss, saliency_mask
from unlearn.methods.salun import SalUn
from unlearn.models import encode_prompts, generate, load_components
from unlearn.models.loading import TOY_PIPELINE

PROMPTS = ["a red circle", "a red ring"]  # anchor (the "random label"), target (the forget prompt)


# ------------------------------------------------------------------------------------------------ the mask
def random_grads(seed=0):
    """Tensors of different scales, so a per-tensor threshold would keep other entries than a global one."""
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(7, 5, generator=g) * 10, "b": torch.randn(13, generator=g) * 0.1,
            "c": torch.randn(3, 2, 4, generator=g)}


@pytest.mark.parametrize("ratio", [0.5, 0.3, 1.0])
def test_mask_is_one_global_top_fraction(ratio):
    grads = random_grads()
    mask = saliency_mask(grads, ratio)
    flat = np.concatenate([np.abs(v.numpy()).ravel() for v in grads.values()])
    k = int(len(flat) * ratio)
    threshold = np.sort(flat)[::-1][k - 1]  # the k-th largest magnitude over all tensors together
    for name, g in grads.items():
        assert mask[name].dtype == torch.bool and mask[name].shape == g.shape
        np.testing.assert_array_equal(mask[name].numpy(), np.abs(g.numpy()) >= threshold, err_msg=name)
    assert sum(int(m.sum()) for m in mask.values()) == k
    if ratio < 1:  # the large tensor holds most of the kept entries: no per-tensor fraction
        assert mask["a"].float().mean() > ratio > mask["b"].float().mean()


def test_mask_keeps_exactly_the_fraction_with_ties():
    grads = {"a": torch.tensor([0.0, 0.0, 3.0, 0.0]), "b": torch.tensor([[0.0, -2.0], [0.0, 0.0]]),
             "c": torch.zeros(3)}  # 11 entries, 9 of them zero
    mask = saliency_mask(grads, 0.5)  # floor(5.5) = 5: both non-zeros, then the first three zeros in order
    assert mask["a"].tolist() == [True, True, True, True]  # a's three zeros come first
    assert mask["b"].tolist() == [[False, True], [False, False]]
    assert mask["c"].tolist() == [False, False, False]
    with pytest.raises(ValueError, match="ratio"):
        saliency_mask(grads, 0.0)


def test_losses_by_hand():
    # (1 + 7.5) 1 - 7.5 3 = -14 against noise 0: minus its square; the random label is a constant target.
    one, three, zero = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([0.0])
    assert guided_forget_loss(one, three, zero, 7.5).item() == -196.0
    e_forget, e_pseudo = torch.tensor([2.0], requires_grad=True), torch.tensor([5.0], requires_grad=True)
    loss = random_label_loss(e_forget, e_pseudo)
    loss.backward()
    assert loss.item() == 9.0 and e_forget.grad.item() == -6.0 and e_pseudo.grad is None


def test_masked_gradients_zero_outside_the_mask():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.arange(6.0).view(2, 3)
    mask = {"w": torch.tensor([[True, False, True], [False, False, True]])}
    mask_gradients([("w", p)], mask)
    assert p.grad.tolist() == [[0.0, 0.0, 2.0], [0.0, 0.0, 5.0]]


# ------------------------------------------------------------------------------------------------ the module
@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def embeddings(components, prompts):
    return encode_prompts(components.tokenizer, components.text_encoder, prompts)


def module_with_forget_set(components, n=2, **options):
    """A module whose forget set is n images of the target prompt, each relabelled to the anchor prompt."""
    module = SalUn(components, forget_images=n, mask_batch_size=n, sample_steps=3, sample_guidance=3.0, **options)
    anchor, target = embeddings(components, PROMPTS).chunk(2)
    module.prepare_forgetting(target.expand(n, -1, -1), anchor.expand(n, -1, -1), embeddings(components, [""]))
    return module


def batches(components, n_batches, batch_size=2):
    g = torch.Generator().manual_seed(1)
    anchor = embeddings(components, PROMPTS[:1])
    out = [{"latents": torch.randn(batch_size, 4, 8, 8, generator=g), "anchor_emb": anchor.expand(batch_size, -1, -1),
            "target_emb": anchor.expand(batch_size, -1, -1)} for _ in range(n_batches)]
    return torch.utils.data.DataLoader(out, batch_size=None)


def fit(module, tmp_path, steps):
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=batches(module.components, steps + 2))
    return trainer


def test_forget_set_is_the_original_models_images_of_the_target_prompt(components):
    module = module_with_forget_set(components)
    _, expected = generate(components, [PROMPTS[1]] * 2, [module.hparams.forget_seed + i for i in range(2)],
                           steps=3, guidance_scale=3.0, return_latents=True)
    torch.testing.assert_close(module.forget["latents"], expected)


def test_mask_is_the_top_half_of_the_guided_forgetting_gradient(components):
    """One batch of two forget images: the guided loss's gradient by hand, ranked globally in NumPy."""
    module = module_with_forget_set(components)
    unet = copy.deepcopy(module.unet).requires_grad_(True).eval()
    x0, c = module.forget["latents"], module.forget["target_emb"]
    gen = torch.Generator().manual_seed(module.hparams.forget_seed)  # the mask's own draws: t, then the noise
    t = torch.randint(0, 1000, (2,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = components.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    uncond = embeddings(components, [""]).expand(2, -1, -1)
    guided = 8.5 * unet(x_t, t, encoder_hidden_states=c).sample - 7.5 * unet(x_t, t, encoder_hidden_states=uncond).sample
    (-((guided - noise) ** 2).mean()).backward()
    names = [n for n, _ in unet.named_parameters()]
    flat = np.concatenate([np.abs(p.grad.numpy()).ravel() for p in unet.parameters()])
    k = len(flat) // 2
    keep = np.zeros(len(flat), bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    got = np.concatenate([module.mask[n].numpy().ravel() for n in names])
    assert got.sum() == k and (got != keep).mean() < 1e-4  # float sums in another order may swap a near-tie


def test_one_step_loss_by_hand(components):
    """Random-label loss on the forget images plus alpha x the anchor images' diffusion loss, re-derived."""
    module = module_with_forget_set(components, alpha=0.5)
    batch = next(iter(batches(components, 1)))
    torch.manual_seed(3)
    out = module.loss(batch)
    torch.manual_seed(3)  # replay the draws: forget t, noise; retain t, noise
    t_f = torch.randint(0, 1000, (2,))
    n_f = torch.randn(2, 4, 8, 8)
    t_r = torch.randint(0, 1000, (2,))
    n_r = torch.randn(2, 4, 8, 8)
    ac = components.scheduler.alphas_cumprod
    unet = module.unet
    with torch.no_grad():
        def noised(x0, t, n):
            return ac[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * n
        x_f = noised(module.forget["latents"], t_f, n_f)
        e_target = unet(x_f, t_f, encoder_hidden_states=module.forget["target_emb"]).sample.double()
        e_anchor = unet(x_f, t_f, encoder_hidden_states=module.forget["pseudo_emb"]).sample.double()
        e_retain = unet(noised(batch["latents"], t_r, n_r), t_r, encoder_hidden_states=batch["anchor_emb"]).sample
    forget = float(((e_target - e_anchor) ** 2).mean())
    retain = float(((e_retain.double() - n_r.double()) ** 2).mean())
    assert out["forget"].item() == pytest.approx(forget, rel=1e-5)
    assert out["retain"].item() == pytest.approx(retain, rel=1e-5)
    assert out["total"].item() == pytest.approx(forget + 0.5 * retain, rel=1e-5)


def test_a_step_moves_only_masked_weights(components, tmp_path):
    module = module_with_forget_set(components, lr=1e-2, steps=2)
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    fit(module, tmp_path, steps=2)
    moved = unmasked_moved = 0
    for n, p in module.unet.named_parameters():
        changed = p.detach() != before[n]
        moved += int(changed.sum())
        unmasked_moved += int((changed & ~module.mask[n]).sum())
    assert unmasked_moved == 0
    assert moved > 0.2 * sum(int(m.sum()) for m in module.mask.values())
    assert module.records()["saliency_mask.json"]["kept"] == sum(p.numel() for p in before.values()) // 2


def test_runs_through_train_with_the_prepared_pairs(tmp_path, tiny_pipeline_path, monkeypatch):
    """Through `train.run`: the forget set pairs each target prompt with its own anchor prompt, the mask is saved."""
    import json

    from unlearn.data.concepts import load_concept
    from unlearn.train import run

    seen = {}
    prepare = SalUn.prepare_forgetting

    def recording(self, target_emb, pseudo_emb, uncond_emb, device=None):
        seen.update(target=target_emb.clone(), pseudo=pseudo_emb.clone())
        return prepare(self, target_emb, pseudo_emb, uncond_emb, device)

    monkeypatch.setattr(SalUn, "prepare_forgetting", recording)
    cfg = make_cfg(tmp_path, f"model.path={tiny_pipeline_path}", "concept=toy_ring", "method=salun", "method.steps=2",
                   "method.forget_images=3", "method.mask_batch_size=2", "data.num_prompts=2",
                   "data.images_per_prompt=1", "data.batch_size=2", "data.gen_batch_size=2", "model.sample_steps=2",
                   "evaluate=false", "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false")
    res = run(cfg)
    comps = load_components(str(tiny_pipeline_path))
    pairs = load_concept(cfg.concept).pairs(2)
    anchors, targets = zip(*[pairs[i % 2] for i in range(3)])
    torch.testing.assert_close(seen["target"], embeddings(comps, list(targets)))
    torch.testing.assert_close(seen["pseudo"], embeddings(comps, list(anchors)))
    record = json.loads((tmp_path / "run" / "saliency_mask.json").read_text())
    assert record["kept"] == record["total"] // 2 and record["forget_images"] == 3
    assert res["pipeline"]


def test_resumed_run_is_bit_identical(tmp_path, tiny_pipeline_path):
    """The forget set and the mask are rebuilt from the original weights before the checkpoint's are loaded."""
    from safetensors.torch import load_file

    from unlearn.train import run

    def train(root, *more):
        cfg = make_cfg(root, f"model.path={tiny_pipeline_path}", "concept=toy_ring", "method=salun", "method.steps=3",
                       "method.lr=1e-2", "method.forget_images=2", "method.mask_batch_size=2", "data.num_prompts=2",
                       "data.images_per_prompt=1", "data.batch_size=2", "data.gen_batch_size=2",
                       "model.sample_steps=2", "evaluate=false", "logger=none", "trainer=cpu",
                       "trainer.enable_progress_bar=false", "+checkpoint_every=2", *more)
        return load_file(f"{run(cfg)['pipeline']}/unet/diffusion_pytorch_model.safetensors")

    whole = train(tmp_path / "a")
    (ckpt,) = (tmp_path / "a" / "run" / "checkpoints").glob("iteration=2.ckpt")
    resumed = train(tmp_path / "b", f"resume='{ckpt}'")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


# ------------------------------------------------------------------------------------------------ config
def test_config_rules_name_the_bad_value(tmp_path):
    from unlearn.validate import problems

    assert problems(make_cfg(tmp_path, "method=salun", "model=sd14", "concept=nudity",
                             "evaluate=false")) == []
    for key, value in (("mask_ratio", 0), ("mask_ratio", 1.5), ("alpha", -1), ("forget_images", 0)):
        found = problems(make_cfg(tmp_path, "method=salun", f"method.{key}={value}"))
        assert [str(p).split(": ")[0] for p in found] == [f"method.{key}={value}"], found


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.skipif(not (TOY_PIPELINE / "unet").exists(), reason="toy weights not built")
def test_salun_erases_the_toy_ring(tmp_path, shared_cache):
    from toy_helpers import assert_erased_and_kept, train_and_measure

    payload = train_and_measure(tmp_path, shared_cache, "experiment=toy_salun", "concept=toy_ring",
                                "data.num_prompts=8", "data.images_per_prompt=1", "method.forget_images=8",
                                "method.steps=60", "method.lr=5e-5",
                                "eval.num_prompts=8")
    assert_erased_and_kept(payload, "salun")
