"""SelfDistill (SDD + L2/JS/CW): the EMA rule, the partial sampler, a few real training steps on a tiny model, and
a training step's loss against a hand computation of L2, JS and CW."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.special import hyp1f1

from unlearn.methods.distill import SelfDistill, stop_timesteps
from unlearn.methods.ema import ema_update
from unlearn.models import encode_prompts, generate, load_components
from unlearn.models.sampling import initial_latents, sample_until

PROMPTS = ["a red circle", "a blue square"]


# ------------------------------------------------------------------------------------------------ fixtures
# `tiny_pipeline_path` (a random SD-format folder) comes from conftest.py.
@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def fake_batches(components, n: int = 3, batch_size: int = 2):
    """What the datamodule yields: anchor latents, anchor/target embeddings and prompts, seeds."""
    g = torch.Generator().manual_seed(1)
    emb = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS)
    out = []
    for i in range(n):
        out.append({"latents": torch.randn(batch_size, 4, 8, 8, generator=g), "anchor_emb": emb[[0] * batch_size],
                    "target_emb": emb[[1] * batch_size], "anchor_prompt": [PROMPTS[0]] * batch_size,
                    "target_prompt": [PROMPTS[1]] * batch_size, "seed": torch.arange(batch_size) + i})
    return torch.utils.data.DataLoader(out, batch_size=None)  # already batched


class StudentHistory(L.Callback):
    """The student's trainable tensors after every optimizer step (the EMA of these must be the teacher)."""

    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.history.append([p.detach().clone() for p in module.paired_parameters()[1]])


def trainer(tmp_path, callbacks=()):
    return L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                     callbacks=list(callbacks))


# ------------------------------------------------------------------------------------------------ pure functions
def test_ema_update_matches_closed_form():
    torch.manual_seed(0)
    decay, k = 0.9, 7
    theta0 = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    students = [[torch.randn_like(p) for p in theta0] for _ in range(k)]
    teacher = [p.clone() for p in theta0]
    for s in students:
        ema_update(teacher, s, decay)
    for j, p in enumerate(theta0):
        # theta_T(k) = d^k theta_0 + sum_{i=1..k} (1-d) d^(k-i) theta_s(i)
        expected = decay ** k * p + sum((1 - decay) * decay ** (k - i) * students[i - 1][j] for i in range(1, k + 1))
        torch.testing.assert_close(teacher[j], expected, rtol=1e-12, atol=1e-12)


def test_ema_update_edges():
    a, b = torch.ones(3), torch.full((3,), 5.0)
    ema_update([a], [b], 1.0)
    assert torch.equal(a, torch.ones(3))  # decay 1: frozen teacher
    ema_update([a], [b], 0.0)
    assert torch.equal(a, b)  # decay 0: copy of the student
    with pytest.raises(ValueError):
        ema_update([a], [b], 1.5)
    with pytest.raises(ValueError):
        ema_update([a], [b, b], 0.5)


def test_stop_timesteps_bracket_the_ddim_timestep():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
    for n in (50, 3):
        sched.set_timesteps(n)
        for k in range(n):
            t = stop_timesteps(k, n, 1000, 256)
            lo, hi = round((1 - (k + 1) / n) * 1000), round((1 - k / n) * 1000)
            assert t.min() >= lo and t.max() < hi
            assert lo <= int(sched.timesteps[k]) < hi  # z_t's own noise level lies in the window


