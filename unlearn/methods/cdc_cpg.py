"""CDC + CPG: adversarial Concept Domain Correction with the Concept Preserving Gradient.

A PatchGAN D learns whether the UNet's output for a noised anchor latent x_t was conditioned on the anchor c or the
target c*; the UNet (the generator) learns to make its c*-conditioned output pass for a c-conditioned one (Eq. 8).
The unlearning gradient G_u is reconciled with the retaining gradient G_r (plain diffusion loss on anchor data) by
Eq. 9 before the UNet steps. D alone trains for the first `warmup_steps` iterations.

Where the authors' released code (yongliang-wu/DoCo) departs from the paper, a switch selects either; the defaults
are the paper's, conf/method/cdc_cpg_official.yaml sets the code's (README's CDC+CPG table cites each one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from unlearn.data.order import ResumableBatches
from unlearn.losses import concept_preserving_gradient, gradient_conflict_tensors
from unlearn.methods.base import UnlearnModule
from unlearn.nets import PatchDiscriminator
from unlearn.nets.attention import detach_first_token

RETAIN = ("none", "l2", "cpg")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
CLIP_WHEN = ("after", "before")
RETAIN_BATCH = ("same", "separate")
WARMUP_COMPARE = ("ge", "gt")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {key}={value!r}; choose one of {tuple(allowed)}")


def clip_global_norm(grads: list[torch.Tensor | None], max_norm: float) -> list[torch.Tensor | None]:
    """`torch.nn.utils.clip_grad_norm_` as a pure function: scale every tensor by min(1, max_norm / (‖g‖ + 1e-6)),
    ‖g‖ the 2-norm of all of them together (None = not reached). Returns new tensors."""
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in present]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return [None if g is None else g * coef.to(g.dtype) for g in grads]


def resolve_d_lr(d_lr: float | None, d_lr_by_kind: dict | None, concept_kind: str | None) -> float:
    """D's learning rate: `d_lr` if set, else `d_lr_by_kind[concept_kind]` (DoCo's README sets it per concept type)."""
    if d_lr is not None:
        return float(d_lr)
    if not d_lr_by_kind or concept_kind not in d_lr_by_kind:
        raise ValueError(f"d_lr=None needs d_lr_by_kind with an entry for concept_kind={concept_kind!r}; "
                         f"d_lr_by_kind has {sorted(d_lr_by_kind or {})}")
    return float(d_lr_by_kind[concept_kind])


class CDCCPG(UnlearnModule):
    def __init__(self, components, name: str = "cdc_cpg", steps: int = 1000, warmup_steps: int = 200,
                 lr: float = 4e-6, betas=(0.9, 0.999), d_lr: float | None = 1e-4, d_betas=(0.9, 0.999),
                 retain: str = "cpg", retain_weight: float = 1.0, lam: float = 1.0, granularity: str = "global",
                 normalize: bool = False, trainable: str = "all", d_input: str = "eps",
                 real_branch: str = "current", discriminator: dict | None = None,
                 max_grad_norm: float | None = None, log_every: int = 10,
                 optimizer: str = "adam", weight_decay: float = 0.0, clip_when: str = "after",
                 detach_sot: bool = False, retain_batch: str = "same", retain_seed: int = 1,
                 warmup_compare: str = "ge", d_lr_by_kind: dict | None = None, concept_kind: str | None = None,
                 d_keeps_g_grad: bool = False):
        _choice("retain", retain, RETAIN)
        if d_input not in ("eps", "x0"):
            raise ValueError(f"unknown d_input={d_input!r}; choose 'eps' (paper) or 'x0' (official code)")
        if real_branch not in ("current", "frozen"):
            raise ValueError(f"unknown real_branch={real_branch!r}; choose 'current' (paper) or 'frozen'")
        _choice("optimizer", optimizer, OPTIMIZERS)
        _choice("clip_when", clip_when, CLIP_WHEN)
        _choice("retain_batch", retain_batch, RETAIN_BATCH)
        _choice("warmup_compare", warmup_compare, WARMUP_COMPARE)
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        d_lr = resolve_d_lr(d_lr, d_lr_by_kind, concept_kind)
        super().__init__(components, name, steps, trainable, frozen_copy=real_branch == "frozen", log_every=log_every)
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["components"])
        self.d_lr = d_lr
        self.disc = PatchDiscriminator(in_channels=self.unet.config.out_channels, **(discriminator or {}))
        # After the frozen copy is made: only the trained UNet needs (and gets) the detaching hooks.
        self._sot_hooks = detach_first_token(self.unet) if detach_sot else []
        self._retain_iter = None

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        from unlearn.losses.gradient_surgery import GRANULARITIES
        from unlearn.validate import choice, flag, number, pair

        m, out = cfg["method"], super().validate_config(cfg)
        out += choice("method.retain", m.get("retain"), RETAIN)
        out += choice("method.granularity", m.get("granularity"), GRANULARITIES)
        out += choice("method.d_input", m.get("d_input"), ("eps", "x0"))
        out += choice("method.real_branch", m.get("real_branch"), ("current", "frozen"))
        out += number("method.lam", m.get("lam"), 0, hint=" (Eq. 9's projection strength)")
        out += number("method.retain_weight", m.get("retain_weight"), 0)
        out += flag("method.normalize", m.get("normalize"))
        out += pair("method.betas", m.get("betas"), 0, 1) + pair("method.d_betas", m.get("d_betas"), 0, 1)
        out += number("method.d_lr", m.get("d_lr"), 0, lo_open=True, optional=True,
                      hint=" (null = d_lr_by_kind[concept kind])")
        for key, allowed in (("optimizer", OPTIMIZERS), ("clip_when", CLIP_WHEN), ("retain_batch", RETAIN_BATCH),
                             ("warmup_compare", WARMUP_COMPARE)):
            if key in m:
                out += choice(f"method.{key}", m[key], allowed)
        steps = m.get("steps")
        if isinstance(steps, int) and steps >= 1:  # the generator must train for at least one iteration
            out += number("method.warmup_steps", m.get("warmup_steps"), 0, steps, hi_open=True, integer=True,
                          hint=f" (below method.steps={steps}: D alone trains for these iterations)")
        disc = m.get("discriminator") or {}
        out += choice("method.discriminator.norm", disc.get("norm", "none"), ("none", "batch", "instance"))
        if "base_channels" in disc:
            out += number("method.discriminator.base_channels", disc["base_channels"], 1, integer=True)
        return out

    def configure_optimizers(self):
        h = self.hparams
        opt_g = OPTIMIZERS[h.optimizer](self.trainable_parameters(), lr=h.lr, betas=tuple(h.betas),
                                        weight_decay=h.weight_decay)
        opt_d = torch.optim.Adam(self.disc.parameters(), lr=self.d_lr, betas=tuple(h.d_betas))
        return [opt_g, opt_d]

    def d_view(self, eps, x_t, t):
        """What D sees: the predicted noise (paper) or the predicted clean latent (official code)."""
        return eps if self.hparams.d_input == "eps" else self.predict_x0(x_t, eps, t)

    def generator_active(self) -> bool:
        """Paper: G trains from iteration `warmup_steps` on; DoCo's `global_step > warm_up`: one iteration later."""
        it, w = self.done_iterations, self.hparams.warmup_steps
        return it > w if self.hparams.warmup_compare == "gt" else it >= w

    # ------------------------------------------------------------------ the retain batch
    def retained_so_far(self) -> int:
        """Retain batches drawn before this iteration: one per generator step (so a resumed run continues)."""
        it, w = self.done_iterations, self.hparams.warmup_steps
        return max(0, it - w - (1 if self.hparams.warmup_compare == "gt" else 0))

    def retain_batch(self) -> dict:
        """The next batch of a second shuffled stream over the training set, seeded apart from the main one: DoCo's
        retain ("class") image at index i is not the unlearning ("instance") image at i (utils.py shuffles only the
        instance list). The stream is the data order's own (unlearn/data/order.py), so it resumes and splits
        across ranks the same way."""
        if self._retain_iter is None:
            main = self.trainer.train_dataloader
            # The DataModule's loader batches through a batch_sampler; a plain DataLoader has batch_size.
            batch_size = main.batch_size or main.batch_sampler.batch_size
            batches = ResumableBatches(len(main.dataset), batch_size, int(self.hparams.retain_seed),
                                       start=self.retained_so_far(), rank=self.trainer.global_rank,
                                       world=self.trainer.world_size)
            self._retain_iter = iter(DataLoader(main.dataset, batch_sampler=batches, collate_fn=main.collate_fn))
        batch = next(self._retain_iter)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def retain_loss(self, x_t, noise, t, c):
        """The plain diffusion loss on anchor data: on the unlearning branch's x_t (paper) or on a separately drawn
        anchor batch with its own noise and timesteps (DoCo: the prior-preservation half of the batch)."""
        if self.hparams.retain_batch == "separate":
            rb = self.retain_batch()
            x_t, noise, t = self.noise(rb["latents"])
            c = rb["anchor_emb"]
        return F.mse_loss(self.eps(self.unet, x_t, t, c), noise)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        h = self.hparams
        opt_g, opt_d = self.optimizers()
        x_t, noise, t = self.noise(batch["latents"])
        c, c_star = batch["anchor_emb"], batch["target_emb"]
        real_net = self.original if self.original is not None else self.unet
        with torch.no_grad():
            real = self.d_view(self.eps(real_net, x_t, t, c), x_t, t)

        # Generator: after warm-up, G_u from fooling D on the target branch, G_r from the anchor diffusion loss.
        g_stepped = self.generator_active()
        if g_stepped:
            self.toggle_optimizer(opt_g)
            fake = self.d_view(self.eps(self.unet, x_t, t, c_star), x_t, t)
            logits = self.disc(fake)
            loss_u = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # "looks anchor"
            params = self.trainable_parameters()
            before = h.max_grad_norm and h.clip_when == "before"
            opt_g.zero_grad()
            self.manual_backward(loss_u)
            g_u = [None if p.grad is None else p.grad.clone() for p in params]
            if before:  # DoCo: each gradient clipped to max_grad_norm on its own, the result never
                g_u = clip_global_norm(g_u, h.max_grad_norm)
            g = g_u
            if h.retain != "none":
                opt_g.zero_grad()
                loss_r = self.retain_loss(x_t, noise, t, c)
                self.manual_backward(loss_r)
                g_r = [None if p.grad is None else p.grad.clone() for p in params]
                if before:
                    g_r = clip_global_norm(g_r, h.max_grad_norm)
                self.track({"train/retain_loss": loss_r})
                if self.logs_this_iteration():  # three passes over every gradient: only when logged
                    stats = gradient_conflict_tensors(g_u, g_r)
                    self.track({"train/cos_gu_gr": stats["cos"], "train/conflict": stats["conflict"]})
                if h.retain == "cpg":
                    g = concept_preserving_gradient(g_u, g_r, lam=h.lam, granularity=h.granularity,
                                                    normalize=h.normalize)
                else:  # l2: the retain loss simply added
                    g = [None if a is None else a + h.retain_weight * (b if b is not None else 0)
                         for a, b in zip(g_u, g_r)]
            for p, gi in zip(params, g):
                p.grad = gi
            if h.max_grad_norm and h.clip_when == "after":
                self.clip_gradients(opt_g, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
            opt_g.step()
            opt_g.zero_grad()
            self.untoggle_optimizer(opt_g)
            self.track({"train/g_loss": loss_u}, prog_bar=True)
            fake = fake.detach()
        else:
            with torch.no_grad():
                fake = self.d_view(self.eps(self.unet, x_t, t, c_star), x_t, t)

        # Discriminator: anchor-conditioned outputs are "real" (1), target-conditioned "fake" (0).
        self.toggle_optimizer(opt_d)
        lr_, lf = self.disc(real), self.disc(fake)
        loss_d = F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_)) + \
            F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
        if h.d_keeps_g_grad and g_stepped:
            # DoCo's train.py never zeroes D's gradients between G's backward (which reaches D's weights) and D's
            # step, so D also descends G's loss: the same D, the same fake input, G's label.
            loss_d = loss_d + F.binary_cross_entropy_with_logits(lf, torch.ones_like(lf))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        acc = 0.5 * ((lr_ > 0).float().mean() + (lf < 0).float().mean())
        self.track({"train/d_loss": loss_d, "train/d_acc": acc}, prog_bar=True)
        self.advance()
