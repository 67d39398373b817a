"""Cheap re-solves of the BMM closed form for many lam (the outer search), as pure tensor functions.

U(lam) = (C + lam U0) (G + lam I)^-1, with G (d_in x d_in, symmetric PSD), C and U0 (d_out x d_in).
A Cholesky solve per trial costs a factorisation (d_in^3 / 3) plus two triangular solves. With
G = Q diag(e) Q^T computed once, (G + lam I)^-1 = Q diag(1 / (e + lam)) Q^T, so

    U(lam) = (C Q + lam U0 Q) diag(1 / (e + lam)) Q^T                                    (exact)

and with CQ = C Q, U0Q = U0 Q precomputed a trial is one (d_out x d_in) @ (d_in x d_in) matmul.

Residual form. Since lam diag(1/(e+lam)) = I - diag(e/(e+lam)) and U0 Q Q^T = U0,

    U(lam) = U0 + (C Q - U0 Q diag(e)) diag(1 / (e + lam)) Q^T                          (exact)

`prepare` uses this form for every k (k = None: all d_in eigenpairs): A = C Q - U0 Q diag(e) is
computed once in float64 (eigh of G in float64 too), so the anchor's component outside span(G),
where e ~ 0 and the exact A is 0, is never divided by a tiny lam; the direct form above loses it
in float32 (bench/precision.py: error 2-30 at rho 1e-6 on rank-1..16 task vectors). A and Q are
then kept in U0's dtype (the compute dtype) and e, 1/(e + lam) in float64, so a trial is still one
matmul in the compute dtype. lam = rho * trace(G)/d_in with the trace taken from G's diagonal,
exactly as solve.closed_form.lam_from_rho, so a trial and the written merge use the same lam.

Rank-k truncation. Keeping only the top-k eigenpairs (Q_k, e_k) drops the term
(C Q_r - U0 Q_r diag(e_r)) diag(1 / (e_r + lam)) Q_r^T of the discarded directions, i.e. in those
directions the merged update is U0 (the lam -> inf limit). The truncation is exact when e_r = 0 and
C Q_r = 0 (C lies in range(Q_k)); both hold when k >= rank(G) for data-free statistics
(C = sum_t U_t U_t^T U_t has its rows in the row space of G = sum_t U_t^T U_t) and for data-assisted
ones (C = sum_t U_t X_t X_t^T). `truncation_error` measures the error for a given k and lam.

Every function is batched over any leading dimensions (modules of equal shape stacked on dim 0);
lam may be a float or a tensor broadcastable to those leading dimensions (one lam per module).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def eigen_factor(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = Q diag(e) Q^T by one `torch.linalg.eigh`, eigenvalues descending.

    G is PSD by construction; eigenvalues that roundoff pushes below zero are clamped to zero so
    that e + lam > 0 for every lam > 0.
    """
    e, Q = torch.linalg.eigh(G)
    e = e.flip(-1).clamp_min(0)
    Q = Q.flip(-1)
    return e, Q


