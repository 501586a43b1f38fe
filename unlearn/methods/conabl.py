"""Concept Ablation (Kumari et al. 2023): make the target prompt c* produce what the anchor prompt c produces.

Each iteration noises a batch of anchor images (made by the original model from anchor prompts) at a uniform t and
regresses the UNet's c*-conditioned prediction onto either its own c-conditioned prediction under stop-gradient
(`variant: model`) or the true noise (`variant: noise`); `prior_weight > 0` adds the anchor prompt's diffusion loss
on the same x_t. The loss is `unlearn.losses.concept_ablation_loss`; conf/method/conabl.yaml lists the released
code's defaults taken and where this implementation departs.
"""

from __future__ import annotations

import torch

from unlearn.losses import ABLATION_VARIANTS, AblationLoss, concept_ablation_loss
from unlearn.methods.base import UnlearnModule
from unlearn.nets.attention import detach_first_token


class ConceptAblation(UnlearnModule):
    def __init__(self, components, name: str = "conabl", steps: int = 100, variant: str = "model",
                 prior_weight: float = 0.0, lr: float = 1.6e-5, betas=(0.9, 0.999), weight_decay: float = 1e-2,
                 adam_eps: float = 1e-8, max_grad_norm: float | None = 1.0, trainable: str = "cross_attn_kv",
                 detach_start_token: bool = False, log_every: int = 10):
        if variant not in ABLATION_VARIANTS:
            raise ValueError(f"unknown variant={variant!r}; choose one of {ABLATION_VARIANTS}")
        if prior_weight is None or prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0 (0 = off), got prior_weight={prior_weight!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got lr={lr!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null (off), got max_grad_norm={max_grad_norm!r}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got steps={steps!r}")
        super().__init__(components, name, steps, trainable, frozen_copy=False, log_every=log_every)
        self.save_hyperparameters(ignore=["components"])
        # The released code's attention processor: no gradient through the start token's key and value.
        self._sot_hooks = detach_first_token(self.unet) if detach_start_token else []

    def configure_optimizers(self):
        h = self.hparams  # released code: AdamW, constant lr
        return torch.optim.AdamW(self.trainable_parameters(), lr=h.lr, betas=tuple(h.betas),
                                 weight_decay=h.weight_decay, eps=h.adam_eps)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=float(self.hparams.max_grad_norm),
                                gradient_clip_algorithm="norm")
        else:  # the trainer's own setting, if any
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def predictions(self, batch, x_t: torch.Tensor, t: torch.Tensor):
        """(eps(x_t, c*, t), eps(x_t, c, t) or None): the anchor branch only where the loss reads it."""
        h, dtype = self.hparams, self.unet.dtype
        e_target = self.eps(self.unet, x_t, t, batch["target_emb"].to(dtype))
        if h.prior_weight > 0:  # the prior term needs its gradient; the `model` target is detached in the loss
            e_anchor = self.eps(self.unet, x_t, t, batch["anchor_emb"].to(dtype))
        elif h.variant == "model":  # sg(.): the current network's own anchor answer, no graph kept
            with torch.no_grad():
                e_anchor = self.eps(self.unet, x_t, t, batch["anchor_emb"].to(dtype))
        else:
            e_anchor = None
        return e_target, e_anchor

    def loss(self, batch) -> AblationLoss:
        """One batch's loss: noise the anchor latents at a uniform t, predict, regress (no logging, no counting)."""
        h = self.hparams
        x_t, noise, t = self.noise(batch["latents"].to(self.unet.dtype))
        e_target, e_anchor = self.predictions(batch, x_t, t)
        return concept_ablation_loss(e_target, e_anchor, noise, variant=h.variant, prior_weight=h.prior_weight)

    def training_step(self, batch, batch_idx):
        out = self.loss(batch)
        self.track({"train/loss": out.total}, prog_bar=True)
        self.track({"train/ablation_loss": out.ablation})
        if self.hparams.prior_weight > 0:
            self.track({"train/prior_loss": out.prior})
        self.advance()
        return out.total
