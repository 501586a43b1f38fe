"""Distances between two batches of noise predictions (B, C, H, W), used as distillation losses.

``l2_distance`` is the usual pointwise loss; ``js_divergence`` and ``cramer_wold_distance`` are the two
distribution-level alternatives studied in "Towards robust concept erasure in diffusion models". Each returns a
scalar that is differentiable in both arguments (stop gradients at the call site where a target is fixed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The CWAE paper's closed form (1 + 4s/(2D-3))^(-1/2) is accurate to ~1% from D = 20 on; below it we evaluate
# the exact kernel 1F1(1/2; D/2; -s) (it errs by up to 8% at D = 4, the latent width of SD-1.x).
CW_ASYMPTOTIC_DIM = 20
# Below this s the exact kernel (D = 3 or D >= 5) uses its Taylor series; above it, a recurrence in D.
_SERIES_LIMIT = 1.0
_SERIES_TERMS = 20  # truncation error < 1 / 20! at s <= 1


def _check_same_shape(a: Tensor, b: Tensor, min_dims: int) -> None:
    if a.shape != b.shape:
        raise ValueError(f"inputs must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < min_dims:
        raise ValueError(f"inputs need at least {min_dims} dims (batch first), got shape {tuple(a.shape)}")


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over every element."""
    _check_same_shape(a, b, min_dims=1)
    return F.mse_loss(a, b)


