"""The one interface every attack has: given the original and the erased components, a prompt, its reference and a
check, find a prompt (or an embedding) whose image by the erased model shows the concept again."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Reference:
    """What the attack may use of the original model for one (prompt, seed): its image (1, 3, H, W) in [0, 1] and
    that image's x0 latent (1, C, h, w); for attacks that learn from the concept's images, the x0 latents (N, C, h, w)
    of the original's images that show the concept and the prompts they were made from."""

    image: Tensor | None = None
    latent: Tensor | None = None
    concept_latents: Tensor | None = None
    concept_prompts: list[str] | None = None


@dataclass
class AttackResult:
    """What an attack found: `prompt` as text a user can type (or None when it found an embedding only), the token
    ids of its adversarial slots or the embedding, the iterations it used, whether the check said yes, and the
    attack's own trace (`details`, e.g. the timestep it stopped at and the losses)."""

    success: bool
    prompt: str | None
    iterations: int
    ids: list[int] | None = None
    embedding: Tensor | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"success": self.success, "prompt": self.prompt, "iterations": self.iterations, **self.details}
        if self.ids is not None:
            out["ids"] = self.ids
        if self.embedding is not None:
            out["embedding_shape"] = list(self.embedding.shape)
        return out


class Attack(ABC):
    """An attack on one prompt. Subclasses set `name` (the table's), validate their settings in `check_config`
    (a ValueError naming the bad value, before any model loads) and implement `run`."""

    name: str = "attack"

    @classmethod
    def check_config(cls, cfg: Mapping, kind: str | None = None) -> dict:
        """The validated settings of this attack (defaults that depend on the concept kind resolved)."""
        return dict(cfg)

    @property
    def settings(self) -> dict:
        return {}

    @property
    def active(self) -> bool:
        """False when the budget is zero: nothing is attacked and the success rate is the clean rate."""
        return True

    k: int | None = None  # adversarial tokens, for attacks whose control is a random k-token prefix
    readout: str = "ids"  # how the control's prompts are tried: "ids" or "text" (unlearn.attacks.common.READOUTS)

    @abstractmethod
    def run(self, original, erased, prompt: str, reference: Reference, check, seed: int = 0) -> AttackResult:
        """`original`, `erased`: `unlearn.models.loading.Components` (the erased one shares the original's tokenizer,
        text encoder, VAE and scheduler unless the method changed them); `check`: an `unlearn.attacks.common.Check`
        for this prompt and seed."""
