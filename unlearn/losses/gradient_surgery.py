"""Concept-preserving gradient (CDC paper, Eq. 9): drop the part of the unlearning gradient that fights retention.

Both functions take gradients as lists with one entry per parameter, in the same order, ``None`` where a loss does
not reach a parameter. They never touch their inputs and never call ``.item()`` inside the rule, so a training step
does not wait on the device; only the logging helper converts to Python numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

GRANULARITIES = ("global", "per_tensor")

Grads = Sequence[Tensor | None]


def _check_pair(g_u: Grads, g_r: Grads) -> None:
    if len(g_u) != len(g_r):
        raise ValueError(
            f"g_u has {len(g_u)} tensors but g_r has {len(g_r)}; they must list the same parameters"
        )
    for i, (u, r) in enumerate(zip(g_u, g_r)):
        if u is not None and r is not None and u.shape != r.shape:
            raise ValueError(f"parameter {i}: g_u has shape {tuple(u.shape)} but g_r has {tuple(r.shape)}")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    # Accumulate in at least float32 so that bf16/fp16 gradients give a usable sign and coefficient.
    dtype = torch.promote_types(a.dtype, torch.float32)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


def _project(pairs: list[tuple[Tensor, Tensor | None]], lam: float, normalize: bool) -> list[Tensor]:
    """Apply Eq. 9 to the vector made of ``pairs`` (g_u part, g_r part or None for zeros)."""
    zero = torch.zeros((), device=pairs[0][0].device)
    dot = sum((_dot(u, r) for u, r in pairs if r is not None), zero)
    # ||G_r||^2 only over the coordinates that G_u updates: a None in g_u means "not updated", so projecting
    # within the updated coordinates is what keeps G . G_r = (1 - lam) G_u . G_r exactly.
    r_sq = sum((_dot(r, r) for _, r in pairs if r is not None), zero)
    tiny = torch.finfo(r_sq.dtype).tiny
    if normalize:
        # DoCo's rule: test and coefficient on unit vectors, subtraction from the raw G_u:
        # G = G_u - lam * cos(G_u, G_r) * G_r / ||G_r||  =  G_u - lam * dot / (||G_u|| ||G_r||^2) * G_r.
        u_norm = sum((_dot(u, u) for u, _ in pairs), zero).sqrt()
        ok = (u_norm > 0) & (r_sq > 0)
        coef = dot / (u_norm * r_sq).clamp_min(tiny)
    else:
        ok = r_sq > 0
        coef = dot / r_sq.clamp_min(tiny)
    # torch.where instead of an `if`: no host-device sync. With no conflict coef is 0 and u - 0*r == u exactly.
    coef = torch.where(ok & (dot < 0), lam * coef, torch.zeros_like(coef))
    return [u.clone() if r is None else u - coef.to(u.dtype) * r.to(u.dtype) for u, r in pairs]


def concept_preserving_gradient(
    g_u: Grads,
    g_r: Grads,
    lam: float = 1.0,
    granularity: str = "global",
    normalize: bool = False,
) -> list[Tensor | None]:
    """Eq. 9: keep ``G_u`` when ``G_u . G_r >= 0``, else ``G_u - lam (G_u . G_r / ||G_r||^2) G_r``.

    ``granularity="global"`` treats all parameters as one vector (the paper's formulation); ``"per_tensor"``
    applies the rule to each parameter tensor on its own (the official DoCo code). ``normalize=True`` reproduces
    DoCo's variant: cosine test as usual, but the subtracted term is ``lam * cos(G_u, G_r) * G_r / ||G_r||``, i.e.
    the conflicting component is measured on unit vectors and removed from the raw ``G_u``; the result is then
    orthogonal to ``G_r`` only when ``||G_u|| = 1`` (per vector, or per tensor with ``"per_tensor"``).

    ``None`` in ``g_u`` stays ``None`` (nothing to update). ``None`` in ``g_r`` counts as zeros: that tensor is
    returned as a copy of ``g_u``'s under ``"per_tensor"``; under ``"global"`` it takes no correction, and
    ``||G_r||`` is taken over the parameters ``g_u`` updates, so the result stays orthogonal to ``G_r`` when
    ``lam=1``. A zero ``G_r`` (or zero ``G_u`` with ``normalize``) leaves ``G_u`` unchanged. Returns new tensors.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    _check_pair(g_u, g_r)
    out: list[Tensor | None] = [None] * len(g_u)
    present = [i for i, u in enumerate(g_u) if u is not None]
    if granularity == "global":
        groups = [present] if present else []
    else:
        groups = [[i] for i in present]
    for idx in groups:
        for i, g in zip(idx, _project([(g_u[i], g_r[i]) for i in idx], lam, normalize)):  # type: ignore[misc]
            out[i] = g
    return out


def gradient_conflict_tensors(g_u: Grads, g_r: Grads) -> dict[str, Tensor]:
    """``G_u . G_r``, ``|G_u|``, ``|G_r|``, their cosine and ``conflict`` (``G_u . G_r < 0``, as 0/1), as 0-d
    tensors on the gradients' device: a training step logs them without reading them back."""
    _check_pair(g_u, g_r)
    present = [g for g in g_u if g is not None] or [g for g in g_r if g is not None]
    zero = torch.zeros((), device=present[0].device if present else None)
    dot = sum((_dot(u, r) for u, r in zip(g_u, g_r) if u is not None and r is not None), zero)
    norm_u = sum((_dot(u, u) for u in g_u if u is not None), zero).sqrt()
    norm_r = sum((_dot(r, r) for r in g_r if r is not None), zero).sqrt()
    denom = norm_u * norm_r
    cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1), zero)
    return {"dot": dot, "cos": cos, "conflict": (dot < 0).float(), "norm_u": norm_u, "norm_r": norm_r}


def gradient_conflict_stats(g_u: Grads, g_r: Grads) -> dict[str, float | bool]:
    """Global cosine between ``G_u`` and ``G_r`` (None = zeros), as Python numbers. ``conflict`` is
    ``G_u . G_r < 0``."""
    t = gradient_conflict_tensors(g_u, g_r)
    return {"cos": float(t["cos"]), "conflict": bool(t["dot"] < 0), "norm_u": float(t["norm_u"]),
            "norm_r": float(t["norm_r"])}
