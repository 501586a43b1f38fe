"""Deterministic batched sampling: image i depends only on (prompt_i, seed_i), never on its batch-mates."""

from __future__ import annotations

import torch

from unlearn.models.text import encode_prompts


def initial_latents(seeds: list[int], shape: tuple[int, int, int], device, dtype) -> torch.Tensor:
    """One CPU generator per seed, so a sample is the same whatever batch or device it is drawn in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        device=device, dtype=dtype)


@torch.no_grad()
def generate(components, prompts: list[str], seeds: list[int], unet=None, steps: int = 25,
             guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
             negative_prompt: str = "", return_latents: bool = False):
    """DDIM (eta 0) + classifier-free guidance. Returns float images (B,3,H,W) in [0,1] (and x0 latents)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    unet = unet or components.unet
    vae, sched = components.vae, components.scheduler
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    height = height or unet.config.sample_size * scale
    width = width or unet.config.sample_size * scale
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    cond = encode_prompts(components.tokenizer, components.text_encoder, list(prompts)).to(dtype)
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [negative_prompt]).to(dtype)
    uncond = uncond.expand(len(prompts), -1, -1)
    lat = initial_latents(seeds, (unet.config.in_channels, height // scale, width // scale), device, dtype)
    sched.set_timesteps(steps)
    lat = lat * sched.init_noise_sigma
    for t in sched.timesteps:
        # ε or v, as the model predicts: the step reads the scheduler's prediction_type, and guidance combines the
        # two outputs with weights summing to one, which means the same in either (unlearn/models/prediction.py).
        inp = sched.scale_model_input(torch.cat([lat, lat]), t)
        eps_u, eps_c = unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        lat = sched.step(eps_u + guidance_scale * (eps_c - eps_u), t, lat).prev_sample
    images = vae.decode(lat / vae.config.scaling_factor).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images, lat) if return_latents else images


@torch.no_grad()
def sample_until(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor,
                 stop_index: int, guidance_scale: float) -> torch.Tensor:
    """Run the first `stop_index` steps of `scheduler.timesteps` (DDIM + CFG, as `generate`) from `latents`.

    The caller sets the schedule (`scheduler.set_timesteps(n)`) and scales the start latents by
    `init_noise_sigma`. The result sits at the noise level of `scheduler.timesteps[stop_index]`; 0 returns the
    latents unchanged, `len(timesteps)` denoises fully (x0). `cond` and `uncond` are (B,T,D) or (1,T,D); guidance
    at or below 1 skips the unconditional pass and samples with `cond` alone (SDD's code instead samples
    unconditionally there: pass the empty prompt's embedding as `cond` to get its behaviour).
    """
    timesteps = scheduler.timesteps
    if not 0 <= stop_index <= len(timesteps):
        raise ValueError(f"stop_index must be in [0, {len(timesteps)}], got {stop_index}")
    n = latents.shape[0]
    cond = cond.to(device=latents.device, dtype=latents.dtype).expand(n, -1, -1)
    uncond = uncond.to(device=latents.device, dtype=latents.dtype).expand(n, -1, -1)
    guided = guidance_scale > 1.0
    emb = torch.cat([uncond, cond]) if guided else cond
    for t in timesteps[:stop_index]:
        inp = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
        eps = unet(inp, t, encoder_hidden_states=emb).sample
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents
