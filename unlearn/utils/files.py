"""Atomic file writes: a reader (or a resumed run) sees a whole file or none, even with several writers."""

from __future__ import annotations

import csv
import io
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing torch costs seconds; a bad command line is refused before it
    import torch


def tmp_name(path: Path) -> Path:
    """A hidden sibling unique to this host and process, renamed over `path` once complete."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = tmp_name(path)
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_figure(fig, path: Path, **kwargs) -> None:
    """A matplotlib figure, written beside and renamed (the format from `path`'s suffix)."""
    path = Path(path)
    tmp = tmp_name(path)
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
    os.replace(tmp, path)


def write_csv_atomic(path: Path, rows) -> None:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    write_atomic(Path(path), buf.getvalue())
