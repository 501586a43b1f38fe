"""Drop third-party output that says nothing about a run: notices a user can act on stay."""

from __future__ import annotations

import logging
import warnings

# logger -> what its dropped messages contain
_DROPPED = {
    # Lightning's advertisement for its cloud logger, printed by every fit()
    "lightning.pytorch.utilities.rank_zero": "💡 Tip:",
    # transformers' notice, when diffusers imports CLIP's image processor, that it falls back from the torchvision
    # backend: our own preprocessing runs on tensors, so it says nothing about a run
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back",
}


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.getMessage())


def quiet_third_party() -> None:
    """Idempotent. Lightning 2.6 calls a pytree API that torch 2.13 deprecates, once per fit: not ours to fix."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name, text in _DROPPED.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in log.filters):
            log.addFilter(_Drop(text))
