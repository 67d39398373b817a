"""The BMM closed form U = (C + lam U0)(G + lam I)^-1, solved by batched Cholesky.

Never an explicit inverse: (G + lam I) U^T = (C + lam U0)^T. Modules whose factorisation fails
(info != 0: G + lam I not numerically positive definite, e.g. lam = 0 with a rank-deficient G)
are retried alone with growing damping, and each retry is reported to the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Damping:
    index: int  # position in the batch
    added: float  # absolute value added to the diagonal on top of lam
    attempts: int


def lam_from_rho(G: torch.Tensor, rho: torch.Tensor | float) -> torch.Tensor:
    """lam = rho * trace(G) / d_in: regularisation relative to G's mean eigenvalue."""
    d = G.shape[-1]
    tr = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1) / d
    return torch.as_tensor(rho, dtype=G.dtype, device=G.device) * tr


def bmm_solve(
    G: torch.Tensor,
    C: torch.Tensor,
    U0: torch.Tensor,
    lam: torch.Tensor,
    *,
    max_attempts: int = 12,
) -> tuple[torch.Tensor, list[Damping]]:
    """Batched solve over modules of equal shape.

    G: [B, d_in, d_in] symmetric PSD, C, U0: [B, d_out, d_in], lam: [B] (>= 0).
    Returns U [B, d_out, d_in] and the damping applied to modules whose Cholesky failed.
    """
    B, d_in, _ = G.shape
    lam = torch.as_tensor(lam, dtype=G.dtype, device=G.device).reshape(B)
    eye = torch.eye(d_in, dtype=G.dtype, device=G.device)
    A = G + lam[:, None, None] * eye
    rhs = (C + lam[:, None, None] * U0).transpose(-1, -2)
    L, info = torch.linalg.cholesky_ex(A)
    damped: list[Damping] = []
    failed = torch.nonzero(info != 0).flatten().tolist()
    if failed:
        L = L.clone()
        for i in failed:
            scale = float(torch.diagonal(G[i]).abs().mean()) or 1.0
            add = scale * torch.finfo(G.dtype).eps * 16
            for attempt in range(1, max_attempts + 1):
                Li, inf = torch.linalg.cholesky_ex(A[i] + add * eye)
                if int(inf) == 0:
                    L[i] = Li
                    damped.append(Damping(i, add, attempt))
                    break
                add *= 10.0
            else:
                raise FloatingPointError(
                    f"Cholesky failed for batch entry {i} even with damping {add:.3g}"
                )
    X = torch.cholesky_solve(rhs, L)
    return X.transpose(-1, -2), damped


def dense_reference(G, C, U0, lam) -> torch.Tensor:
    """Float64 dense solve of one module, for tests and checks (not used on the hot path)."""
    G, C, U0 = (t.to(torch.float64) for t in (G, C, U0))
    A = G + float(lam) * torch.eye(G.shape[-1], dtype=torch.float64, device=G.device)
    return torch.linalg.solve(A, (C + float(lam) * U0).T).T
