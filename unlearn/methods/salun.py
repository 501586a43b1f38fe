"""SalUn (Fan et al., ICLR 2024): random-label unlearning restricted to the salient weights.

Before training (`setup`, so a resumed run rebuilds the same from the original weights) the method
1. draws the forget set: the original model's images of the concept's target prompts (DDIM + CFG, the model
   config's sampler, seeds forget_seed + i; image i uses the prepared set's pair i % P), each kept with its
   target prompt and the anchor prompt of its pair;
2. sums over that set the gradient of the guided forgetting loss (`guided_forget_loss`) w.r.t. every UNet weight
   and keeps the top `mask_ratio` of |gradient| under one global threshold (`saliency_mask`).
Each iteration then takes the next forget images in order and the prepared batch as retain data:

    L = || eps(x_t, c_target) - sg(eps(x_t, c_anchor)) ||^2  +  alpha || eps(x'_t, c_anchor) - noise' ||^2

(forget images with their prompt replaced by the anchor's; anchor images with their own prompt), and zeroes every
gradient entry outside the mask before the optimizer's step. conf/method/salun.yaml names the released code.
"""

from __future__ import annotations

import torch

from unlearn.losses.diffusion import diffusion_loss
from unlearn.losses.saliency import guided_forget_loss, mask_gradients, random_label_loss, saliency_mask
from unlearn.methods.base import UnlearnModule
from unlearn.models.sampling import initial_latents, sample_until


