"""CDC + CPG: adversarial Concept Domain Correction with the Concept Preserving Gradient.

A PatchGAN D learns whether the UNet's output for a noised anchor latent x_t was conditioned on the anchor c or the
target c*; the UNet (the generator) learns to make its c*-conditioned output pass for a c-conditioned one (Eq. 8).
The unlearning gradient G_u is reconciled with the retaining gradient G_r (plain diffusion loss on anchor data) by
Eq. 9 before the UNet steps. D alone trains for the first `warmup_steps` iterations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearn.losses import concept_preserving_gradient, gradient_conflict_stats
from unlearn.methods.base import UnlearnModule
from unlearn.nets import PatchDiscriminator

RETAIN = ("none", "l2", "cpg")


class CDCCPG(UnlearnModule):
    def __init__(self, components, name: str = "cdc_cpg", steps: int = 1000, warmup_steps: int = 200,
                 lr: float = 4e-6, betas=(0.9, 0.999), d_lr: float = 1e-4, d_betas=(0.9, 0.999),
                 retain: str = "cpg", retain_weight: float = 1.0, lam: float = 1.0, granularity: str = "global",
                 normalize: bool = False, trainable: str = "all", d_input: str = "eps",
                 real_branch: str = "current", discriminator: dict | None = None,
                 max_grad_norm: float | None = None, log_every: int = 10):
        if retain not in RETAIN:
            raise ValueError(f"unknown retain={retain!r}; choose one of {RETAIN}")
        if d_input not in ("eps", "x0"):
            raise ValueError(f"unknown d_input={d_input!r}; choose 'eps' (paper) or 'x0' (official code)")
        if real_branch not in ("current", "frozen"):
            raise ValueError(f"unknown real_branch={real_branch!r}; choose 'current' (paper) or 'frozen'")
        super().__init__(components, name, steps, trainable, frozen_copy=real_branch == "frozen", log_every=log_every)
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["components"])
        self.disc = PatchDiscriminator(in_channels=self.unet.config.out_channels, **(discriminator or {}))

    def configure_optimizers(self):
        h = self.hparams
        opt_g = torch.optim.Adam(self.trainable_parameters(), lr=h.lr, betas=tuple(h.betas))
        opt_d = torch.optim.Adam(self.disc.parameters(), lr=h.d_lr, betas=tuple(h.d_betas))
        return [opt_g, opt_d]

    def d_view(self, eps, x_t, t):
        """What D sees: the predicted noise (paper) or the predicted clean latent (official code)."""
        return eps if self.hparams.d_input == "eps" else self.predict_x0(x_t, eps, t)

    def training_step(self, batch, batch_idx):
        h = self.hparams
        opt_g, opt_d = self.optimizers()
        x_t, noise, t = self.noise(batch["latents"])
        c, c_star = batch["anchor_emb"], batch["target_emb"]
        real_net = self.original if self.original is not None else self.unet
        with torch.no_grad():
            real = self.d_view(self.eps(real_net, x_t, t, c), x_t, t)

        # Generator: after warm-up, G_u from fooling D on the target branch, G_r from the anchor diffusion loss.
        if int(self.iteration) >= h.warmup_steps:
            self.toggle_optimizer(opt_g)
            fake = self.d_view(self.eps(self.unet, x_t, t, c_star), x_t, t)
            logits = self.disc(fake)
            loss_u = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # "looks anchor"
            params = self.trainable_parameters()
            opt_g.zero_grad()
            self.manual_backward(loss_u)
            g_u = [None if p.grad is None else p.grad.clone() for p in params]
            if h.retain != "none":
                opt_g.zero_grad()
                loss_r = F.mse_loss(self.eps(self.unet, x_t, t, c), noise)
                self.manual_backward(loss_r)
                g_r = [None if p.grad is None else p.grad.clone() for p in params]
                stats = gradient_conflict_stats(g_u, g_r)
                self.log_dict({"train/retain_loss": loss_r.detach(), "train/cos_gu_gr": stats["cos"],
                               "train/conflict": float(stats["conflict"])})
                if h.retain == "cpg":
                    g = concept_preserving_gradient(g_u, g_r, lam=h.lam, granularity=h.granularity,
                                                    normalize=h.normalize)
                else:  # l2: the retain loss simply added
                    g = [None if a is None else a + h.retain_weight * (b if b is not None else 0)
                         for a, b in zip(g_u, g_r)]
                for p, gi in zip(params, g):
                    p.grad = gi
            if h.max_grad_norm:
                self.clip_gradients(opt_g, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
            opt_g.step()
            opt_g.zero_grad()
            self.untoggle_optimizer(opt_g)
            self.log("train/g_loss", loss_u.detach(), prog_bar=True)
            fake = fake.detach()
        else:
            with torch.no_grad():
                fake = self.d_view(self.eps(self.unet, x_t, t, c_star), x_t, t)

        # Discriminator: anchor-conditioned outputs are "real" (1), target-conditioned "fake" (0).
        self.toggle_optimizer(opt_d)
        lr_, lf = self.disc(real), self.disc(fake)
        loss_d = F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_)) + \
            F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        acc = 0.5 * ((lr_ > 0).float().mean() + (lf < 0).float().mean())
        self.log_dict({"train/d_loss": loss_d.detach(), "train/d_acc": acc.detach()}, prog_bar=True)
        self.advance()
