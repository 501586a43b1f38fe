"""EMA self-distillation (SDD, Kim et al. 2023) with the L2 / JS / Cramer-Wold distances of "Towards robust
concept erasure in diffusion models".

The student (`self.unet`) learns to answer the concept prompt c_s as it answers the empty prompt on the same z_t:
L = D(eps_s(z_t, c_s, t), sg(eps_s(z_t, "", t)))  (Eq. 2), with D = l2 | js | cw. After every optimizer step the
teacher, an EMA copy of the student, moves toward it (Eq. 3, SDD's phi = EMA); the teacher is the model kept.
z_t comes from the teacher itself, sampling the concept prompt with DDIM + CFG and stopping at a random step
(`latents: teacher`, SDD), or from the prepared anchor latents noised at a random t (`latents: data`).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from unlearn.losses import CW_SAMPLES, cramer_wold_distance, js_divergence, l2_distance
from unlearn.methods.base import UnlearnModule, first_samples
from unlearn.methods.ema import ema_update
from unlearn.models import encode_prompts, generate
from unlearn.models.sampling import sample_until
from unlearn.utils.grid import make_grid, save_grid

LOSSES = ("l2", "js", "cw")
LATENTS = ("teacher", "data")
PROMPT_SOURCES = ("target_prompts", "concept_text")
CW_LOG_FLOOR = 1e-12
PREVIEW_PROMPTS = 2  # columns of the teacher-vs-student grid


def stop_timesteps(stop_index: int, num_steps: int, num_train_timesteps: int, n: int, device=None) -> torch.Tensor:
    """The student's t for z_t drawn after `stop_index` of `num_steps` DDIM steps (SDD's `t_ddpm`).

    Uniform over the slice of the training schedule that DDIM step stands for,
    [T (1 - (k+1)/N), T (1 - k/N)), which holds the DDIM timestep z_t sits at ("leading" spacing, SD's).
    """
    lo = round((1 - (stop_index + 1) / num_steps) * num_train_timesteps)
    hi = round((1 - stop_index / num_steps) * num_train_timesteps)
    return torch.randint(lo, hi, (n,), device=device)


class SelfDistill(UnlearnModule):
    def __init__(self, components, name: str = "distill", steps: int = 1500, loss: str = "l2", tau: float = 1.0,
                 gamma: float | None = None, cw_samples: str = "batch", cw_log: bool = False,
                 ema_decay: float = 0.999, lr: float = 1e-5, weight_decay: float = 1e-4,
                 max_grad_norm: float | None = 1.0, trainable: str = "cross_attn",
                 latents: str = "teacher", sample_steps: int = 50, guidance_scale: float = 3.0,
                 prompt_source: str = "target_prompts", concept_text: str | None = None,
                 concept_target: str | list[str] | None = None, sample_every: int = 0, log_every: int = 10,
                 loss_weight: float = 1.0, batch_size: int | None = None):
        for value, allowed, key in ((loss, LOSSES, "loss"), (latents, LATENTS, "latents"),
                                    (cw_samples, CW_SAMPLES, "cw_samples"),
                                    (prompt_source, PROMPT_SOURCES, "prompt_source")):
            if value not in allowed:
                raise ValueError(f"unknown {key}={value!r}; choose one of {allowed}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        if sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {sample_steps}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or null (the data module's batch), got {batch_size}")
        super().__init__(components, name, steps, trainable, frozen_copy=False, log_every=log_every)
        self.save_hyperparameters(ignore=["components"])
        # The teacher starts as the original model and only ever moves by EMA; it is what `export` saves.
        self.teacher = copy.deepcopy(self.unet).requires_grad_(False).eval()
        encode = functools.partial(encode_prompts, components.tokenizer, components.text_encoder)
        self.register_buffer("uncond_emb", encode([""]), persistent=False)
        self.concept_prompts: list[str] = []
        concept_emb = None
        if prompt_source == "concept_text":
            text = concept_text if concept_text is not None else concept_target
            if isinstance(text, (list, tuple)):
                text = ", ".join(text)  # several concepts in one prompt: SDD's "composite" c_p
            if not text:
                raise ValueError("prompt_source=concept_text needs concept_text, or a concept config with `target`")
            self.concept_prompts = [text]
            concept_emb = encode([text])
        self.register_buffer("concept_emb", concept_emb, persistent=False)

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        from unlearn.validate import Problem, choice, flag, number

        m, out = cfg["method"], super().validate_config(cfg)
        out += choice("method.loss", m.get("loss"), LOSSES)
        out += choice("method.latents", m.get("latents"), LATENTS)
        out += choice("method.cw_samples", m.get("cw_samples"), CW_SAMPLES)
        out += choice("method.prompt_source", m.get("prompt_source"), PROMPT_SOURCES)
        out += number("method.ema_decay", m.get("ema_decay"), 0, 1, hint=" (the teacher's EMA rate)")
        out += number("method.tau", m.get("tau"), 0, lo_open=True)
        out += number("method.gamma", m.get("gamma"), 0, lo_open=True, optional=True,
                      hint=" (null = Silverman's rule)")
        out += number("method.weight_decay", m.get("weight_decay"), 0)
        out += number("method.sample_steps", m.get("sample_steps"), 1, integer=True)
        out += number("method.guidance_scale", m.get("guidance_scale"), 0)
        out += number("method.sample_every", m.get("sample_every"), 0, integer=True, hint=" (0 = off)")
        out += number("method.loss_weight", m.get("loss_weight"), 0, lo_open=True)
        out += number("method.batch_size", m.get("batch_size"), 1, integer=True, optional=True,
                      hint=" (null = the data module's batch)")
        out += flag("method.cw_log", m.get("cw_log"))
        key, batch = "data.batch_size", (cfg.get("data") or {}).get("batch_size")
        if isinstance(m.get("batch_size"), int):
            key, batch = "method.batch_size", m["batch_size"]
        if m.get("loss") == "cw" and m.get("cw_samples") == "batch" and isinstance(batch, int) and batch < 2:
            out.append(Problem(key, batch, ">= 2 with method.loss=cw and cw_samples=batch (one point "
                                           "per side makes CW a function of the L2 distance)"))
        if m.get("prompt_source") == "concept_text" and not (m.get("concept_text") or m.get("concept_target")):
            out.append(Problem("method.concept_text", m.get("concept_text"),
                               "a text with prompt_source=concept_text (the concept config has no `target`)"))
        return out

    # ------------------------------------------------------------------ pieces
    def configure_optimizers(self):
        h = self.hparams  # SDD: AdamW, betas (0.9, 0.999), eps 1e-8 (torch defaults), constant lr
        return torch.optim.AdamW(self.trainable_parameters(), lr=h.lr, weight_decay=h.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=float(self.hparams.max_grad_norm),
                                gradient_clip_algorithm="norm")
        else:  # the trainer's own setting, if any
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        if h.loss == "l2":
            return l2_distance(a, b)
        if h.loss == "js":
            return js_divergence(a, b, tau=h.tau)
        d2 = cramer_wold_distance(a, b, gamma=h.gamma, samples=h.cw_samples)
        # CWAE's cost is log d^2: scale-free, so its gradients do not shrink with d^2 (floored to stay finite).
        return torch.log(d2.clamp_min(CW_LOG_FLOOR)) if h.cw_log else d2

    def paired_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) trainable tensors, in the same order."""
        teacher, student = dict(self.teacher.named_parameters()), dict(self.unet.named_parameters())
        return [teacher[n] for n in self.trainable_names], [student[n] for n in self.trainable_names]

    @torch.no_grad()
    def student_teacher_distance(self) -> torch.Tensor:
        teacher, student = self.paired_parameters()
        return torch.sqrt(sum((s.float() - t.float()).pow(2).sum() for t, s in zip(teacher, student)))

    def concept_embeddings(self, batch) -> torch.Tensor:
        """c_s, one row per sample: the batch's target prompts, or the one concept text repeated."""
        dtype = self.unet.dtype
        if self.concept_emb is None:
            return batch["target_emb"].to(dtype)
        n = batch["latents"].shape[0] if "latents" in batch else batch["target_emb"].shape[0]
        return self.concept_emb.to(dtype).expand(n, -1, -1)

    @torch.no_grad()
    def teacher_latents(self, c_s: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """SDD's z_t: the teacher samples c_s from N(0, I) with DDIM + CFG and stops after a random step k."""
        h, sched = self.hparams, self.scheduler
        n = c_s.shape[0]
        if "latents" in batch:
            shape = batch["latents"].shape
        else:
            shape = (n, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        sched.set_timesteps(h.sample_steps)  # the scheduler is shared; every user sets its own schedule
        z = torch.randn(shape, device=self.device, dtype=self.unet.dtype) * sched.init_noise_sigma
        # k in [0, N): z_T itself at k = 0 (SDD's loop would run all N steps there: an off-by-one we do not copy).
        k = int(torch.randint(0, h.sample_steps, ()))
        z_t = sample_until(self.teacher, sched, c_s, self.uncond_emb, z, k, h.guidance_scale)
        t = stop_timesteps(k, h.sample_steps, sched.config.num_train_timesteps, n, device=self.device)
        return z_t, t

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        batch = first_samples(batch, self.hparams.batch_size)
        c_s = self.concept_embeddings(batch)
        if self.hparams.latents == "teacher":
            z_t, t = self.teacher_latents(c_s, batch)
        else:
            z_t, _, t = self.noise(batch["latents"].to(self.unet.dtype))
        uncond = self.uncond_emb.to(c_s.dtype).expand(c_s.shape[0], -1, -1)
        with torch.no_grad():  # sg(.): the target is the student's own unconditional answer
            e_0 = self.eps(self.unet, z_t, t, uncond)
        e_s = self.eps(self.unet, z_t, t, c_s)
        # AdamW is nearly scale-free, so the weight matters mostly against gradient clipping (max_grad_norm).
        loss = self.hparams.loss_weight * self.distance(e_s, e_0)
        self.track({"train/loss": loss}, prog_bar=True)
        self.advance()
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        teacher, student = self.paired_parameters()  # frozen tensors are equal in both and stay so
        ema_update(teacher, student, self.hparams.ema_decay)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        every, it = self.hparams.sample_every, self.done_iterations
        if self.is_log_iteration(it):  # a pass over every weight: not every iteration
            self.log("train/student_teacher_dist", self.student_teacher_distance())
        if every and it % every == 0 and self.trainer.is_global_zero:
            self.log_samples(self.preview_prompts(batch), it)

    # ------------------------------------------------------------------ samples, checkpoints, export
    def preview_prompts(self, batch) -> list[str]:
        if self.concept_prompts:
            return self.concept_prompts
        prompts = batch.get("target_prompt", [])
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return list(dict.fromkeys(prompts))[:PREVIEW_PROMPTS]

    @torch.no_grad()
    def log_samples(self, prompts: list[str], it: int) -> Path | None:
        """Teacher (top row) vs student (bottom row), fixed seeds: a PNG in the log dir, and W&B / TensorBoard."""
        if not prompts:
            return None
        h = self.hparams
        te, vae = self.components.text_encoder, self.components.vae
        homes = [next(m.parameters()).device for m in (te, vae)]
        te.to(self.device)  # generate() encodes and decodes where the UNet is
        vae.to(self.device)
        try:
            seeds = list(range(len(prompts)))
            rows = [generate(self.components, prompts, seeds, unet=u, steps=h.sample_steps,
                             guidance_scale=h.guidance_scale) for u in (self.teacher, self.unet)]
        finally:
            te.to(homes[0])
            vae.to(homes[1])
        images = torch.cat(rows).float().cpu()
        labels = [f"{who}: {p}" for who in ("teacher", "student") for p in prompts]
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
        path = save_grid(images, folder / f"teacher_student_{it:06d}.png", nrow=len(prompts), labels=labels)
        caption = f"iteration {it}: teacher (top) vs student (bottom); " + " | ".join(prompts)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/teacher_vs_student", [str(path)], step=self.global_step, caption=[caption])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/teacher_vs_student", make_grid(images, nrow=len(prompts)),
                                            global_step=self.global_step)
        return path

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # The teacher's frozen tensors equal the model folder's; keep only its trained subset, like the student's.
        keep = {f"teacher.{n}" for n in self.trainable_names}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in keep or not k.startswith("teacher.")}

    def export_unet(self):
        return self.teacher
