"""SPM: One-dimensional Adapter to Rule Them All (Lyu et al., CVPR 2024), as released in Con6924/SPM.

A rank-1 adapter on the UNet's transformer blocks (unlearn/methods/spm_adapter.py) learns, with the base weights
frozen, to answer the concept c as the adapter-off model would under negative guidance (ESD's target), while latent
anchoring keeps its answers for random "surrogate" embeddings those of the adapter-off model:

    L = || eps_on(x_t, c, t) - [eps_off(x_t, "", t) - g (eps_off(x_t, c, t) - eps_off(x_t, "", t))] ||^2
        + lambda || eps_on(x_t, s, t) - eps_off(x_t, s, t) ||^2,   s ~ surrogates of c

x_t comes from N(0, I) by k ~ U{1..N-1} DDIM + CFG steps of c with the adapter on; t is the k-th of N equal
parts of the training schedule (train_spm.py: `timesteps[int(k * 1000 / N)]` of a 1000-step schedule).
At inference the adapter's strength follows the prompt (facilitated transport, spm_adapter.py).
"""

from __future__ import annotations

import copy
import functools
import json

import torch
import torch.nn.functional as F

from unlearn.losses import esd_target
from unlearn.methods.base import UnlearnModule, first_samples
from unlearn.methods.spm_adapter import SPMAdapter, install_transport, save_adapter
from unlearn.models import encode_prompts, sdxl
from unlearn.models.sampling import sample_until

# Which rows the anchoring loss sees. all: the sampled surrogates. released: train_spm.py's batch, where
# sample() lays out [u, s1, u, s2, u, s3, u, s4] and predict_noise's chunk(2) keeps the "text" half [u, s3, u, s4]:
# the empty prompt twice and two of the four surrogates.
ANCHOR_ROWS = ("all", "released")
# The prompt whose x_t and erase target train the adapter: the concept prompt (train_spm.py), or the batch's target
# prompts (as ESD's default here), which reach the concept in every context the data covers.
PROMPT_SOURCES = ("concept_text", "target_prompts")


