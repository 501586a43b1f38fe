"""Ring-A-Bell (Tsai et al., ICLR 2024, "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion
Models?"): a model-agnostic attack. The concept vector is the mean difference of the text encoder's hidden states
(the whole padded sequence, (L, D)) of prompt pairs with and without the concept; a prompt's target is its own hidden
states + eta x the vector; a genetic search over k discrete tokens looks for the prompt whose hidden states are
closest to the target (summed squared error). Only the original text encoder is searched with; the erased model is
asked once, with the prompt found.

The pairs are the concept's (target prompt, anchor prompt) pairs; the authors' are hand-written prompt lists (30 for
violence, ~200 for nudity). The search follows the released notebook (InversePrompt.ipynb): keep the better half,
every survivor kept and, with the crossover rate, two one-point children with a random survivor; each member of the
new population, with the mutation rate, gets one random token at one random slot; after the last generation the
best member is decoded to text (readout `text`, the authors') or its ids are checked as they are (`ids`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from unlearn.attacks.base import Attack, AttackResult, Reference
from unlearn.attacks.common import PrefixPrompt, readout_of, tokenize


# ---------------------------------------------------------------- pure parts
def concept_vector(with_concept: Tensor, without: Tensor) -> Tensor:
    """(L, D): the mean over N pairs of the hidden-state difference, (N, L, D) each."""
    return (with_concept - without).mean(0)


def fitness(target: Tensor, hidden: Tensor) -> Tensor:
    """(P,): each candidate's summed squared distance to the target, (L, D) or (1, L, D); lower is better."""
    return ((hidden - target.reshape(1, *hidden.shape[1:])) ** 2).sum(dim=(1, 2))


def next_generation(parents: Tensor, allowed: Tensor, crossover_rate: float, mutation_rate: float,
                    gen: torch.Generator) -> Tensor:
    """(P', k) from (P, k) survivors: each survivor, and with `crossover_rate` its two one-point children with a
    random survivor; then each member, with `mutation_rate`, one slot set to a random allowed token."""
    p, k = parents.shape
    members = []
    for i in range(p):
        members.append(parents[i])
        if torch.rand((), generator=gen) < crossover_rate:
            j = int(torch.randint(p, (), generator=gen))
            cut = int(torch.randint(k, (), generator=gen))  # 0..k-1: the notebook's 1..length after BOS
            members.append(torch.cat([parents[i, :cut], parents[j, cut:]]))
            members.append(torch.cat([parents[j, :cut], parents[i, cut:]]))
    out = torch.stack(members).clone()
    mutate = torch.rand(len(out), generator=gen) < mutation_rate
    for i in mutate.nonzero().view(-1).tolist():
        out[i, torch.randint(k, (), generator=gen)] = allowed[torch.randint(len(allowed), (), generator=gen)]
    return out


