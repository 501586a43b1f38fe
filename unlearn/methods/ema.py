"""The teacher's update rule (Eq. 3 of the CW/JS paper, SDD's EMA): a pure in-place function."""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def ema_update(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor],
               decay: float) -> None:
    """theta_T <- decay * theta_T + (1 - decay) * theta_S, pairwise and in place (SDD's `mul_`/`add_`)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    teacher_params, student_params = list(teacher_params), list(student_params)
    if len(teacher_params) != len(student_params):
        raise ValueError(f"{len(teacher_params)} teacher tensors but {len(student_params)} student tensors")
    for t, s in zip(teacher_params, student_params):
        if t.shape != s.shape:
            raise ValueError(f"teacher/student shapes differ: {tuple(t.shape)} vs {tuple(s.shape)}")
        t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1.0 - decay)