class SalUn(UnlearnModule):
    def __init__(self, components, name: str = "salun", steps: int = 100, alpha: float = 0.5, lr: float = 1e-5,
                 betas=(0.9, 0.999), adam_eps: float = 1e-8, max_grad_norm: float | None = None,
                 mask_ratio: float = 0.5, mask_guidance: float = 7.5, mask_batch_size: int = 8,
                 forget_images: int = 16, forget_seed: int = 1_000_000, sample_steps: int = 50,
                 sample_guidance: float = 7.5, trainable: str = "all", log_every: int = 10):
        for key, ok in (("alpha", alpha >= 0), ("lr", lr > 0), ("mask_ratio", 0 < mask_ratio <= 1),
                        ("mask_guidance", mask_guidance >= 0), ("mask_batch_size", int(mask_batch_size) >= 1),
                        ("forget_images", int(forget_images) >= 1), ("sample_steps", int(sample_steps) >= 1),
                        ("steps", int(steps) >= 1),
                        ("max_grad_norm", max_grad_norm is None or max_grad_norm > 0)):
            if not ok:
                raise ValueError(f"{key}={locals()[key]!r} is not allowed (see conf/method/salun.yaml)")
        super().__init__(components, name, steps, trainable, frozen_copy=False, log_every=log_every)
        self.save_hyperparameters(ignore=["components"])
        self.forget: dict[str, torch.Tensor] | None = None  # latents, target_emb, pseudo_emb
        self.mask: dict[str, torch.Tensor] | None = None

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        from unlearn.validate import number

        m, out = cfg["method"], super().validate_config(cfg)
        out += number("method.alpha", m.get("alpha"), 0, hint=" (the retain loss's weight)")
        out += number("method.mask_ratio", m.get("mask_ratio"), 0, 1, lo_open=True,
                      hint=" (the fraction of UNet weights that train)")
        out += number("method.mask_guidance", m.get("mask_guidance"), 0)
        out += number("method.sample_guidance", m.get("sample_guidance"), 0)
        for key in ("mask_batch_size", "forget_images", "sample_steps"):
            out += number(f"method.{key}", m.get(key), 1, integer=True)
        out += number("method.forget_seed", m.get("forget_seed"), 0, integer=True)
        return out

    # ------------------------------------------------------------------ before training
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.forget is not None:  # given by the caller (tests) or built already
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "plan"):
            raise RuntimeError("salun needs the prepared data module: its target/anchor pairs make the forget set")
        dm.setup("fit")
        pairs = [dm.dataset[j] for j in range(len(dm.plan.pairs))]  # images 0..P-1 cover every pair once
        chosen = [pairs[i % len(pairs)] for i in range(self.hparams.forget_images)]
        self.prepare_forgetting(torch.stack([p["target_emb"] for p in chosen]),
                                torch.stack([p["anchor_emb"] for p in chosen]), dm.uncond_emb,
                                device=self.trainer.strategy.root_device)

    def prepare_forgetting(self, target_emb: torch.Tensor, pseudo_emb: torch.Tensor, uncond_emb: torch.Tensor,
                           device: torch.device | None = None) -> None:
        """Draw the forget set from the UNet as it is now (the original) and compute the saliency mask."""
        h = self.hparams
        self.to(device or self.device)  # setup runs before Lightning moves the module: the UNet and its buffers
        dev, dtype = next(self.unet.parameters()).device, self.unet.dtype
        target_emb, pseudo_emb = target_emb.to(dev, dtype), pseudo_emb.to(dev, dtype)
        uncond = uncond_emb.to(dev, dtype).reshape(1, *target_emb.shape[1:])
        c = self.unet.config
        seeds = [h.forget_seed + i for i in range(len(target_emb))]
        self.scheduler.set_timesteps(h.sample_steps)
        latents = []
        for s in range(0, len(seeds), h.mask_batch_size):
            x = initial_latents(seeds[s:s + h.mask_batch_size], (c.in_channels, c.sample_size, c.sample_size),
                                dev, dtype) * self.scheduler.init_noise_sigma
            latents.append(sample_until(self.unet, self.scheduler, target_emb[s:s + h.mask_batch_size], uncond, x,
                                        len(self.scheduler.timesteps), h.sample_guidance))
        self.forget = {"latents": torch.cat(latents), "target_emb": target_emb, "pseudo_emb": pseudo_emb}
        self.mask = saliency_mask(self.forget_gradients(uncond), h.mask_ratio)

    def forget_gradients(self, uncond: torch.Tensor) -> dict[str, torch.Tensor]:
        """The guided forgetting loss's gradient w.r.t. every UNet weight (frozen ones too), summed over the forget
        set in batches of mask_batch_size; its own generator, so the training stream is not moved."""
        h, f = self.hparams, self.forget
        params = dict(self.unet.named_parameters())
        trained = {n: p.requires_grad for n, p in params.items()}
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        gen = torch.Generator(device=f["latents"].device).manual_seed(h.forget_seed)
        was_training = self.unet.training
        self.unet.eval().requires_grad_(True)  # released: model.eval() for the mask
        try:
            for s in range(0, len(f["latents"]), h.mask_batch_size):
                x0, c = f["latents"][s:s + h.mask_batch_size], f["target_emb"][s:s + h.mask_batch_size]
                t = torch.randint(0, len(self.alphas_cumprod), (len(x0),), device=x0.device, generator=gen)
                noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=gen)
                a = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
                loss = guided_forget_loss(self.eps(self.unet, x_t, t, c),
                                          self.eps(self.unet, x_t, t, uncond.expand_as(c)), noise, h.mask_guidance)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        sums[n] += g
        finally:
            self.unet.train(was_training)
            for n, p in params.items():
                p.requires_grad_(trained[n])
        return sums

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        h = self.hparams  # released code: Adam, constant lr, no weight decay
        return torch.optim.Adam(self.trainable_parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.adam_eps)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=float(self.hparams.max_grad_norm),
                                gradient_clip_algorithm="norm")
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        # After backward, before clipping and the step: Adam then never moves an entry outside the mask.
        mask_gradients(self.unet.named_parameters(), self.mask)

    def forget_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The next n forget items in order (cycling), placed by the iteration count so a resumed run agrees."""
        size = len(self.forget["latents"])
        idx = torch.arange(self.done_iterations * n, (self.done_iterations + 1) * n) % size
        return {k: v[idx.to(v.device)] for k, v in self.forget.items()}

    def loss(self, batch) -> dict[str, torch.Tensor]:
        dtype = self.unet.dtype
        f = self.forget_batch(batch["latents"].shape[0])
        x_t, _, t = self.noise(f["latents"].to(dtype))
        with torch.no_grad():  # the released code detaches this answer
            e_pseudo = self.eps(self.unet, x_t, t, f["pseudo_emb"])
        forget = random_label_loss(self.eps(self.unet, x_t, t, f["target_emb"]), e_pseudo)
        r_t, r_noise, rt = self.noise(batch["latents"].to(dtype))
        retain = diffusion_loss(self.eps(self.unet, r_t, rt, batch["anchor_emb"].to(dtype)), r_noise)
        return {"total": forget + self.hparams.alpha * retain, "forget": forget, "retain": retain}

    def training_step(self, batch, batch_idx):
        out = self.loss(batch)
        self.track({"train/loss": out["total"]}, prog_bar=True)
        self.track({"train/forget_loss": out["forget"], "train/retain_loss": out["retain"]})
        self.advance()
        return out["total"]

    def records(self) -> dict[str, dict]:
        if self.mask is None:
            return {}
        kept = {n: int(m.sum()) for n, m in self.mask.items()}
        trained = [n for n in self.trainable_names if n in kept]
        return {"saliency_mask.json": {"ratio": self.hparams.mask_ratio, "kept": sum(kept.values()),
                                  "total": sum(m.numel() for m in self.mask.values()),
                                  "kept_in_trained": sum(kept[n] for n in trained),
                                  "trained_total": sum(self.mask[n].numel() for n in trained),
                                  "forget_images": len(self.forget["latents"])}}
