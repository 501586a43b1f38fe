"""SelfDistill (SDD + L2/JS/CW): the EMA rule, the partial sampler, and a few real training steps on a tiny model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

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
