"""The BMM closed form U = (C + lam U0)(G + lam I)^-1, solved for the residual by batched Cholesky.

Numerics. (C + lam U0)(G + lam I)^-1 = U0 + (C - U0 G)(G + lam I)^-1, so the solve is for the
residual R = C - U0 G: the anchor's component outside span(G) (where the exact answer is U0) is
then never divided by a tiny lam, and R does not depend on lam. The solve runs in float64 by
default (`dtype`), whatever the inputs' dtype: with low-rank task vectors G has a null space, and
float32 roundoff in G and C (about 1e-7 ||G||) is larger than lam at rho <= 1e-5, which made the
merged update wrong by O(1) (bench/precision.py). U is returned in U0's dtype.

Never an explicit inverse: (G + lam I) X^T = R^T. A module whose factorisation fails (info != 0:
G + lam I not numerically positive definite, e.g. lam = 0 with a rank-deficient G) is retried
alone with lam + delta, delta starting at sqrt(eps) * trace(G)/d_in and growing tenfold: the same
formula with a larger lam, i.e. damped toward the anchor, and every retry is reported to the caller. A module with G = 0 (zero task
vectors) returns U0, the limit of the formula for every lam > 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class NonFiniteStatistics(ValueError):
    """G, C, U0 or lam of batch entry `index` holds NaN or Inf."""

    def __init__(self, index: int, what: str):
        super().__init__(f"batch entry {index}: {what} is not finite")
        self.index = index
        self.what = what


@dataclass(frozen=True)
class Damping:
    index: int  # position in the batch
    added: float  # absolute value added to lam (the solve used lam + added)
    attempts: int


def lam_from_rho(G: torch.Tensor, rho: torch.Tensor | float) -> torch.Tensor:
    """lam = rho * trace(G) / d_in: regularisation relative to G's mean eigenvalue."""
    d = G.shape[-1]
    tr = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1) / d
    return torch.as_tensor(rho, dtype=G.dtype, device=G.device) * tr


def check_finite(G: torch.Tensor, C: torch.Tensor, U0: torch.Tensor, lam: torch.Tensor) -> None:
    """Raise NonFiniteStatistics for the first batch entry with NaN/Inf (never a 'damping nan')."""
    for what, t in (("G", G), ("C", C), ("the anchor U0", U0)):
        bad = ~torch.isfinite(t).flatten(1).all(1)
        if bool(bad.any()):
            raise NonFiniteStatistics(int(torch.nonzero(bad)[0]), what)
    bad = ~torch.isfinite(lam)
    if bool(bad.any()):
        raise NonFiniteStatistics(int(torch.nonzero(bad)[0]), "lam")


def bmm_solve(
    G: torch.Tensor,
    C: torch.Tensor,
    U0: torch.Tensor,
    lam: torch.Tensor,
    *,
    max_attempts: int = 12,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, list[Damping]]:
    """Batched solve over modules of equal shape, U = U0 + (C - U0 G)(G + lam I)^-1 in `dtype`.

    G: [B, d_in, d_in] symmetric PSD, C, U0: [B, d_out, d_in], lam: [B] (>= 0).
    Returns U [B, d_out, d_in] in U0's dtype and the damping applied to modules whose Cholesky failed.
    Raises NonFiniteStatistics when an input holds NaN/Inf.
    """
    out_dtype = U0.dtype
    B, d_in, _ = G.shape
    lam = torch.as_tensor(lam, device=G.device).to(dtype).reshape(B)
    G, C, U0 = G.to(dtype), C.to(dtype), U0.to(dtype)
    check_finite(G, C, U0, lam)
    eye = torch.eye(d_in, dtype=dtype, device=G.device)
    R = C - U0 @ G
    L, info = torch.linalg.cholesky_ex(G + lam[:, None, None] * eye)
    damped: list[Damping] = []
    failed = torch.nonzero(info != 0).flatten().tolist()
    if failed:
        L = L.clone()
        for i in failed:
            if not bool(G[i].any()):  # zero task vectors: R = 0 and U = U0 for any lam > 0
                L[i] = eye
                continue
            # first delta: sqrt(eps) of G's mean eigenvalue (relative rho 1.5e-8 in float64); a smaller one
            # would make the retried solve as ill-conditioned as the failed one (error ~ eps ||G|| / delta)
            add = float(torch.diagonal(G[i]).abs().mean()) * torch.finfo(dtype).eps ** 0.5
            for attempt in range(1, max_attempts + 1):
                Li, inf = torch.linalg.cholesky_ex(G[i] + (lam[i] + add) * eye)
                if int(inf) == 0:
                    L[i] = Li
                    damped.append(Damping(i, add, attempt))
                    break
                add *= 10.0
            else:
                raise FloatingPointError(f"Cholesky failed for batch entry {i} even with lam + {add:.3g}")
    X = torch.cholesky_solve(R.transpose(-1, -2), L)
    return (U0 + X.transpose(-1, -2)).to(out_dtype), damped


def dense_reference(G, C, U0, lam) -> torch.Tensor:
    """Float64 dense solve of one module, direct form, for tests and checks (not on the hot path)."""
    G, C, U0 = (t.to(torch.float64) for t in (G, C, U0))
    A = G + float(lam) * torch.eye(G.shape[-1], dtype=torch.float64, device=G.device)
    return torch.linalg.solve(A, (C + float(lam) * U0).T).T
