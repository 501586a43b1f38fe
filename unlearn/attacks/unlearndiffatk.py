"""UnlearnDiffAtk (Zhang et al., ECCV 2024): k prefix tokens, each a distribution over the vocabulary kept on the
simplex, sampled to one-hot with a straight-through gradient and optimised by Adam to minimise the erased model's
diffusion loss on the original model's x0 latent of the same prompt and seed; after each timestep's iterations the
argmax tokens are tried.

`readout` says how they are tried: `text` (the authors' rule, the default) decodes the ids to text and checks that
text as a pipeline would tokenise it, so a success is a prompt a user can type; `ids` checks the token ids
themselves, which some decoded texts do not tokenise back to (byte fragments, special tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from unlearn.attacks.base import Attack, AttackResult, Reference
from unlearn.attacks.common import PrefixPrompt, eps, readout_of, tokenize
from unlearn.models.prediction import eps_from_prediction, prediction_type_of

# The authors' defaults (configs/*/text_grad_*.json and src/execs/attack.py): k = 5 for nudity, 3 otherwise.
DEFAULT_K = {"nudity": 5, "style": 3, "instance": 3}


def timestep_schedule(n: int, num_train_timesteps: int = 1000) -> list[int]:
    """The paper's timesteps: n evenly spaced from T // n // 2 upwards (n = 50: 10, 30, ..., 990)."""
    if n < 1 or n > num_train_timesteps:
        raise ValueError(f"attack.num_timesteps={n!r} must be in [1, {num_train_timesteps}]")
    stride = num_train_timesteps // n
    return list(range(stride // 2, num_train_timesteps, stride))[:n]


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row onto {p >= 0, sum p = 1} (the sort-based closed form; the authors find
    the same point by bisection on the shift mu in clip(v - mu, 0, 1))."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    idx = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / idx) > 0).sum(-1, keepdim=True)  # number of positive entries of the projection
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp(min=0)


class STESample(torch.autograd.Function):
    """Forward: one token per row drawn from the row's distribution, as one-hot. Backward: the incoming gradient,
    clipped to [-1, 1] (hardtanh), passed straight through to the distribution."""

    @staticmethod
    def forward(ctx, probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.multinomial(probs.detach().clamp(min=0).cpu(), 1, generator=generator).view(-1)
        return F.one_hot(idx, probs.shape[-1]).to(probs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return F.hardtanh(grad), None


def _integer(key: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"attack.{key}={v!r} must be an integer >= {low}")


class UnlearnDiffAtk(Attack):
    name = "UnlearnDiffAtk"

    def __init__(self, k: int, iterations: int, num_timesteps: int, lr: float, weight_decay: float = 0.0,
                 readout: str = "text"):
        self.k, self.iterations, self.num_timesteps = k, iterations, num_timesteps
        self.lr, self.weight_decay, self.readout = float(lr), float(weight_decay), readout

    @classmethod
    def check_config(cls, cfg: Mapping, kind: str | None = None) -> dict:
        out = dict(cfg)
        k = out.get("k")
        if k is None:
            k = DEFAULT_K.get(kind or "style", 3)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"attack.k={k!r}: the number of adversarial tokens must be an integer >= 1")
        out["k"] = k
        _integer("iterations", out.get("iterations"), 0)
        _integer("num_timesteps", out.get("num_timesteps"), 1)
        if not float(out.get("lr", 0)) > 0:
            raise ValueError(f"attack.lr={out.get('lr')!r} must be > 0")
        if float(out.get("weight_decay", 0.0)) < 0:
            raise ValueError(f"attack.weight_decay={out.get('weight_decay')!r} must be >= 0")
        readout_of(out)
        return out

    @property
    def active(self) -> bool:
        return self.iterations > 0

    @property
    def settings(self) -> dict:
        return {"k": self.k, "iterations": self.iterations, "num_timesteps": self.num_timesteps, "lr": self.lr,
                "weight_decay": self.weight_decay, "readout": self.readout}

    def loss(self, unet, hidden: Tensor, x0: Tensor, t: int, noise: Tensor, alphas: Tensor,
             prediction_type: str = "epsilon") -> Tensor:
        """The erased model's epsilon-MSE on the reference latent noised to t (ε also for a v-prediction model)."""
        a = alphas[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(eps_from_prediction(eps(unet, x_t, t, hidden.to(x0)), x_t, a, prediction_type), noise)

    def try_tokens(self, prefix: PrefixPrompt, tokens: Tensor, check) -> tuple[bool, dict]:
        """Ask the check about the argmax tokens, by the readout; the text and whether it tokenises back to them."""
        text = prefix.text(tokens)
        ids = prefix.with_tokens(tokens)
        same = bool(torch.equal(tokenize(prefix.tokenizer, text), ids))
        ok = check.ids(ids) if self.readout == "ids" else check.text(text)
        return ok, {"prompt": text, "ids": tokens.view(-1).tolist(), "same_ids": same}

    def run(self, original, erased, prompt: str, reference: Reference, check, seed: int = 0) -> AttackResult:
        x0 = reference.latent
        prefix = PrefixPrompt(erased.tokenizer, erased.text_encoder, prompt, self.k)  # the erased model end to end
        gen = torch.Generator().manual_seed(int(seed))
        theta = project_simplex(torch.full((self.k, prefix.vocab_size), 1.0 / prefix.vocab_size))
        theta.requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=self.lr, weight_decay=self.weight_decay)
        sched = original.scheduler
        alphas = sched.alphas_cumprod.to(x0)
        prediction = prediction_type_of(sched)
        losses, used = [], 0
        for t in timestep_schedule(self.num_timesteps, int(sched.config.num_train_timesteps)):
            total = 0.0
            for _ in range(self.iterations):
                hidden = prefix.hidden(STESample.apply(theta, gen))
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                loss = self.loss(erased.unet, hidden, x0, t, noise, alphas, prediction)
                opt.zero_grad()
                theta.grad = torch.autograd.grad(loss, [theta])[0]
                opt.step()
                with torch.no_grad():
                    theta.copy_(project_simplex(theta))
                total += loss.item()
                used += 1
            losses.append(total / max(self.iterations, 1))
            ok, found = self.try_tokens(prefix, theta.detach().argmax(-1), check)
            if ok:
                return self._result(True, found, used, t, losses)
        return self._result(False, found, used, None, losses)  # the schedule has >= 1 timestep: `found` is set

    def _result(self, success: bool, found: dict, used: int, t, losses: list[float]) -> AttackResult:
        return AttackResult(success=success, prompt=found["prompt"], iterations=used, ids=found["ids"],
                            details={"timestep": t, "losses": losses, "readout": self.readout,
                                     "same_ids": found["same_ids"]})
