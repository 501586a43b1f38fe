"""Atomic file writes: a reader (or a resumed run) sees a whole file or none, even with several writers."""

from __future__ import annotations

import csv
import io
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing torch costs seconds; a bad command line is refused before it
    import torch


def tmp_name(path: Path) -> Path:
    """A hidden sibling unique to this host and process, renamed over `path` once complete."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield the temporary sibling to write; it replaces `path` when the block ends without error, else is removed."""
    tmp = tmp_name(Path(path))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_figure(fig, path: Path, **kwargs) -> None:
    """A matplotlib figure, written beside and renamed (the format from `path`'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def write_csv_atomic(path: Path, rows) -> None:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    write_atomic(Path(path), buf.getvalue())
