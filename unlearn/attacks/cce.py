"""CCE, Concept Inversion (Pham et al., ICLR 2024, "Circumventing Concept Erasure Methods for Text-to-Image
Generative Models"): textual inversion on the *erased* model. New token embeddings are learned with the standard
diffusion loss on images of the concept (here the original model's images of the concept's prompts, each with its
own prompt as caption, the new tokens prepended); the erased model is then asked for prompts that start with them.

One learning serves every prompt of a model (it is universal, as the paper's token is); the result is an embedding,
not text a user can type. Captions are the images' own prompts with the token in front, as the authors' I2P variant
captions its images (their style and object variants use textual inversion's templates instead); the images are the
runner's references, not files, and the token is prepended to the concept's prompt when checking.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from unlearn.attacks.base import Attack, AttackResult, Reference
from unlearn.attacks.common import PrefixPrompt, eps
from unlearn.models.prediction import eps_from_prediction, prediction_type_of


def inversion_loss(unet, hiddens: Tensor, x0: Tensor, t: Tensor, noise: Tensor, alphas: Tensor,
                   prediction_type: str = "epsilon") -> Tensor:
    """The diffusion loss of textual inversion: epsilon-MSE of the (erased) UNet on x0 noised to t, (B,) each
    (ε also for a v-prediction model)."""
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(eps_from_prediction(eps(unet, x_t, t, hiddens.to(x0)), x_t, a, prediction_type), noise)


class CCE(Attack):
    name = "CCE"

    def __init__(self, steps: int, lr: float, batch_size: int, num_tokens: int = 1, initializer: str | None = None,
                 weight_decay: float = 0.0, check_every: int | None = None):
        self.steps, self.lr, self.batch_size, self.num_tokens = steps, float(lr), batch_size, num_tokens
        self.initializer, self.weight_decay = initializer, float(weight_decay)
        self.check_every = check_every or steps
        self._learned: dict = {}

    @classmethod
    def check_config(cls, cfg: Mapping, kind: str | None = None) -> dict:
        out = dict(cfg)
        for key, low in (("steps", 1), ("batch_size", 1), ("num_tokens", 1)):
            v = out.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"attack.{key}={v!r} must be an integer >= {low}")
        v = out.get("check_every")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"attack.check_every={v!r} must be null or an integer >= 1")
        if not float(out.get("lr", 0)) > 0:
            raise ValueError(f"attack.lr={out.get('lr')!r} must be > 0")
        if float(out.get("weight_decay", 0.0)) < 0:
            raise ValueError(f"attack.weight_decay={out.get('weight_decay')!r} must be >= 0")
        return out

    @property
    def settings(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "num_tokens": self.num_tokens,
                "initializer": self.initializer, "weight_decay": self.weight_decay, "check_every": self.check_every}

    def initial(self, tokenizer, embedding) -> Tensor:
        """(num_tokens, D): the initializer word's embedding (a single token) or the vocabulary's mean."""
        weight = embedding.weight.detach()
        if self.initializer is None:
            return weight.mean(0, keepdim=True).repeat(self.num_tokens, 1).clone()
        ids = tokenizer(self.initializer, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"attack.initializer={self.initializer!r} is {len(ids)} tokens: one word, one token")
        return weight[ids[0]].repeat(self.num_tokens, 1).clone()

    def learn(self, original, erased, latents: Tensor, prompts: list[str], seed: int, stops: list[int]):
        """Yield (steps done, the embedding) at each of `stops`: Adam(W) on the new embedding alone."""
        prefixes = [PrefixPrompt(erased.tokenizer, erased.text_encoder, p, self.num_tokens) for p in prompts]
        emb = self.initial(original.tokenizer, prefixes[0].embedding).requires_grad_(True)
        opt = torch.optim.AdamW([emb], lr=self.lr, weight_decay=self.weight_decay)
        sched = original.scheduler
        alphas = sched.alphas_cumprod.to(latents)
        gen = torch.Generator().manual_seed(int(seed))
        n_train = int(sched.config.num_train_timesteps)
        for step in range(1, max(stops) + 1):
            pick = torch.randint(len(prompts), (self.batch_size,), generator=gen)
            t = torch.randint(n_train, (self.batch_size,), generator=gen)
            noise = torch.randn((self.batch_size, *latents.shape[1:]), generator=gen).to(latents)
            hiddens = torch.cat([prefixes[i].hidden_embeds(emb) for i in pick.tolist()])
            loss = inversion_loss(erased.unet, hiddens, latents[pick], t.to(latents.device), noise, alphas,
                                  prediction_type_of(sched))
            opt.zero_grad()
            emb.grad = torch.autograd.grad(loss, [emb])[0]  # the new embedding alone: no model gradient kept
            opt.step()
            if step in stops:
                yield step, emb.detach().clone()

    def run(self, original, erased, prompt: str, reference: Reference, check, seed: int = 0) -> AttackResult:
        latents, prompts = reference.concept_latents, reference.concept_prompts
        if latents is None or len(latents) == 0:
            raise ValueError("attack=cce needs images of the concept: none of the original model's reference images "
                             "shows it")
        stops = sorted({*range(self.check_every, self.steps + 1, self.check_every), self.steps})
        held = self._learned
        # One learning per erased model and image set, run only as far as a check needs it. The objects are held
        # and compared by identity, so a later model cannot be mistaken for this one.
        if held.get("unet") is not erased.unet or held.get("latents") is not latents:
            held = self._learned = {"unet": erased.unet, "latents": latents, "done": [],
                                    "rest": self.learn(original, erased, latents, prompts, seed, stops)}
        done, rest = held["done"], held["rest"]
        prefix = PrefixPrompt(erased.tokenizer, erased.text_encoder, prompt, self.num_tokens)
        emb = None
        for step, emb in self._embeddings(done, rest):
            with torch.no_grad():
                ok = check.hidden(prefix.hidden_embeds(emb))
            if ok:
                return AttackResult(True, None, step, embedding=emb, details={"checked_at": step})
        return AttackResult(False, None, self.steps, embedding=emb, details={"checked_at": None})

    @staticmethod
    def _embeddings(done: list, rest):
        """(step, embedding) at every stop: those learned for earlier prompts, then the learning continued."""
        i = 0
        while True:
            if i == len(done):
                nxt = next(rest, None)
                if nxt is None:
                    return
                done.append(nxt)
            yield done[i]
            i += 1
