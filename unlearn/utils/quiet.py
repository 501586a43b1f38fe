"""Drop third-party output that says nothing about a run: notices a user can act on stay."""

from __future__ import annotations

import logging
import warnings

_DROPPED_PREFIXES = ("💡 Tip:",)  # Lightning's advertisement for its cloud logger, printed by every fit()


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_DROPPED_PREFIXES)


def quiet_third_party() -> None:
    """Idempotent. Lightning 2.6 calls a pytree API that torch 2.13 deprecates, once per fit: not ours to fix."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in log.filters):
        log.addFilter(_DropTips())