def genetic_search(score: Callable[[Tensor], Tensor], k: int, allowed: Tensor, population: int, generations: int,
                   crossover_rate: float, mutation_rate: float, gen: torch.Generator) -> tuple[Tensor, list[float]]:
    """The best (k,) tokens under `score` ((P, k) -> (P,), lower is better) and the best score of every generation.
    Zero generations: the search disabled, the first random member, never scored."""
    members = allowed[torch.randint(len(allowed), (population, k), generator=gen)]
    history = []
    for step in range(generations):
        scores = score(members)
        order = torch.argsort(scores, stable=True)[:population // 2]
        members, best = members[order], float(scores[order[0]])
        history.append(best)
        if step < generations - 1:
            members = next_generation(members, allowed, crossover_rate, mutation_rate, gen)
    return members[0], history


def allowed_tokens(tokenizer) -> Tensor:
    """Every non-special token id (the notebook's 1..49405 on CLIP: neither BOS nor EOS)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def _number(key: str, v, low: float, integer: bool, strict: bool = False) -> None:
    bad = isinstance(v, bool) or not isinstance(v, int if integer else (int, float))
    if bad or (v <= low if strict else v < low):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"attack.{key}={v!r} must be {kind} {'>' if strict else '>='} {low}")


class RingABell(Attack):
    name = "Ring-A-Bell"
    control_keeps_prompt = False  # the runner's control: k random tokens alone, the search's own space

    def __init__(self, k: int, eta: float, population: int, generations: int, mutation_rate: float,
                 crossover_rate: float, num_pairs: int | None = None, batch_size: int = 256,
                 readout: str = "text"):
        self.k, self.eta, self.population, self.generations = k, float(eta), population, generations
        self.mutation_rate, self.crossover_rate = float(mutation_rate), float(crossover_rate)
        self.num_pairs, self.batch_size, self.readout = num_pairs, batch_size, readout
        self.vector: Tensor | None = None

    @classmethod
    def check_config(cls, cfg: Mapping, kind: str | None = None) -> dict:
        out = dict(cfg)
        _number("k", out.get("k"), 1, integer=True)
        _number("eta", out.get("eta"), 0, integer=False, strict=True)
        _number("population", out.get("population"), 2, integer=True)
        _number("generations", out.get("generations"), 0, integer=True)
        _number("batch_size", out.get("batch_size", 256), 1, integer=True)
        for key in ("mutation_rate", "crossover_rate"):
            v = out.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"attack.{key}={v!r} must be a number in [0, 1]")
        if out.get("num_pairs") is not None:
            _number("num_pairs", out["num_pairs"], 1, integer=True)
        readout_of(out)
        return out

    @property
    def settings(self) -> dict:
        return {"k": self.k, "eta": self.eta, "population": self.population, "generations": self.generations,
                "mutation_rate": self.mutation_rate, "crossover_rate": self.crossover_rate,
                "num_pairs": self.num_pairs, "readout": self.readout}

    @torch.no_grad()
    def encode(self, text_encoder, ids: Tensor) -> Tensor:
        """(B, L, D) hidden states of (B, L) ids, in batches."""
        device = next(text_encoder.parameters()).device
        return torch.cat([text_encoder(ids[i:i + self.batch_size].to(device))[0].float().cpu()
                          for i in range(0, len(ids), self.batch_size)])

    def prepare(self, original, concept) -> None:
        """The concept vector from the original text encoder and the concept's pairs, once for every model."""
        pairs = concept.pairs(self.num_pairs) if self.num_pairs else concept.pairs()
        tok, te = original.tokenizer, original.text_encoder
        with_ids = torch.cat([tokenize(tok, t) for _, t in pairs])
        without_ids = torch.cat([tokenize(tok, a) for a, _ in pairs])
        self.vector = concept_vector(self.encode(te, with_ids), self.encode(te, without_ids))

    def run(self, original, erased, prompt: str, reference: Reference, check, seed: int = 0) -> AttackResult:
        if self.vector is None:
            raise ValueError("Ring-A-Bell needs its concept vector: call prepare(original, concept) first")
        tok, te = original.tokenizer, original.text_encoder
        if self.k > tok.model_max_length - 2:
            raise ValueError(f"attack.k={self.k} must be <= {tok.model_max_length - 2} (this tokenizer's "
                             f"{tok.model_max_length} positions less BOS and EOS)")
        target = self.encode(te, tokenize(tok, prompt))[0] + self.eta * self.vector
        slots = PrefixPrompt(tok, te, "", self.k)  # [BOS, k slots, EOS, pad...], as the notebook's candidates

        def score(tokens: Tensor) -> Tensor:
            ids = slots.ids.repeat(len(tokens), 1)
            ids[:, slots.slots] = tokens
            return fitness(target, self.encode(te, ids))

        gen = torch.Generator().manual_seed(int(seed))
        best, history = genetic_search(score, self.k, allowed_tokens(tok), self.population, self.generations,
                                       self.crossover_rate, self.mutation_rate, gen)
        text, ids = slots.text(best), slots.with_tokens(best)
        with torch.no_grad():
            ok = check.ids(ids) if self.readout == "ids" else check.text(text)
        same = bool(torch.equal(tokenize(tok, text), ids))
        return AttackResult(success=ok, prompt=text, iterations=self.generations, ids=best.tolist(),
                            details={"fitness": history, "readout": self.readout, "same_ids": same})
