"""Concept recovery by partial diffusion: CCS and CRS (Sharma et al. 2024, "Unlearning or Concealment?").

The original model denoises the first fraction psi of the sampling schedule from the prompt's seed, the unlearned
model finishes it. If the unlearned model only *conceals* the concept, a little of the original's trajectory is
enough for it to come back. Definitions, read from the authors' notebook (respailab/unlearning-or-concealment,
CCS_CRS.ipynb; the robust-erasure paper's Table 2 quotes the scores but defines neither):

- psi grid: 0.001, 0.01, 0.05, 0.15, ..., 0.55; the hand-off follows diffusers' `denoising_end`: the original runs
  the steps whose timestep is >= round(T (1 - psi)) (so with 20 DDIM steps psi <= 0.045 hands over at once).
- CCS (Concept Confidence Score) = 100 x mean over psi (and over images) of P(original | partial-diffusion image),
  P from a binary classifier trained on the original model's vs the unlearned model's images of the same prompts
  (the authors fine-tune a ResNet; here a logistic regression on CLIP image features).
- CRS (Concept Retrieval Score) = mean over psi of | s(psi, original) - s(psi, unlearned) |, with s(psi, ref) the
  mean over images of (1 - arctan(cos(f(partial image), f(ref image)))) / (pi / 2): how much closer the recovered
  images sit to the original's images than to the unlearned model's. `retain=True` gives the notebook's retain-set
  form 1 - that mean.

Differences from the notebook, each deliberate: DDIM with eta 0 (deterministic, as every number here) instead of
eta 1; one partial-diffusion image per (prompt, seed) instead of one image for all seeds; features from the
evaluation CLIP instead of ResNet-50.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# The authors' grid: [0.001, 0.01] + [x / 100 for x in range(5, 60, 10)].
PSI_GRID: tuple[float, ...] = (0.001, 0.01, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55)


def check_psi(psis: Sequence[float], key: str = "recovery.psi") -> list[float]:
    """Every psi strictly inside (0, 1); a ValueError naming the first bad value otherwise."""
    out = []
    if isinstance(psis, (int, float)):
        psis = [psis]
    if len(psis) == 0:
        raise ValueError(f"{key} is empty; give fractions in (0, 1), e.g. {list(PSI_GRID)}")
    for p in psis:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise ValueError(f"{key} contains {p!r}, not a number; each psi must be in (0, 1)") from None
        if not 0.0 < v < 1.0:
            raise ValueError(f"{key} contains {p!r}, outside (0, 1): psi is the fraction of the schedule the "
                             "original model denoises")
        out.append(v)
    return out


def handoff_index(timesteps: Sequence[int], psi: float, num_train_timesteps: int = 1000) -> int:
    """How many of `timesteps` (descending) the original model runs: those >= round(T - psi T) (diffusers'
    `denoising_end` rule)."""
    cutoff = round(num_train_timesteps - psi * num_train_timesteps)
    return sum(1 for t in timesteps if int(t) >= cutoff)


def arctan_similarity(cos: Tensor) -> Tensor:
    """The notebook's similarity transform of a cosine: (1 - arctan(cos)) / (pi / 2)."""
    return (1.0 - torch.atan(cos)) / (math.pi / 2)


def concept_retrieval_score(cos_to_original: Tensor, cos_to_unlearned: Tensor, retain: bool = False) -> float:
    """CRS from (P, N) cosines between each psi's partial-diffusion image n and the original's / the unlearned
    model's image of the same prompt and seed."""
    if cos_to_original.shape != cos_to_unlearned.shape or cos_to_original.dim() != 2:
        raise ValueError(f"expected two (psi, images) tensors of one shape, got {tuple(cos_to_original.shape)} and "
                         f"{tuple(cos_to_unlearned.shape)}")
    s_o = arctan_similarity(cos_to_original.double()).mean(1)
    s_u = arctan_similarity(cos_to_unlearned.double()).mean(1)
    diff = (s_o - s_u).abs().mean().item()
    return 1.0 - diff if retain else diff


def concept_confidence_score(p_original: Tensor) -> float:
    """CCS = 100 x mean of P(original) over psi and images ((P, N) or (P,))."""
    return 100.0 * p_original.double().mean().item()


