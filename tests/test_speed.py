"""Speed switches (conf/speed, trainer.precision) on the tiny pipeline: each runs a training iteration with a finite
loss and float32 master weights; SDPA and gradient checkpointing change nothing but speed and memory."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from ddp_worker import CONF, global_batch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from unlearn.methods.speed import apply_speed
from unlearn.models.loading import load_components


def unet_loss(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 16, 16, generator=g)
    return unet(x, torch.tensor([10, 500]), encoder_hidden_states=emb).sample.square().mean()


def test_diffusers_default_attention_is_sdpa_and_eager_agrees(tiny_pipeline_path):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = load_components(str(tiny_pipeline_path)).unet
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}  # what runs unless told otherwise
    with torch.no_grad():
        sdpa = unet_loss(apply_speed(unet, trainable=True, attention="sdpa"))
        eager = unet_loss(apply_speed(unet, trainable=True, attention="eager"))
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="speed.attention='flash'"):
        apply_speed(unet, trainable=True, attention="flash")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipeline_path):
    grads = []
    for checkpointing in (False, True):
        unet = load_components(str(tiny_pipeline_path)).unet.train().requires_grad_(True)
        apply_speed(unet, trainable=True, gradient_checkpointing=checkpointing)
        assert unet.is_gradient_checkpointing == checkpointing
        unet_loss(unet).backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-8, msg=lambda m, n=n: f"{n}: {m}")


def one_iteration(pipeline, method: str, precision: str, **speed):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"method={method}", "method.steps=2", "method.warmup_steps=0"
                                          if method.startswith("cdc") else "method.latents=data",
                                          "method.lr=1e-3"])
    L.seed_everything(0)
    kwargs = OmegaConf.to_container(cfg.method, resolve=True)
    module = get_class(kwargs.pop("_target_"))(load_components(str(pipeline)), **kwargs)
    module.configure_speed(**{**OmegaConf.to_container(cfg.speed), **speed})
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters() if p.requires_grad}
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, max_epochs=-1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(global_batch(), batch_size=4))
    return module, trainer, before


@pytest.mark.parametrize("method", ["cdc_cpg", "distill"])
@pytest.mark.parametrize("precision, speed", [
    ("bf16-mixed", {}),
    ("32-true", {"channels_last": True}),
    ("32-true", {"gradient_checkpointing": True, "attention": "eager"}),
    # dynamo traces the UNet (~40 s on one CPU thread); the eager backend needs no C++ toolchain
    pytest.param("32-true", {"compile": True, "compile_backend": "eager"}, marks=pytest.mark.slow),
])
def test_speed_switches_train_with_finite_loss(tiny_pipeline_path, method, precision, speed):
    module, trainer, before = one_iteration(tiny_pipeline_path, method, precision, **speed)
    assert int(module.iteration) == 2
    loss = trainer.callback_metrics["train/g_loss" if method == "cdc_cpg" else "train/loss"]
    assert math.isfinite(float(loss))
    for n, p in module.unet.named_parameters():
        if n in before:
            assert p.dtype == torch.float32, n  # master weights stay float32 under bf16 autocast
            assert torch.isfinite(p).all(), n
    assert any(not torch.equal(p, before[n]) for n, p in module.unet.named_parameters() if n in before)


def test_fp16_loss_scaling_with_clipping_inside_a_manual_step_is_refused(tiny_pipeline_path):
    """16-mixed (a GPU-only setting: on CPU Lightning swaps in bf16) with CDC+CPG's in-step clipping is refused."""
    from types import SimpleNamespace

    from unlearn.methods.cdc_cpg import CDCCPG

    module = CDCCPG(load_components(str(tiny_pipeline_path)), max_grad_norm=1.0)
    module._trainer = SimpleNamespace(world_size=1, precision="16-mixed",
                                      precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")))
    with pytest.raises(ValueError, match="trainer.precision='16-mixed' with method.max_grad_norm=1.0"):
        module.setup("fit")
    module._trainer.precision_plugin.scaler = None  # bf16-mixed
    module.setup("fit")
