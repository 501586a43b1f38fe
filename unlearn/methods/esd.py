"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

The fine-tuned UNet eps_theta learns to answer the concept prompt c as the frozen original eps* would under
*negative* guidance away from c (Eq. 7):

    L = || eps_theta(x_t, c, t) - [eps*(x_t, "", t) - eta (eps*(x_t, c, t) - eps*(x_t, "", t))] ||^2

x_t comes from partial DDIM + CFG sampling of c from N(0, I), stopped after a random number k of the N steps; t is
drawn uniformly from the slice of the training schedule that DDIM step stands for. ESD-x trains the
cross-attention (`attn2`) weights, ESD-u everything else; the two are one class with a different `trainable`.
No data is needed: the prepared batch only lends its latent shape and, by default, its target-prompt embeddings.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from unlearn.losses import ESD_FORMS, esd_target
from unlearn.methods.base import UnlearnModule, first_samples
from unlearn.methods.distill import stop_timesteps
from unlearn.models import encode_prompts
from unlearn.models.sampling import sample_until

PROMPT_SOURCES = ("target_prompts", "concept_text")
# Which UNet samples x_t: the one being fine-tuned (train-esd.py, the paper's code) or the frozen original (the
# later diffusers script esd_sd.py).
SAMPLE_WITH = ("current", "original")
# The t the loss uses for x_t stopped after DDIM step k: uniform over the training-schedule slice that step stands
# for (train-esd.py's t_ddpm), or the DDIM step's own timestep (esd_sd.py: `scheduler.timesteps[k]`).
TIMESTEPS = ("slice", "step")


class ESD(UnlearnModule):
    def __init__(self, components, name: str = "esd_x", steps: int = 1000, negative_guidance: float = 1.0,
                 lr: float = 1e-5, trainable: str = "cross_attn", sample_with: str = "current",
                 sample_steps: int = 50, guidance_scale: float = 3.0, prompt_source: str = "target_prompts",
                 concept_text: str | None = None, concept_target: str | list[str] | None = None,
                 target_form: str = "paper", timestep: str = "slice", batch_size: int | None = None,
                 log_every: int = 10):
        for value, allowed, key in ((prompt_source, PROMPT_SOURCES, "prompt_source"),
                                    (sample_with, SAMPLE_WITH, "sample_with"), (target_form, ESD_FORMS, "target_form"),
                                    (timestep, TIMESTEPS, "timestep")):
            if value not in allowed:
                raise ValueError(f"unknown {key}={value!r}; choose one of {allowed}")
        # Negative eta would train the model toward the concept (positive guidance): the opposite of erasing.
        for value, key, ok, allowed in ((negative_guidance, "negative_guidance", negative_guidance >= 0, ">= 0"),
                                        (lr, "lr", lr > 0, "> 0"),
                                        (sample_steps, "sample_steps", sample_steps >= 1, "an integer >= 1"),
                                        (guidance_scale, "guidance_scale", guidance_scale >= 0, ">= 0"),
                                        (steps, "steps", steps >= 1, "an integer >= 1"),
                                        (batch_size, "batch_size", batch_size is None or batch_size >= 1,
                                         "an integer >= 1 or null (the data module's batch)")):
            if not ok:
                raise ValueError(f"{key}={value!r} is not allowed; it must be {allowed}")
        super().__init__(components, name, steps, trainable, frozen_copy=True, log_every=log_every)
        self.save_hyperparameters(ignore=["components"])
        encode = functools.partial(encode_prompts, components.tokenizer, components.text_encoder)
        self.register_buffer("uncond_emb", encode([""]), persistent=False)
        self.concept_prompts: list[str] = []
        concept_emb = None
        if prompt_source == "concept_text":
            text = concept_text if concept_text is not None else concept_target
            if isinstance(text, (list, tuple)):
                text = ", ".join(text)  # several concepts in one prompt, as ESD's comma-separated prompts
            if not text:
                raise ValueError(f"prompt_source=concept_text needs concept_text (got {concept_text!r}) or a "
                                 "concept config with `target`")
            self.concept_prompts = [text]
            concept_emb = encode([text])
        self.register_buffer("concept_emb", concept_emb, persistent=False)

    def configure_optimizers(self):
        # ESD: Adam with torch's defaults (no weight decay), constant lr, no gradient clipping.
        return torch.optim.Adam(self.trainable_parameters(), lr=self.hparams.lr)

    # ------------------------------------------------------------------ pieces
    def concept_embeddings(self, batch) -> torch.Tensor:
        """c, one row per sample: the batch's target prompts, or the one concept text repeated."""
        dtype = self.unet.dtype
        if self.concept_emb is None:
            return batch["target_emb"].to(dtype)
        return self.concept_emb.to(dtype).expand(batch["latents"].shape[0], -1, -1)

    @torch.no_grad()
    def sample_latents(self, c: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """ESD's x_t: sample c from N(0, I) with DDIM + CFG, stop after k ~ U{0..N-1} steps; t in k's slice.

        train-esd.py draws t_enc ~ U{0..N-1} counted from the clean end and t_ddpm ~ U[T t_enc/N, T (t_enc+1)/N);
        with k = N-1-t_enc that is exactly `stop_timesteps(k)`. Here x_t sits at DDIM timestep k, inside t's slice;
        the CompVis sampler's early stop leaves it ~2.5 DDIM steps cleaner than t (and fully denoised for t_enc 0
        and 1), an off-by-a-few we do not copy.
        """
        h, sched = self.hparams, self.scheduler
        unet = self.unet if h.sample_with == "current" else self.original
        sched.set_timesteps(h.sample_steps)  # the scheduler is shared; every user sets its own schedule
        z = torch.randn(shape, device=self.device, dtype=self.unet.dtype) * sched.init_noise_sigma
        k = int(torch.randint(0, h.sample_steps, ()))
        x_t = sample_until(unet, sched, c, self.uncond_emb, z, k, h.guidance_scale)
        if h.timestep == "step":
            return x_t, sched.timesteps[k].to(self.device).expand(shape[0]).clone()
        t = stop_timesteps(k, h.sample_steps, sched.config.num_train_timesteps, shape[0], device=self.device)
        return x_t, t

    def esd_loss(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """MSE between eps_theta(x_t, c, t) and the frozen original's negatively guided answer."""
        uncond = self.uncond_emb.to(c.dtype).expand(c.shape[0], -1, -1)
        with torch.no_grad():  # both frozen predictions in one batched forward pass
            e_0, e_c = self.eps(self.original, x_t.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([uncond, c])).chunk(2)
            target = esd_target(e_0, e_c, self.hparams.negative_guidance, form=self.hparams.target_form)
        return F.mse_loss(self.eps(self.unet, x_t, t, c), target)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        batch = first_samples(batch, self.hparams.batch_size)
        c = self.concept_embeddings(batch)
        x_t, t = self.sample_latents(c, batch["latents"].shape)
        loss = self.esd_loss(x_t, t, c)
        self.track({"train/loss": loss}, prog_bar=True)
        self.advance()
        return loss