# ---------------------------------------------------------------- the original-vs-unlearned classifier
def fit_logistic(features: Tensor, labels: Tensor, l2: float = 1e-3, steps: int = 200) -> tuple[Tensor, Tensor]:
    """L2-regularised logistic regression (label 1 = original) by full-batch L-BFGS: deterministic, no sklearn.
    The caller standardises the features."""
    x = features.double()
    y = labels.double()
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected (N, D) features and (N,) labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    if set(y.unique().tolist()) - {0.0, 1.0}:
        raise ValueError("labels must be 0 (unlearned) or 1 (original)")
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def predict_logistic(weights: tuple[Tensor, Tensor], features: Tensor) -> Tensor:
    w, b = weights
    return torch.sigmoid(features.double() @ w + b).float()


# ---------------------------------------------------------------- partial diffusion
@torch.no_grad()
def denoise_steps(unet, scheduler, cond: Tensor, uncond: Tensor, latents: Tensor, start: int, stop: int,
                  guidance_scale: float) -> Tensor:
    """Steps [start, stop) of `scheduler.timesteps`, DDIM + CFG as `unlearn.models.sampling.generate`."""
    cond = cond.to(latents)
    uncond = uncond.to(latents).expand(latents.shape[0], -1, -1)
    for t in scheduler.timesteps[start:stop]:
        inp = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        latents = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, latents).prev_sample
    return latents


@torch.no_grad()
def partial_diffusion(components, original_unet, unlearned_unet, prompts: list[str], seeds: list[int],
                      psis: Sequence[float], steps: int = 20, guidance_scale: float = 3.0) -> dict[float, Tensor]:
    """{psi: images (N,3,H,W) in [0,1]}: the original denoises the first fraction psi, the unlearned model the rest.
    The original's part is shared: each psi continues from the same trajectory."""
    from unlearn.models.sampling import initial_latents
    from unlearn.models.text import encode_prompts

    psis = check_psi(psis)
    vae, sched = components.vae, components.scheduler
    device, dtype = next(original_unet.parameters()).device, next(original_unet.parameters()).dtype
    size = original_unet.config.sample_size
    cond = encode_prompts(components.tokenizer, components.text_encoder, list(prompts)).to(device, dtype)
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""]).to(device, dtype)
    sched.set_timesteps(steps)
    lat = initial_latents(seeds, (original_unet.config.in_channels, size, size), device, dtype)
    lat = lat * sched.init_noise_sigma
    t_total = int(sched.config.num_train_timesteps)
    out, done = {}, 0
    for psi in sorted(psis):
        k = handoff_index(sched.timesteps, psi, t_total)
        lat = denoise_steps(original_unet, sched, cond, uncond, lat, done, k, guidance_scale)
        done = k
        z = denoise_steps(unlearned_unet, sched, cond, uncond, lat, k, len(sched.timesteps), guidance_scale)
        img = vae.decode(z / vae.config.scaling_factor).sample
        out[psi] = (img.float() / 2 + 0.5).clamp(0, 1).cpu()
    return out


@torch.no_grad()
def recovery_scores(encoder, original_images: Tensor, unlearned_images: Tensor, partial: dict[float, Tensor],
                    l2: float = 1e-3) -> dict:
    """CCS and CRS from the two models' images of the same (prompt, seed)s and the partial-diffusion images.

    The classifier is trained on all original (label 1) and unlearned (label 0) images, then scores the partial
    images; features are the encoder's unit image embeddings, centred and scaled by the training set's statistics.
    """
    f_o = encoder.image_features(original_images).cpu()
    f_u = encoder.image_features(unlearned_images).cpu()
    x = torch.cat([f_o, f_u])
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    weights = fit_logistic((x - mu) / sd, torch.cat([torch.ones(len(f_o)), torch.zeros(len(f_u))]), l2=l2)
    train_acc = ((predict_logistic(weights, (x - mu) / sd) > 0.5).float()
                 == torch.cat([torch.ones(len(f_o)), torch.zeros(len(f_u))])).float().mean().item()
    psis = sorted(partial)
    probs, cos_o, cos_u = [], [], []
    for psi in psis:
        f_p = encoder.image_features(partial[psi]).cpu()
        probs.append(predict_logistic(weights, (f_p - mu) / sd))
        cos_o.append((f_p * f_o).sum(-1))
        cos_u.append((f_p * f_u).sum(-1))
    probs, cos_o, cos_u = torch.stack(probs), torch.stack(cos_o), torch.stack(cos_u)
    return {"ccs": concept_confidence_score(probs), "crs": concept_retrieval_score(cos_o, cos_u),
            "p_original_by_psi": {str(p): probs[i].mean().item() for i, p in enumerate(psis)},
            "classifier_train_accuracy": 100.0 * train_acc}