# ------------------------------------------------------------------------------------------------ the sampler
def test_sample_until_last_step_equals_generate(components):
    steps, scale = 3, 3.0
    _, lat = generate(components, PROMPTS, [0, 1], steps=steps, guidance_scale=scale, return_latents=True)
    cond = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS)
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""])
    z = initial_latents([0, 1], (4, 8, 8), "cpu", torch.float32)
    components.scheduler.set_timesteps(steps)
    assert torch.equal(sample_until(components.unet, components.scheduler, cond, uncond, z, 0, scale), z)
    out = sample_until(components.unet, components.scheduler, cond, uncond, z, steps, scale)
    torch.testing.assert_close(out, lat, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        sample_until(components.unet, components.scheduler, cond, uncond, z, steps + 1, scale)


def test_sample_until_partial_matches_diffusers_pipeline(components):
    """An independent check of an early stop: the latents StableDiffusionPipeline holds after k steps."""
    steps, scale, k = 4, 2.5, 2
    cond = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS)
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""])
    z = initial_latents([3, 4], (4, 8, 8), "cpu", torch.float32)
    seen = {}

    def grab(pipe, i, t, kw):
        seen[i + 1] = kw["latents"].clone()  # after step i, i+1 steps are done
        return kw

    components.pipeline()(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(2, -1, -1), latents=z.clone(),
                          num_inference_steps=steps, guidance_scale=scale, output_type="latent",
                          callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])
    components.scheduler.set_timesteps(steps)
    out = sample_until(components.unet, components.scheduler, cond, uncond, z, k, scale)
    torch.testing.assert_close(out, seen[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ training
def _run(components, tmp_path, steps=2, **kw):
    module = SelfDistill(components, steps=steps, sample_steps=3, **kw)
    original = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    history = StudentHistory()
    t = trainer(tmp_path, [history])
    t.fit(module, train_dataloaders=fake_batches(components, n=steps + 2))
    return module, original, history, t


@pytest.mark.parametrize("loss", ["l2", "js", "cw"])
def test_training_steps_follow_the_ema_rule(components, tmp_path, loss):
    decay = 0.5  # large moves, so "the teacher moved by exactly EMA" is not a near-identity check
    module, original, history, t = _run(components, tmp_path, loss=loss, ema_decay=decay, lr=1e-2)
    assert int(module.iteration) == 2 and len(history.history) == 2
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert t.callback_metrics["train/student_teacher_dist"] > 0

    names = set(module.trainable_names)
    assert names and all("attn2." in n for n in names)
    student, teacher = dict(module.unet.named_parameters()), dict(module.teacher.named_parameters())
    assert any(not torch.equal(student[n], original[n]) for n in names), "the student did not train"
    for n, p in student.items():
        if n not in names:  # frozen everywhere
            assert torch.equal(p, original[n]) and torch.equal(teacher[n], original[n]), n
    # theta_T(k) = d^k theta_0 + sum_i (1-d) d^(k-i) theta_s(i), with theta_s(i) the student after step i
    k = len(history.history)
    for j, n in enumerate(module.trainable_names):
        expected = decay ** k * original[n] + sum(
            (1 - decay) * decay ** (k - i) * history.history[i - 1][j] for i in range(1, k + 1))
        torch.testing.assert_close(teacher[n], expected, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_export_is_the_teacher_and_loads(components, tmp_path):
    from diffusers import StableDiffusionPipeline

    module, _, _, _ = _run(components, tmp_path, ema_decay=0.5, lr=1e-2)
    assert module.export_unet() is module.teacher
    folder = module.export(tmp_path / "pipeline")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    saved = dict(pipe.unet.named_parameters())
    for n, p in module.teacher.named_parameters():
        torch.testing.assert_close(saved[n], p, rtol=0, atol=0)
    n = module.trainable_names[0]
    assert not torch.equal(saved[n], dict(module.unet.named_parameters())[n])  # not the student


def test_data_latents_concept_text_and_sample_grid(components, tmp_path):
    module, _, _, t = _run(components, tmp_path, latents="data", prompt_source="concept_text",
                          concept_target="nudity", sample_every=1, loss="js")
    assert module.concept_prompts == ["nudity"]
    assert torch.isfinite(t.callback_metrics["train/loss"])
    grids = sorted((tmp_path / "samples").glob("teacher_student_*.png"))
    assert [g.name for g in grids] == ["teacher_student_000001.png", "teacher_student_000002.png"]
    from PIL import Image

    width, height = Image.open(grids[0]).size  # one prompt: a teacher row over a student row, labelled on the left
    assert height > 2 * 16 and width > height / 2


def test_checkpoint_keeps_only_trained_tensors(components, tmp_path):
    module = SelfDistill(components, steps=1, sample_steps=2)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    keep = {f"{m}.{n}" for m in ("unet", "teacher") for n in module.trainable_names}
    assert {k for k in ckpt["state_dict"] if k.startswith(("unet.", "teacher."))} == keep


def test_config_instantiates(components):
    from hydra.utils import instantiate

    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "method" / "distill.yaml")
    assert cfg.concept_target is None  # no concept in this config: the fallback resolves to null
    # "object" keeps the Components dataclass as is ("all" would turn it into a plain dict).
    module = instantiate(cfg, components=components, _convert_="object")
    h = module.hparams
    assert (h.loss, h.ema_decay, h.steps, h.lr, h.weight_decay, h.max_grad_norm) == ("l2", 0.999, 1500, 1e-5, 1e-4, 1.0)
    assert (h.latents, h.sample_steps, h.guidance_scale, h.prompt_source) == ("teacher", 50, 3.0, "target_prompts")
    with pytest.raises(ValueError, match="concept_text"):
        SelfDistill(components, prompt_source="concept_text")
    with pytest.raises(ValueError, match="loss"):
        SelfDistill(components, loss="kl")
    with pytest.raises(ValueError, match="cw_samples='voxels'"):
        SelfDistill(components, loss="cw", cw_samples="voxels")


@pytest.mark.parametrize("samples", ["batch", "pixels"])
def test_cw_options_reach_the_distance(components, samples):
    from unlearn.losses import cramer_wold_distance

    a, b = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    d2 = cramer_wold_distance(a, b, samples=samples)
    plain = SelfDistill(components, loss="cw", cw_samples=samples, sample_steps=2)
    logged = SelfDistill(components, loss="cw", cw_samples=samples, cw_log=True, sample_steps=2)
    torch.testing.assert_close(plain.distance(a, b), d2)
    torch.testing.assert_close(logged.distance(a, b), torch.log(d2))
    assert torch.isfinite(logged.distance(a, a))  # log of an exact match is floored, not -inf


# ------------------------------------------------------------------------------------------------ the loss by hand
def hand_distance(e_s: np.ndarray, e_0: np.ndarray, loss: str, tau: float = 1.0, gamma: float | None = None,
                  samples: str = "batch") -> float:
    """Eq. 2's D from its definitions, in float64 NumPy: L2 = mean squared difference; JS (appendix A.3, Eqs. 14-15)
    = 1/2 KL(P||M) + 1/2 KL(Q||M) with P, Q the softmax of each sample's flattened prediction over tau, M = (P+Q)/2,
    averaged over the batch; CW = Knop, Tabor et al.'s closed form of the squared Cramer-Wold distance,
    [mean phi(|x-x'|^2/4g) + mean phi(|y-y'|^2/4g) - 2 mean phi(|x-y|^2/4g)] / (2 sqrt(pi g)), with
    phi_D = 1F1(1/2; D/2; -s) (D < 20) or (1 + 4s/(2D-3))^(-1/2), g by Silverman's rule on the pooled variance."""
    if loss == "l2":
        return float(np.mean((e_s - e_0) ** 2))
    if loss == "js":
        total = 0.0
        for a, b in zip(e_s, e_0):
            p, q = np.exp(a.ravel() / tau - a.max() / tau), np.exp(b.ravel() / tau - b.max() / tau)
            p, q = p / p.sum(), q / q.sum()
            m = (p + q) / 2
            total += 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
        return total / len(e_s)

    def cw(x, y):  # point sets (n, D)
        n, dim = x.shape
        g = gamma if gamma is not None else np.concatenate([x, y]).var(axis=0).mean() * (4 / (3 * n)) ** 0.4

        def mean_phi(u, v):
            s = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1) / (4 * g)
            return np.mean(hyp1f1(0.5, dim / 2, -s) if dim < 20 else (1 + 4 * s / (2 * dim - 3)) ** -0.5)

        return (mean_phi(x, x) + mean_phi(y, y) - 2 * mean_phi(x, y)) / (2 * np.sqrt(np.pi * g))

    if samples == "batch":  # each prediction is a point in R^(C*H*W); the batch is the set
        return cw(e_s.reshape(len(e_s), -1), e_0.reshape(len(e_0), -1))
    # each image's H*W positions are points in R^C; one distance per image
    return float(np.mean([cw(a.reshape(a.shape[0], -1).T, b.reshape(b.shape[0], -1).T) for a, b in zip(e_s, e_0)]))


class ModelsBeforeStep(L.Callback):
    """Student and teacher as they are when each training step starts (callbacks run before the module's step)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.student, self.teacher = copy.deepcopy(module.unet).eval(), copy.deepcopy(module.teacher)


@pytest.mark.parametrize("loss,options", [
    ("l2", {}), ("l2", {"loss_weight": 0.5}), ("js", {}), ("js", {"tau": 0.5}),
    ("cw", {}), ("cw", {"cw_samples": "pixels"}), ("cw", {"gamma": 0.7})],
    ids=["l2", "l2-weight", "js", "js-tau", "cw-batch", "cw-pixels", "cw-gamma"])
def test_training_step_loss_equals_hand_computation(components, tmp_path, monkeypatch, loss, options):
    """The loss the second training step logs is D(eps_s(z_t, c_s, t), eps_s(z_t, "", t)) on the z_t and t it
    drew, recomputed by hand from the student as it was before that step, c_s the batch's target prompts. After
    one step of lr 1e-2 and EMA decay 0.5 the teacher is no longer the student, so a target taken from the
    teacher would show."""
    with torch.no_grad():  # a prompt that moves the prediction well beyond float32 noise (random attn2 barely does)
        g = torch.Generator().manual_seed(5)
        for name, p in components.unet.named_parameters():
            if "attn2." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    module = SelfDistill(components, steps=2, sample_steps=3, loss=loss, ema_decay=0.5, lr=1e-2, **options)
    drawn = []
    sample = module.teacher_latents

    def recording(c_s, batch):
        z_t, t = sample(c_s, batch)
        drawn.append((z_t, t))
        return z_t, t

    monkeypatch.setattr(module, "teacher_latents", recording)
    batches, snapshot = fake_batches(components, n=4, batch_size=3), ModelsBeforeStep()
    fitted = trainer(tmp_path, [snapshot])
    fitted.fit(module, train_dataloaders=batches)
    assert len(drawn) == 2
    (z_t, t), student = drawn[1], snapshot.student
    c_s = batches.dataset[1]["target_emb"]
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""]).expand_as(c_s)
    with torch.no_grad():
        e_s = student(z_t, t, encoder_hidden_states=c_s).sample.double().numpy()
        e_0 = student(z_t, t, encoder_hidden_states=uncond).sample.double().numpy()
        moved = max((a - b).abs().max() for a, b in zip(snapshot.teacher.parameters(), student.parameters()))
    assert moved > 1e-3  # teacher and student differ at this step
    want = options.get("loss_weight", 1.0) * hand_distance(
        e_s, e_0, loss, tau=options.get("tau", 1.0), gamma=options.get("gamma"),
        samples=options.get("cw_samples", "batch"))
    assert want > 0 and np.abs(e_s - e_0).max() > 0.1  # the prompt moves the prediction: not 0 == 0
    # JS is computed in float32 (log-softmax terms of ~1e-3 each): measured up to 2.3e-5 off the float64 value;
    # L2 and CW (float64 inside) within 5e-8.
    assert fitted.callback_metrics["train/loss"].item() == pytest.approx(want, rel=3e-4 if loss == "js" else 1e-6)