def _lam_tensor(lam: float | torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """lam as a tensor of shape [..., 1] matching e's leading dimensions."""
    lam_t = torch.as_tensor(lam, dtype=e.dtype, device=e.device)
    if lam_t.dim() == 0:
        return lam_t.reshape(1)
    return lam_t.unsqueeze(-1)


def solve_eigen(
    CQ: torch.Tensor, U0Q: torch.Tensor, e: torch.Tensor, Q: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """U(lam) = (CQ + lam U0Q) diag(1 / (e + lam)) Q^T: exact, one matmul per trial.

    CQ, U0Q: [..., d_out, d_in]; e: [..., d_in]; Q: [..., d_in, d_in].
    """
    lam_t = _lam_tensor(lam, e)
    inv = 1.0 / (e + lam_t)  # [..., d_in]
    lam_m = lam_t.unsqueeze(-1)  # [..., 1, 1] (or [1, 1])
    return ((CQ + lam_m * U0Q) * inv.unsqueeze(-2)) @ Q.transpose(-1, -2)


def solve_eigen_truncated(
    U0: torch.Tensor, A: torch.Tensor, e_k: torch.Tensor, Q_k: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """U(lam) = U0 + A diag(1 / (e_k + lam)) Q_k^T with A = C Q_k - U0 Q_k diag(e_k).

    U0: [..., d_out, d_in]; A: [..., d_out, k]; e_k: [..., k]; Q_k: [..., d_in, k].
    Exact for k = d_in; see the module docstring for when a smaller k is exact.
    """
    inv = (1.0 / (e_k + _lam_tensor(lam, e_k))).to(A.dtype)  # e_k may be float64, A the compute dtype
    return U0 + (A * inv.unsqueeze(-2)) @ Q_k.transpose(-1, -2)


def lam_from_rho(e: torch.Tensor, rho: float | torch.Tensor) -> torch.Tensor:
    """Relative damping: lam = rho * trace(G) / d_in, per module (e holds all d_in eigenvalues)."""
    return torch.as_tensor(rho, dtype=e.dtype, device=e.device) * e.mean(-1)


@dataclass
class SpectralStats:
    """What a search keeps per batch of modules so that a new lam costs one matmul.

    U(lam) = U0 + A diag(1 / (e + lam)) Q^T with A = C Q - U0 Q diag(e) (the residual form).
    `k` is None when all d_in eigenpairs are kept (exact) and an int for the top-k truncation.
    e and `trace_over_d` (trace(G) / d_in of the full G, for relative lam, so truncation does not
    change what a rho means) are float64; U0, A and Q are in the compute dtype.
    """

    e: torch.Tensor
    Q: torch.Tensor
    trace_over_d: torch.Tensor
    U0: torch.Tensor
    A: torch.Tensor
    k: int | None = None

    def lam(self, rho: float | torch.Tensor) -> torch.Tensor:
        rho_t = rho.to(self.e.dtype) if isinstance(rho, torch.Tensor) else torch.tensor(rho, dtype=self.e.dtype)
        return rho_t.to(self.e.device) * self.trace_over_d

    def solve(self, lam: float | torch.Tensor) -> torch.Tensor:
        return solve_eigen_truncated(self.U0, self.A, self.e, self.Q, lam)


def prepare(
    G: torch.Tensor, C: torch.Tensor, U0: torch.Tensor, k: int | None = None, *, dtype: torch.dtype = torch.float64
) -> SpectralStats:
    """Factor G once (in `dtype`, float64 by default) and precompute A = C Q_k - U0 Q_k diag(e_k)
    in `dtype`; A, Q_k and U0 are then kept in U0's dtype (all d_in pairs if k is None, else top-k)."""
    d_in = G.shape[-1]
    if k is not None and not 1 <= k <= d_in:
        raise ValueError(f"rank k={k} must be in [1, {d_in}]")
    work = U0.dtype
    G, C, U0w = G.to(dtype), C.to(dtype), U0.to(dtype)
    trace_over_d = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1) / d_in
    e, Q = eigen_factor(G)
    if k is not None:
        e, Q = e[..., :k].contiguous(), Q[..., :k].contiguous()
    A = C @ Q - (U0w @ Q) * e.unsqueeze(-2)
    return SpectralStats(e=e, Q=Q.to(work), trace_over_d=trace_over_d, U0=U0, A=A.to(work), k=k)


def solve_dense(G: torch.Tensor, C: torch.Tensor, U0: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Reference: (G + lam I) U^T = (C + lam U0)^T by a Cholesky factorisation (one per call)."""
    lam_t = torch.as_tensor(lam, dtype=G.dtype, device=G.device)
    lam_m = lam_t.reshape(lam_t.shape + (1, 1)) if lam_t.dim() else lam_t
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky(G + lam_m * eye)
    rhs = (C + lam_m * U0).transpose(-1, -2)
    return torch.cholesky_solve(rhs, L).transpose(-1, -2)


def truncation_errors(
    G: torch.Tensor, C: torch.Tensor, U0: torch.Tensor, ks: list[int], lams: list[float]
) -> torch.Tensor:
    """Relative Frobenius error ||U_k(lam) - U(lam)|| / ||U(lam)||, shape [len(lams), len(ks), ...]
    (leading module dimensions last); one eigendecomposition in float64 for all k and lam."""
    G64, C64, U064 = G.double(), C.double(), U0.double()
    e, Q = eigen_factor(G64)
    CQ, U0Q = C64 @ Q, U064 @ Q
    tiny = torch.finfo(torch.float64).tiny
    out = []
    for lam in lams:
        exact = solve_eigen(CQ, U0Q, e, Q, lam)
        den = torch.linalg.matrix_norm(exact).clamp_min(tiny)
        row = []
        for k in ks:
            if not 1 <= k <= G.shape[-1]:
                raise ValueError(f"rank k={k} must be in [1, {G.shape[-1]}]")
            A = CQ[..., :k] - U0Q[..., :k] * e[..., :k].unsqueeze(-2)
            approx = solve_eigen_truncated(U064, A, e[..., :k], Q[..., :k], lam)
            row.append(torch.linalg.matrix_norm(approx - exact) / den)
        out.append(torch.stack(row))
    return torch.stack(out)


def truncation_error(
    G: torch.Tensor, C: torch.Tensor, U0: torch.Tensor, k: int, lam: float | torch.Tensor
) -> torch.Tensor:
    """Relative Frobenius error ||U_k(lam) - U(lam)|| / ||U(lam)|| per module (float64 internally)."""
    G64, C64, U064 = G.double(), C.double(), U0.double()
    lam64 = lam.double() if isinstance(lam, torch.Tensor) else lam
    exact = prepare(G64, C64, U064).solve(lam64)
    approx = prepare(G64, C64, U064, k=k).solve(lam64)
    num = torch.linalg.matrix_norm(approx - exact)
    den = torch.linalg.matrix_norm(exact).clamp_min(torch.finfo(torch.float64).tiny)
    return num / den
