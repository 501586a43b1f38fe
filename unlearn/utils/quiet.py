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


# Lightning's loggers that may carry a console handler of their own (lightning/__init__.py always adds one, with
# the format "INFO: ..."; lightning.pytorch and lightning.fabric add one when the root logger had none at import).
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def one_lightning_handler() -> None:
    """Each Lightning notice printed once. Under Hydra the root logger has handlers (console and the run's log
    file); Lightning's own console handler printed every notice a second time (`INFO: Seed set to 0` beside the
    timestamped line). Where the root logger has handlers, Lightning's console handlers go and its records reach
    the root's: one line, timestamped like the project's, and in the run's log file too."""
    if not logging.getLogger().handlers:
        return  # no one else prints them: Lightning's own handlers are the only ones
    for name in LIGHTNING_LOGGERS:
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            if type(handler) is logging.StreamHandler:  # its console handlers; never a file handler
                log.removeHandler(handler)
        log.propagate = True


def quiet_third_party() -> None:
    """Idempotent. Lightning 2.6 calls a pytree API that torch 2.13 deprecates, once per fit: not ours to fix."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name, text in _DROPPED.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in log.filters):
            log.addFilter(_Drop(text))
    one_lightning_handler()