def sample_surrogates(target: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n surrogate embeddings of target's shape (src/engine/sampling.py): a Gaussian direction, accepted with
    probability 1 - cos(target, direction), scaled to U[0.8, 1.2) x |target| (norms over the flattened tensor)."""
    flat, out = target.flatten().float().cpu(), []
    while len(out) < n:
        d = torch.randn(flat.shape, generator=generator)
        d = d / d.norm()
        if torch.rand((), generator=generator) < 1 - F.cosine_similarity(flat, d, dim=0):
            scale = 0.8 + 0.4 * torch.rand((), generator=generator)
            out.append(scale * d * flat.norm())
    return torch.stack(out).view(n, *target.shape).to(device=target.device, dtype=target.dtype)


def sample_surrogates_packed(target: torch.Tensor, n: int, generator: torch.Generator, pooled_dim: int) -> torch.Tensor:
    """SDXL's surrogates (train_spm_xl.py's sample_xl): the token states and the pooled vector of a packed
    embedding (unlearn/models/sdxl.py) sampled each on its own, as above, then packed again."""
    tokens = sample_surrogates(sdxl.token_states(target), n, generator)
    pooled = sample_surrogates(sdxl.pooled_of(target, pooled_dim), n, generator)
    return sdxl.pack(tokens, pooled)


def anchor_rows(surrogates: torch.Tensor, uncond: torch.Tensor, rows: str) -> torch.Tensor:
    """The embeddings the anchoring loss compares on, (n, T, D) or, for `released`, [u, s_{n/2+1}, u, ...]."""
    if rows == "all":
        return surrogates
    n = surrogates.shape[0]
    interleaved = torch.stack([uncond.expand_as(surrogates), surrogates], 1).flatten(0, 1)  # u, s1, u, s2, ...
    return interleaved[n:]


class SPM(UnlearnModule):
    def __init__(self, components, name: str = "spm", steps: int = 3000, lr: float = 1e-4,
                 weight_decay: float = 1e-2, warmup_steps: int = 500, cycles: int = 3, rank: int = 1,
                 alpha: float = 1.0, sample_steps: int = 30, guidance_scale: float = 3.0,
                 negative_guidance: float = 1.0, anchor_weight: float = 1000.0, surrogates: int = 4,
                 anchor_rows: str = "all", prompt_source: str = "concept_text", concept_text: str | list[str] | None = None,
                 concept_target: str | list[str] | None = None, base: dict | None = None,
                 batch_size: int | None = 1, max_grad_norm: float | None = None, log_every: int = 10):
        if anchor_rows not in ANCHOR_ROWS:
            raise ValueError(f"unknown anchor_rows={anchor_rows!r}; choose one of {ANCHOR_ROWS}")
        if prompt_source not in PROMPT_SOURCES:
            raise ValueError(f"unknown prompt_source={prompt_source!r}; choose one of {PROMPT_SOURCES}")
        super().__init__(components, name, steps, trainable="all", frozen_copy=False, log_every=log_every)
        self.save_hyperparameters(ignore=["components"])
        # Only the adapter trains; the base UNet is the adapter-off model, so no frozen copy is needed.
        self.unet.requires_grad_(False)
        self.trainable_names = []
        self.spm = SPMAdapter(self.unet, rank, alpha).attach(self.unet)
        text = concept_text if concept_text is not None else concept_target
        self.concept_prompts = [text] if isinstance(text, str) else list(text or [])
        if not self.concept_prompts:
            raise ValueError("SPM needs concept_text or a concept config with `target`")
        encode = functools.partial(encode_prompts, components.tokenizer, components.text_encoder)
        # One target per run: several concept prompts are joined as ESD joins them (train_spm.py trains each
        # prompt pair; the transport compares against every prompt).
        self.register_buffer("concept_emb", encode([", ".join(self.concept_prompts)]), persistent=False)
        self.register_buffer("uncond_emb", encode([""]), persistent=False)
        full = copy.deepcopy(components.scheduler)
        full.set_timesteps(full.config.num_train_timesteps)
        self.register_buffer("train_timesteps", full.timesteps.clone(), persistent=False)
        if base is not None:  # the base as configured and its fingerprint, for the file's metadata
            from unlearn.models.fingerprint import model_fingerprint

            self.base = {**base, "fingerprint": model_fingerprint(components)}
        else:
            self.base = None

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        from unlearn.validate import Problem, choice, number

        m, out = cfg["method"], super().validate_config(cfg)
        out += number("method.rank", m.get("rank"), 1, integer=True, hint=" (the adapter's rank)")
        out += number("method.alpha", m.get("alpha"), 0, lo_open=True)
        out += number("method.sample_steps", m.get("sample_steps"), 2, integer=True,
                      hint=" (DDIM steps of the x_t sampler; k is drawn from 1..N-1)")
        out += number("method.guidance_scale", m.get("guidance_scale"), 0)
        out += number("method.negative_guidance", m.get("negative_guidance"), 0)
        out += number("method.anchor_weight", m.get("anchor_weight"), 0)
        out += number("method.surrogates", m.get("surrogates"), 1, integer=True)
        out += number("method.warmup_steps", m.get("warmup_steps"), 0, integer=True)
        out += number("method.cycles", m.get("cycles"), 1, integer=True)
        out += number("method.weight_decay", m.get("weight_decay"), 0)
        out += number("method.batch_size", m.get("batch_size"), 1, integer=True, optional=True)
        out += choice("method.anchor_rows", m.get("anchor_rows"), ANCHOR_ROWS)
        out += choice("method.prompt_source", m.get("prompt_source", "concept_text"), PROMPT_SOURCES)
        if m.get("anchor_rows") == "released" and isinstance(m.get("surrogates"), int) and m["surrogates"] % 2:
            out.append(Problem("method.surrogates", m["surrogates"], "an even number with anchor_rows=released "
                               "(its batch keeps the second half of [u, s1, u, s2, ...])"))
        if m.get("adapter", "none") != "none":
            out.append(Problem("method.adapter", m.get("adapter"), "none for method spm: it trains its own rank-1 "
                               "adapter (method.rank, method.alpha), not a LoRA of UNet weights"))
        if cfg.get("export", "pipeline") != "pipeline":
            out.append(Problem("export", cfg.get("export"), "pipeline for method spm: its artefact is the adapter "
                               "file spm.safetensors, written in the run folder (no pipeline folder, no delta)"))
        return out

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.spm.parameters())

    def configure_optimizers(self):
        # train_spm.py: AdamW8bit (bitsandbytes, GPU only) with its defaults; torch's AdamW has the same betas,
        # eps and weight decay 1e-2. diffusers' cosine_with_restarts: linear warm-up, then `cycles` hard restarts.
        from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

        h = self.hparams
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=h.lr, weight_decay=h.weight_decay)
        sched = get_cosine_with_hard_restarts_schedule_with_warmup(opt, h.warmup_steps, h.steps, h.cycles)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm,
                                gradient_clip_algorithm="norm")

    # ------------------------------------------------------------------ pieces
    def predict(self, x_t, t, emb, strength: float):
        """ε with the adapter at strength m (1 on, 0 off)."""
        self.spm.multiplier = strength
        try:
            return self.eps(self.unet, x_t, t, emb)
        finally:
            self.spm.multiplier = 0.0

    @torch.no_grad()
    def sample_latents(self, c: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
        h, sched = self.hparams, self.scheduler
        sched.set_timesteps(h.sample_steps)  # the scheduler is shared; every user sets its own schedule
        z = torch.randn(shape, device=self.device, dtype=self.unet.dtype) * sched.init_noise_sigma
        k = int(torch.randint(1, h.sample_steps, ()))
        self.spm.multiplier = 1.0  # train_spm.py samples x_t `with network`
        try:
            x_t = sample_until(self.unet, sched, c, self.uncond_emb, z, k, h.guidance_scale)
        finally:
            self.spm.multiplier = 0.0
        i = int(k * len(self.train_timesteps) / h.sample_steps)
        return x_t, self.train_timesteps[i].to(self.device).expand(shape[0]).clone()

    def surrogate_embeddings(self, c: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))  # follows the run's seed
        te = self.components.text_encoder
        if isinstance(te, sdxl.TextEncoders):
            s = sample_surrogates_packed(c[0], self.hparams.surrogates, g, te.text_encoder_2.config.projection_dim)
        else:
            s = sample_surrogates(c[0], self.hparams.surrogates, g)
        return anchor_rows(s, self.uncond_emb[0].to(s.dtype), self.hparams.anchor_rows)

    def losses(self, x_t, t, c, anchors) -> dict[str, torch.Tensor]:
        h = self.hparams
        uncond = self.uncond_emb.to(c.dtype).expand(c.shape[0], -1, -1)
        n = anchors.shape[0]
        x_a = x_t.repeat_interleave(n, 0)
        t_a = t.repeat_interleave(n, 0)
        a_emb = anchors.repeat(c.shape[0], 1, 1)
        with torch.no_grad():  # the adapter-off answers, one forward pass
            off = self.predict(torch.cat([x_t, x_t, x_a]), torch.cat([t, t, t_a]), torch.cat([uncond, c, a_emb]), 0.0)
            e_0, e_c, a_off = off.split([len(c), len(c), len(a_emb)])
            target = esd_target(e_0, e_c, h.negative_guidance)
        on = self.predict(torch.cat([x_t, x_a]), torch.cat([t, t_a]), torch.cat([c, a_emb]), 1.0)
        e_on, a_on = on.split([len(c), len(a_emb)])
        erase, anchor = F.mse_loss(e_on, target), F.mse_loss(a_on, a_off)
        return {"loss": erase + h.anchor_weight * anchor, "erase": erase, "anchoring": anchor}

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        batch = first_samples(batch, self.hparams.batch_size)
        if self.hparams.prompt_source == "target_prompts":
            c = batch["target_emb"].to(self.unet.dtype)
        else:
            c = self.concept_emb.to(self.unet.dtype).expand(batch["latents"].shape[0], -1, -1)
        x_t, t = self.sample_latents(c, batch["latents"].shape)
        out = self.losses(x_t, t, c, self.surrogate_embeddings(c))
        self.track({"train/loss": out["loss"], "train/erase": out["erase"], "train/anchoring": out["anchoring"]},
                   prog_bar=True)
        self.advance()
        return out["loss"]

    # ------------------------------------------------------------------ export
    def export(self, folder):
        """SPM's artefact: the adapter file spm.safetensors in the run folder (`folder` is where a pipeline
        folder would go), not a pipeline: its weights depend on the prompt."""
        from pathlib import Path

        if self.base is None:
            raise ValueError("SPM.export needs `base` (the model as configured: path, revision, dtype)")
        return save_adapter(Path(folder).parent, self.spm, self.concept_prompts, self.base,
                            method=self.method_name, concept=str(self.base.get("concept", "")))

    def export_unet(self):
        """A copy of the UNet with the trained adapter and facilitated transport, for the run's evaluation."""
        self.spm.detach()
        unet = copy.deepcopy(self.unet)
        adapter = copy.deepcopy(self.spm)
        self.spm.attach(self.unet)
        comp = self.components
        return install_transport(unet, adapter.requires_grad_(False), self.concept_prompts, comp.tokenizer,
                                 comp.text_encoder).requires_grad_(False).eval()

    def records(self) -> dict[str, dict]:
        return {"spm.json": {"concept_prompts": self.concept_prompts, "rank": self.spm.rank,
                             "alpha": self.spm.alpha, "layers": len(self.spm.names),
                             "parameters": sum(p.numel() for p in self.spm.parameters()),
                             "anchor_rows": self.hparams.anchor_rows, "hparams": json.loads(json.dumps(
                                 dict(self.hparams), default=str))}}