def js_divergence(a: Tensor, b: Tensor, tau: float = 1.0) -> Tensor:
    """Jensen-Shannon divergence (natural log, so in [0, ln 2]) between per-sample softmax distributions.

    Sample i gives P_i = softmax(flatten(a_i) / tau) and Q_i = softmax(flatten(b_i) / tau) over all its
    C*H*W elements; the result is the batch mean of JS(P_i, Q_i) = (KL(P||M) + KL(Q||M)) / 2, M = (P + Q) / 2.
    Everything stays in log space (log_softmax, logaddexp) so tiny probabilities never produce log(0).
    """
    _check_same_shape(a, b, min_dims=2)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    log_p = F.log_softmax(_at_least_float32(a).flatten(1) / tau, dim=1)
    log_q = F.log_softmax(_at_least_float32(b).flatten(1) / tau, dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=1)
    return (0.5 * (kl_pm + kl_qm)).mean().to(a.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Cramer-Wold kernel phi_D(s) = 1F1(1/2; D/2; -s) = E[exp(-s theta_1^2)], theta uniform on the unit sphere of R^D.


def _phi_series(s: Tensor, dim: int) -> Tensor:
    # sum_k (1/2)_k / (D/2)_k * (-s)^k / k!; alternating but harmless for s <= 1.
    term, total = torch.ones_like(s), torch.ones_like(s)
    for k in range(_SERIES_TERMS - 1):
        term = term * ((0.5 + k) / (dim / 2 + k)) * (-s) / (k + 1)
        total = total + term
    return total


def _phi_recurrence(s: Tensor, dim: int) -> Tensor:
    # Closed forms for D = 1, 3 (odd) or D = 2, 4 (even), then Kummer's contiguous relation (DLMF 13.3.2 with
    # a = 1/2, z = -s) stepping b = D/2 by one. It divides by s, so it is only used for s >= 1.
    if dim % 2 == 0:
        i0, i1 = torch.special.i0e(s / 2), torch.special.i1e(s / 2)
        prev, cur, b = i0, i0 + i1, 2.0
    else:
        root = s.sqrt()
        prev, cur, b = torch.exp(-s), math.sqrt(math.pi) / 2 * torch.erf(root) / root, 1.5
    while 2 * b < dim:
        prev, cur = cur, (b * (b - 1) * prev + b * (1 - b + s) * cur) / (s * (b - 0.5))
        b += 1
    return cur


def _phi_exact(s: Tensor, dim: int) -> Tensor:
    """Exact phi_D for any D >= 1 (float64 advised; no autograd)."""
    if dim == 1:
        return torch.exp(-s)
    if dim in (2, 4):  # e^{-s/2} I_0(s/2) and e^{-s/2} (I_0 + I_1)(s/2): stable for every s >= 0
        half = s / 2
        return torch.special.i0e(half) + (torch.special.i1e(half) if dim == 4 else 0.0)
    # Each method only on its own elements: the 20-term series over a whole (n x n) matrix would dominate.
    small = s < _SERIES_LIMIT
    out = torch.empty_like(s)
    out[small] = _phi_series(s[small], dim)
    out[~small] = _phi_recurrence(s[~small], dim)
    return out


def _phi_exact_derivative(s: Tensor, dim: int, phi: Tensor) -> Tensor:
    """d phi_D / ds = (1 - 1/D) phi_{D+2} - phi_D (Kummer's transformation and dM/dz = (a/b) M(a+1, b+1, z))."""
    if dim == 1:
        return -phi
    if dim == 2:
        half = s / 2
        return (torch.special.i1e(half) - torch.special.i0e(half)) / 2
    if dim == 4:  # the general rule simplifies to -e^{-s/2} I_1(s/2) / s, which tends to -1/4 at s = 0
        tiny = s < 1e-8
        return torch.where(tiny, -0.25, -torch.special.i1e(s / 2) / torch.where(tiny, 1.0, s))
    return (1 - 1 / dim) * _phi_exact(s, dim + 2) - phi


class _ExactKernel(torch.autograd.Function):
    # A custom backward keeps memory at two saved tensors per call: the series/recurrence would otherwise store
    # every intermediate of an (n x n) matrix.
    @staticmethod
    def forward(ctx, s: Tensor, dim: int) -> Tensor:  # type: ignore[override]
        phi = _phi_exact(s, dim)
        ctx.save_for_backward(s, phi)
        ctx.dim = dim
        return phi

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        s, phi = ctx.saved_tensors
        return grad * _phi_exact_derivative(s, ctx.dim, phi), None


def cw_kernel(s: Tensor, dim: int) -> Tensor:
    """phi_D(s) of the Cramer-Wold distance: exact for D < 20, the CWAE asymptotic form from D = 20 on."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if dim >= CW_ASYMPTOTIC_DIM:
        return (1 + 4 * s / (2 * dim - 3)).rsqrt()
    return _ExactKernel.apply(s, dim)


def silverman_gamma(n: int, variance: Tensor | float = 1.0) -> Tensor | float:
    """Silverman's rule for the CW smoothing: gamma = sigma^2 (4 / (3n))^(2/5) (a variance, i.e. h^2)."""
    return variance * (4 / (3 * n)) ** 0.4


def _mean_kernel(x: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
    # Squared distances by expansion: an (n, m) matrix instead of an (n, m, D) difference tensor.
    sq = (x * x).sum(-1, keepdim=True) + (y * y).sum(-1).unsqueeze(-2) - 2 * x @ y.transpose(-1, -2)
    s = sq.clamp_min(0) / (4 * gamma[:, None, None])
    return cw_kernel(s, x.shape[-1]).mean(dim=(-2, -1))


def cramer_wold_sets(x: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
    """Squared CW distance between point sets x (B, n, D) and y (B, m, D), with bandwidth gamma (B,).

    d^2 = 1 / (2 sqrt(pi gamma)) * [mean_ij phi(|x_i-x_j|^2/4g) + mean_ij phi(|y_i-y_j|^2/4g)
    - 2 mean_ij phi(|x_i-y_j|^2/4g)]  (Knop, Tabor et al., JMLR 2020), one value per set pair.
    """
    bracket = _mean_kernel(x, x, gamma) + _mean_kernel(y, y, gamma) - 2 * _mean_kernel(x, y, gamma)
    return bracket / (2 * torch.sqrt(math.pi * gamma))


CW_SAMPLES = ("batch", "pixels")


def cramer_wold_distance(a: Tensor, b: Tensor, gamma: float | None = None, samples: str = "batch") -> Tensor:
    """Squared Cramer-Wold distance between two batches of predictions, read as point sets.

    ``samples`` says what the points are, for input (B, C, *spatial):
    - ``"batch"`` (default): each image's flattened prediction is one point in R^(C*H*W) and the batch is the
      sample, as in the robust-erasure paper's Lemma 4 (distributions over prediction vectors). It needs B >= 2:
      with one point per side CW is a function of their L2 distance only, so a batch of one is refused.
    - ``"pixels"``: image i is the set of its H*W positions, each a point in R^C (D = C); one distance per image,
      averaged over the batch. It compares how an image's values are distributed, not where they sit (permuting
      pixels costs nothing), so it is blind to spatial patterns such as a style's texture.

    Kernel: exact phi_D = 1F1(1/2; D/2; -s) for D < 20, (1 + 4s/(2D-3))^(-1/2) from 20 on (see ``cw_kernel``).
    Bandwidth: ``gamma`` if given, else Silverman's rule per set with n its number of points and sigma^2 the mean
    per-dimension variance of the two sets pooled (the average variance of a random 1-D projection, which is what
    CW smooths); it is detached, so the model cannot lower the loss by changing its spread.

    Returns d^2 itself (no sqrt, no log): it is smooth at 0, where sqrt's gradient blows up and CWAE's log d^2
    goes to -infinity, and a distillation target can be matched exactly. Computed in float64 (the three kernel
    means nearly cancel when a ~ b), returned in a's dtype.
    """
    _check_same_shape(a, b, min_dims=3)
    if samples == "pixels":
        x = a.flatten(2).transpose(1, 2).double()  # (B, n = H*W, D = C)
        y = b.flatten(2).transpose(1, 2).double()
    elif samples == "batch":
        if a.shape[0] < 2:
            raise ValueError(f"samples='batch' needs a batch of at least 2 predictions, got shape {tuple(a.shape)} "
                             "(with one point per side CW is a function of L2); use samples='pixels'")
        x = a.flatten(1)[None].double()  # (1, n = B, D = C*H*W)
        y = b.flatten(1)[None].double()
    else:
        raise ValueError(f"unknown samples={samples!r}; choose one of {CW_SAMPLES}")
    n = x.shape[1]
    if gamma is None:
        pooled = torch.cat([x, y], dim=1).detach()
        variance = pooled.var(dim=1, unbiased=False).mean(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
        g = silverman_gamma(n, variance)
    elif gamma > 0:
        g = torch.full((x.shape[0],), float(gamma), dtype=torch.float64, device=x.device)
    else:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return cramer_wold_sets(x, y, g).mean().to(a.dtype)
