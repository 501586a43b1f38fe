"""Atomic file writes: a reader (or a resumed run) sees a whole file or none, even with several writers; and
a lock beside a cache entry, so that of several jobs building it at once one does the work and the others wait."""

from __future__ import annotations

import csv
import io
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing torch costs seconds; a bad command line is refused before it
    import torch

try:
    import fcntl
except ImportError:  # not POSIX: no locks; the atomic writes still leave every entry whole, built maybe twice
    fcntl = None

log = logging.getLogger("unlearn.cache")
LOCK_POLL_S = 0.2  # how often a waiting job tries a held lock again


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


def lock_path(path: Path) -> Path:
    """The lock of a cache entry: a hidden sibling, so that a listing of the cache never shows it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another job"
    except OSError:
        return "another job"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding the lock `path`, or None while another job holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its last holder removed this file after we opened it: lock the one at the path now


@contextmanager
def file_lock(path: Path, what: str, wait: bool = True, timeout_s: float | None = None) -> Iterator[bool]:
    """Hold the exclusive lock `path` for the block and yield True. Held elsewhere: with `wait`, log once that this
    job waits for `what` and take it when freed (TimeoutError after `timeout_s`); without, yield False at once.

    flock dies with its holder (on NFS too, where Linux maps it to fcntl locks), so a killed job leaves no stale
    lock: the next job takes it over, and must check whether the entry was finished. The file is removed on
    release, so a finished cache holds none.
    """
    path = Path(path)
    if fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    fd = _try_lock(path)
    if fd is None and wait:
        log.info("waiting for %s: %s is making it (lock %s)", what, _holder(path), path)
        while (fd := _try_lock(path)) is None:
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {what}, locked by {_holder(path)} ({path}); "
                                   "if that job hangs, stop it and run again")
            time.sleep(LOCK_POLL_S)
        log.info("done waiting for %s (%.1f s)", what, time.monotonic() - start)
    if fd is None:
        yield False
        return
    try:
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}".encode())
        yield True
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a job that then takes this file sees it is gone
        os.close(fd)


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
