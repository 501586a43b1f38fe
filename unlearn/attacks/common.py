"""Pieces every attack shares: the UNet's epsilon, prompts with adversarial token slots, text read back from token
ids, sampling from ids / text / hidden states, and the detector's check of one (prompt, seed)."""

from __future__ import annotations

import torch
from torch import Tensor

READOUTS = ("text", "ids")


def readout_of(cfg: dict) -> str:
    """`attack.readout`, default text (the authors' rule); anything else a ValueError naming it."""
    value = cfg.setdefault("readout", "text")
    if value not in READOUTS:
        raise ValueError(f"attack.readout={value!r}: one of {' | '.join(READOUTS)}")
    return value


def eps(unet, x_t: Tensor, t: int | Tensor, cond: Tensor) -> Tensor:
    """The model's noise prediction; the one place the attacks call a UNet while optimising."""
    t = torch.as_tensor([t] if not torch.is_tensor(t) or t.dim() == 0 else t, device=x_t.device)
    return unet(x_t, t, encoder_hidden_states=cond).sample


# ---------------------------------------------------------------- prompts with adversarial token slots
class PrefixPrompt:
    """Token ids `[BOS, slot x k, prompt tokens..., EOS, pad...]` and the text encoder's hidden states with the
    slots' token embeddings replaced by a (k, D) tensor (a forward hook on the token-embedding layer, so the
    encoder's own code - positions, causal mask, final norm - runs unchanged)."""

    def __init__(self, tokenizer, text_encoder, prompt: str, k: int):
        self.tokenizer, self.text_encoder, self.k = tokenizer, text_encoder, k
        length = tokenizer.model_max_length
        ids = tokenizer(prompt, truncation=True, max_length=max(length - k, 2)).input_ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[-1]
        full = [ids[0]] + [pad] * k + ids[1:]
        self.ids = torch.tensor([full + [pad] * (length - len(full))])
        self.slots = torch.arange(1, 1 + k)
        self.embedding = text_encoder.get_input_embeddings()

    @property
    def vocab_size(self) -> int:
        return self.embedding.weight.shape[0]

    def with_tokens(self, tokens: Tensor) -> Tensor:
        ids = self.ids.clone()
        ids[0, self.slots] = tokens.view(-1).cpu()
        return ids

    def text(self, tokens: Tensor) -> str:
        """The prompt as text: the ids after BOS, end and padding tokens dropped, decoded."""
        return decode(self.tokenizer, self.with_tokens(tokens)[0])

    def hidden(self, one_hot: Tensor) -> Tensor:
        """(1, L, D) hidden states, differentiable in `one_hot` (k, V)."""
        return self.hidden_embeds(one_hot.to(self.embedding.weight) @ self.embedding.weight)

    def hidden_embeds(self, emb: Tensor) -> Tensor:
        """(1, L, D) hidden states with the slots' token embeddings replaced by `emb` (k, D), differentiable in it."""
        slots = self.slots

        def hook(_module, _inputs, out):
            out = out.clone()
            out[:, slots] = emb.unsqueeze(0).to(out)
            return out

        handle = self.embedding.register_forward_hook(hook)
        try:
            return self.text_encoder(self.ids.to(self.embedding.weight.device))[0]
        finally:
            handle.remove()


def decode(tokenizer, ids: Tensor) -> str:
    """Text of a (L,) row of token ids without its BOS, end and padding tokens - what a user would type."""
    drop = (tokenizer.eos_token_id, tokenizer.pad_token_id)
    return tokenizer.decode([i for i in ids[1:].tolist() if i not in drop]).strip()


def tokenize(tokenizer, prompt: str) -> Tensor:
    """(1, L) ids of a text prompt, padded as the pipelines pad it (`unlearn.models.text.encode_prompts`)."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def random_tokens(tokenizer, k: int, generator: torch.Generator) -> Tensor:
    """k token ids drawn uniformly from the non-special vocabulary."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    return allowed[torch.randint(len(allowed), (k,), generator=generator)]


# ---------------------------------------------------------------- sampling from ids, text or hidden states
@torch.no_grad()
def sample_hidden(components, unet, cond: Tensor, seeds: list[int], steps: int, guidance_scale: float) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] from text-encoder hidden states, (1, L, D) for every seed or one row per seed;
    DDIM + classifier-free guidance against the empty prompt, as `unlearn.models.sampling.generate`."""
    from unlearn.metrics.concept_recovery import denoise_steps
    from unlearn.models.sampling import initial_latents
    from unlearn.models.text import encode_prompts

    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    te = components.text_encoder
    cond = cond.to(device, dtype)
    cond = cond.expand(len(seeds), -1, -1) if cond.shape[0] == 1 else cond
    uncond = encode_prompts(components.tokenizer, te, [""]).to(device, dtype)
    sched = components.scheduler
    sched.set_timesteps(steps)
    size = unet.config.sample_size
    lat = initial_latents(seeds, (unet.config.in_channels, size, size), device, dtype) * sched.init_noise_sigma
    lat = denoise_steps(unet, sched, cond, uncond, lat, 0, len(sched.timesteps), guidance_scale)
    vae = components.vae
    return (vae.decode(lat / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def sample_ids(components, unet, ids: Tensor, seeds: list[int], steps: int, guidance_scale: float) -> Tensor:
    """Images from explicit token ids, (1, L) for every seed or (B, L) one row per seed."""
    te = components.text_encoder
    return sample_hidden(components, unet, te(ids.to(next(te.parameters()).device))[0], seeds, steps,
                         guidance_scale)


@torch.no_grad()
def sample_text(components, unet, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float) -> Tensor:
    """Images from text prompts, tokenised as a pipeline tokenises them."""
    from unlearn.models.text import encode_prompts

    cond = encode_prompts(components.tokenizer, components.text_encoder, list(prompts))
    return sample_hidden(components, unet, cond, seeds, steps, guidance_scale)


# ---------------------------------------------------------------- the detector's check of one (prompt, seed)
class Check:
    """Does the erased model's image of a candidate, at this prompt's seed, show the concept? The detector judges
    it against the concept's target and anchor prompts (the CA rule for CLIP), whatever the candidate's words.
    `calls` counts the images made."""

    def __init__(self, erased, detector, target: str, anchor: str, seed: int, steps: int, guidance_scale: float):
        self.erased, self.detector = erased, detector
        self.target, self.anchor, self.seed = target, anchor, seed
        self.steps, self.guidance_scale = steps, guidance_scale
        self.calls = 0

    def _judge(self, images: Tensor) -> bool:
        self.calls += 1
        return bool(self.detector(images, self.target, self.anchor)[0])

    def ids(self, ids: Tensor) -> bool:
        return self._judge(sample_ids(self.erased, self.erased.unet, ids, [self.seed], self.steps,
                                      self.guidance_scale))

    def text(self, prompt: str) -> bool:
        return self._judge(sample_text(self.erased, self.erased.unet, [prompt], [self.seed], self.steps,
                                       self.guidance_scale))

    def hidden(self, cond: Tensor) -> bool:
        return self._judge(sample_hidden(self.erased, self.erased.unet, cond, [self.seed], self.steps,
                                         self.guidance_scale))
