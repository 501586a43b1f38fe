"""Checkpoints named by training iteration, written whole or not at all, holding what an exact resume needs;
and the guard that stops a run at the first non-finite loss or gradient.

`<run>/checkpoints/iteration=<N>.ckpt` every `every` iterations (the newest kept) and `last.ckpt`, the newest state
(a hard link to iteration=<N>.ckpt, or the last iteration's own file). Each is written beside and renamed into place, so a run killed mid-write leaves the previous one
whole. Besides Lightning's content (trainable weights, discriminator, optimizers, EMA teacher's trained tensors,
the iteration counter, the data module's position in its order), a checkpoint holds the RNG states of torch (CPU
and CUDA), numpy and python `random`, captured right after iteration N; a resumed run puts them back right before
iteration N + 1, so on CPU with deterministic algorithms it ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch

from unlearn.utils.files import tmp_name

LAST = "last.ckpt"


def checkpoint_name(iteration: int) -> str:
    return f"iteration={iteration}.ckpt"


def rng_states() -> dict:
    """Every RNG training draws from, as tensors and plain Python (loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient; the message names the iteration and where it appeared."""


class IterationCheckpoint(L.Callback):
    def __init__(self, dirpath: str | Path, every: int):
        if int(every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.dirpath, self.every = Path(dirpath), int(every)
        self._pending_rng: dict | None = None
        self._current = 0  # the iteration being run (1-based), for error messages
        self._flags: list = []  # (iteration, what, value, non-finite flag on the device), not yet read

    # ------------------------------------------------------------------ state carried in the checkpoint
    def state_dict(self) -> dict:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_rng = state_dict.get("rng")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # As late as possible: nothing between the restore and the next iteration draws random numbers.
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None
        self._current = pl_module.done_iterations + 1

    # ------------------------------------------------------------------ saving
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        it = pl_module.done_iterations
        save = it > 0 and (it % self.every == 0 or it >= pl_module.steps)
        if save or it % getattr(pl_module, "log_every", 1) == 0 or it >= pl_module.steps:
            self.check_finite(pl_module)
        if save:
            self.save(trainer, it)

    def save(self, trainer: L.Trainer, iteration: int) -> Path:
        """iteration=N.ckpt at multiples of `every` (the newest one kept), and last.ckpt always."""
        named = iteration % self.every == 0
        path = self.dirpath / (checkpoint_name(iteration) if named else LAST)
        tmp = tmp_name(path)
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        # The full state (optimizers, callbacks: the RNG states); every rank calls it, rank 0 writes.
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, path)
            if named:
                link = tmp_name(self.dirpath / LAST)
                try:
                    os.link(path, link)
                except OSError:  # no hard links on this filesystem
                    shutil.copyfile(path, link)
                os.replace(link, self.dirpath / LAST)
                for old in self.dirpath.glob("iteration=*.ckpt"):
                    if old != path:
                        old.unlink(missing_ok=True)
        trainer.strategy.barrier("checkpoint")
        return path

    # ------------------------------------------------------------------ the non-finite guard
    # Each loss and each optimizer step's gradients leave one flag on the device; the flags are read every
    # `log_every` iterations, at the last and before any checkpoint is written, so an iteration never waits on
    # the device for the guard and no checkpoint ever holds weights stepped with a non-finite gradient.
    def on_before_backward(self, trainer, pl_module, loss):
        loss = loss.detach()
        self._flags.append((self._current, "the loss", loss.float().mean(), ~torch.isfinite(loss).all()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            bad = ~torch.stack([torch.isfinite(g).all() for g in grads]).all()
            k = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer or
                     getattr(o, "optimizer", None) is optimizer) if len(trainer.optimizers) > 1 else None
            self._flags.append((self._current, "a gradient" + ("" if k is None else f" of optimizer {k}"), None, bad))

    def check_finite(self, pl_module) -> None:
        if not self._flags:
            return
        flags, self._flags = self._flags, []
        bad = torch.stack([f[3] for f in flags]).cpu()  # the one read back
        if bad.any():
            it, what, value, _ = flags[int(bad.nonzero()[0])]
            if value is not None:
                what = f"{what} ({value.item()})"
            last = self.dirpath / LAST
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written before it"
            raise NonFiniteError(f"iteration {it}: {what} is not finite; training stopped at iteration "
                                 f"{pl_module.done_iterations}, {kept}")
