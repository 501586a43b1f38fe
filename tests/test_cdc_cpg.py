"""CDC + CPG's training loop on a tiny random SD: warm-up trains D alone; afterwards the UNet moves by Eq. 9."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from unlearn.methods.cdc_cpg import CDCCPG
from unlearn.models import encode_prompts, load_components


class FixedPairs(Dataset):
    """A few anchor latents with anchor/target embeddings, as the DataModule serves them."""

    def __init__(self, components, n=8):
        g = torch.Generator().manual_seed(0)
        c = components.unet.config
        self.latents = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
        emb = encode_prompts(components.tokenizer, components.text_encoder,
                             ["a red circle", "a red circle in the style of stripes"])
        self.anchor, self.target = emb[0], emb[1]

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return {"latents": self.latents[i % len(self.latents)], "anchor_emb": self.anchor, "target_emb": self.target}


class Recorder(L.Callback):
    def __init__(self):
        self.d_loss, self.logged = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.logged.append("train/d_loss" in trainer.callback_metrics)
        if self.logged[-1]:
            self.d_loss.append(float(trainer.callback_metrics["train/d_loss"]))


def fit(components, **kw):
    torch.manual_seed(0)
    kw.setdefault("log_every", 1)
    module = CDCCPG(components, **kw)
    rec = Recorder()
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[rec], enable_model_summary=False)
    trainer.fit(module, DataLoader(FixedPairs(components), batch_size=4))
    return module, rec, trainer


def test_statistics_reach_lightning_every_log_every_iterations(tiny_pipeline_path):
    # They stay on the device in between (reading a tensor back is a host-device sync), and the last iteration
    # always logs.
    _, rec, _ = fit(load_components(str(tiny_pipeline_path)), steps=7, warmup_steps=2, log_every=3,
                    discriminator={"base_channels": 8})
    assert rec.logged == [False, False, True, True, True, True, True]
    # iterations 3-5 still show iteration 3's value; 6 and 7 new ones
    assert rec.d_loss[0] == rec.d_loss[1] == rec.d_loss[2] != rec.d_loss[3] != rec.d_loss[4]


def unet_state(components):
    return {k: v.clone() for k, v in components.unet.state_dict().items()}


def test_warmup_trains_only_the_discriminator(tiny_pipeline_path):
    comps = load_components(str(tiny_pipeline_path))
    before = unet_state(comps)
    module, rec, _ = fit(comps, steps=40, warmup_steps=40, d_lr=1e-3, discriminator={"base_channels": 8})
    assert int(module.iteration) == 40
    after = comps.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the UNet changed during warm-up"
    first, last = sum(rec.d_loss[:5]) / 5, sum(rec.d_loss[-5:]) / 5
    assert last < first, (first, last)


@pytest.mark.parametrize("retain", ["none", "l2", "cpg"])
def test_after_warmup_the_unet_moves(tiny_pipeline_path, retain):
    comps = load_components(str(tiny_pipeline_path))
    before = unet_state(comps)
    _, _, trainer = fit(comps, steps=4, warmup_steps=2, lr=1e-3, retain=retain,
                             discriminator={"base_channels": 8})
    after = comps.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "train/g_loss" in trainer.callback_metrics
    if retain != "none":
        assert -1.0 <= float(trainer.callback_metrics["train/cos_gu_gr"]) <= 1.0


def test_trainable_subset_leaves_the_rest(tiny_pipeline_path):
    comps = load_components(str(tiny_pipeline_path))
    before = unet_state(comps)
    fit(comps, steps=3, warmup_steps=1, lr=1e-3, trainable="cross_attn", discriminator={"base_channels": 8})
    after = comps.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("attn2." in k for k in changed)


def test_official_variant_options(tiny_pipeline_path):
    comps = load_components(str(tiny_pipeline_path))
    module, _, _ = fit(comps, steps=3, warmup_steps=1, lr=1e-3, d_input="x0", real_branch="frozen",
                       granularity="per_tensor", normalize=True, trainable="cross_attn", max_grad_norm=1.0,
                       d_betas=(0.5, 0.999), discriminator={"base_channels": 8, "norm": "batch"})
    assert module.original is not None and not any(p.requires_grad for p in module.original.parameters())


def test_bad_options_are_named(tiny_pipeline_path):
    comps = load_components(str(tiny_pipeline_path))
    for kw, word in (({"retain": "l1"}, "l1"), ({"d_input": "v"}, "'v'"), ({"trainable": "lora"}, "lora")):
        with pytest.raises(ValueError, match=word):
            CDCCPG(comps, **kw)
