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

Memory. With `overwrite=True` the caller hands G and C over: on the CPU each module is then solved in
place (LAPACK potrf/potrs, torch's own MKL through ctypes, else scipy's, on zero-copy views): R
overwrites C, the factor overwrites one
triangle of G while the other keeps G for a retry, and the solution overwrites R, so a module costs
no d_in x d_in or d_out x d_in temporary beyond U0 in `dtype` and the result.
"""
from __future__ import annotations

import functools
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
    """Raise NonFiniteStatistics for the first batch entry with NaN/Inf (never a 'damping nan').

    A finite sum means every entry is finite (NaN and Inf propagate), and a sum allocates nothing,
    while torch.isfinite on a float tensor builds |t| (a copy of G: 1.6 GB for an 8B down_proj in
    float64); only a non-finite sum (NaN/Inf, or an overflow) is checked entry by entry, a row block
    at a time."""
    for what, t in (("G", G), ("C", C), ("the anchor U0", U0)):
        for b in range(t.shape[0]):
            if bool(torch.isfinite(t[b].sum())):
                continue
            rows = max(1, (1 << 22) // max(1, t[b].numel() // max(1, t.shape[1])))
            if any(not bool(torch.isfinite(t[b, r:r + rows]).all()) for r in range(0, t.shape[1], rows)):
                raise NonFiniteStatistics(b, what)
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
    overwrite: bool = False,
) -> tuple[torch.Tensor, list[Damping]]:
    """Batched solve over modules of equal shape, U = U0 + (C - U0 G)(G + lam I)^-1 in `dtype`.

    G: [B, d_in, d_in] symmetric PSD, C, U0: [B, d_out, d_in], lam: [B] (>= 0).
    Returns U [B, d_out, d_in] in U0's dtype and the damping applied to modules whose Cholesky failed.
    Raises NonFiniteStatistics when an input holds NaN/Inf. `overwrite`: G and C may be destroyed
    (solved in place where the device and dtype allow; see the module docstring).
    """
    out_dtype = U0.dtype
    B, d_in, _ = G.shape
    lam = torch.as_tensor(lam, device=G.device).to(dtype).reshape(B)
    if (overwrite and G.device.type == "cpu" and dtype in (torch.float32, torch.float64)
            and G.dtype == dtype and C.dtype == dtype and G.is_contiguous() and C.is_contiguous()):
        check_finite(G, C, U0, lam)
        damped: list[Damping] = []
        outs = []
        for i in range(B):
            U, d = _solve_in_place(G[i], C[i], U0[i], float(lam[i]), max_attempts)
            outs.append(U.to(out_dtype))
            if d is not None:
                damped.append(Damping(i, d[0], d[1]))
        return (outs[0].unsqueeze(0) if B == 1 else torch.stack(outs)), damped
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


def _torch_lapack(dtype: torch.dtype):
    """(potrf, potrs) of the LAPACK torch itself links (MKL on x86 wheels), called in place through
    ctypes, or None when libtorch does not export them. scipy's OpenBLAS potrf measured 2-5x slower
    than MKL's on 2 shared cores, and torch.linalg.cholesky_ex / cholesky_solve copy their inputs
    even with out= aliasing them."""
    return _lapack_table().get(dtype)


@functools.lru_cache(maxsize=None)
def _lapack_table() -> dict:
    """The symbols, looked up once per process; empty when absent or when they disagree with torch."""
    import ctypes
    import os

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        table = {dt: (getattr(lib, f"{p}potrf_"), getattr(lib, f"{p}potrs_"))
                 for dt, p in ((torch.float32, "s"), (torch.float64, "d"))}
    except (OSError, AttributeError):
        return {}
    return table if _lapack_agrees(table[torch.float64]) else {}  # another integer ABI or routine: not used


def _lapack_agrees(fns) -> bool:
    """Whether the ctypes potrf/potrs `fns` give torch's own Cholesky solve on a small SPD system (a
    guard against a libtorch whose LAPACK symbols take other argument types)."""
    import ctypes

    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64, generator=g)
    G = A @ A.T + 5 * torch.eye(5, dtype=torch.float64)
    R = torch.randn(3, 5, dtype=torch.float64, generator=g)
    want = torch.linalg.solve(G, R.T).T
    L, X = G.clone(), R.clone()
    c, n, m, info = ctypes.c_char(b"U"), ctypes.c_int(5), ctypes.c_int(3), ctypes.c_int(0)
    fns[0](ctypes.byref(c), ctypes.byref(n), ctypes.c_void_p(L.data_ptr()), ctypes.byref(n), ctypes.byref(info))
    if info.value != 0:
        return False
    fns[1](ctypes.byref(c), ctypes.byref(n), ctypes.byref(m), ctypes.c_void_p(L.data_ptr()), ctypes.byref(n),
           ctypes.c_void_p(X.data_ptr()), ctypes.byref(n), ctypes.byref(info))
    return info.value == 0 and bool(torch.allclose(X, want, rtol=1e-10, atol=1e-12))


def _factor_(G: torch.Tensor) -> int:
    """Cholesky of symmetric G in place: L into torch's lower triangle, the strict upper one untouched
    (a row-major buffer is its transpose to Fortran, so Fortran's 'U' is torch's lower triangle)."""
    import ctypes

    fns = _torch_lapack(G.dtype)
    n = G.shape[0]
    if fns is not None:
        c, nn, info = ctypes.c_char(b"U"), ctypes.c_int(n), ctypes.c_int(0)
        fns[0](ctypes.byref(c), ctypes.byref(nn), ctypes.c_void_p(G.data_ptr()), ctypes.byref(nn), ctypes.byref(info))
        return info.value
    from scipy.linalg import lapack

    from bmmstream.statistics.grams import _blas_threads

    a = G.numpy().T
    with _blas_threads():
        r, info = (lapack.spotrf if G.dtype == torch.float32 else lapack.dpotrf)(a, lower=0, clean=0, overwrite_a=1)
    if r.ctypes.data != a.ctypes.data:  # f2py copied (never for this view)
        G.copy_(torch.from_numpy(r.T))
    return int(info)


def _solve_factored_(L: torch.Tensor, R: torch.Tensor) -> None:
    """R := R (G)^-1 in place for the factor of _factor_ (R [d_out, d_in] row-major is the Fortran
    right-hand side G X = R^T)."""
    import ctypes

    fns = _torch_lapack(L.dtype)
    n, m = L.shape[0], R.shape[0]
    if fns is not None:
        c, nn, mm, info = ctypes.c_char(b"U"), ctypes.c_int(n), ctypes.c_int(m), ctypes.c_int(0)
        fns[1](ctypes.byref(c), ctypes.byref(nn), ctypes.byref(mm), ctypes.c_void_p(L.data_ptr()), ctypes.byref(nn),
               ctypes.c_void_p(R.data_ptr()), ctypes.byref(nn), ctypes.byref(info))
        ok = info.value
    else:
        from scipy.linalg import lapack

        from bmmstream.statistics.grams import _blas_threads

        b = R.numpy().T
        with _blas_threads():
            x, ok = (lapack.spotrs if L.dtype == torch.float32 else lapack.dpotrs)(L.numpy().T, b, lower=0, overwrite_b=1)
        if x.ctypes.data != b.ctypes.data:
            R.copy_(torch.from_numpy(x.T))
    if ok != 0:
        raise ValueError(f"potrs: illegal argument {-ok}")


def _solve_in_place(
    G: torch.Tensor, C: torch.Tensor, U0: torch.Tensor, lam: float, max_attempts: int
) -> tuple[torch.Tensor, tuple[float, int] | None]:
    """One module on the CPU, G [d_in, d_in] and C [d_out, d_in] contiguous in the solve dtype and
    consumed. Returns U in that dtype (C's buffer) and (added, attempts) if the factorisation was damped."""
    from bmmstream.statistics.grams import fill_upper_

    dt = G.dtype
    U0 = U0.to(dt)
    if not bool(G.any()):  # zero task vectors: R = C, and U = U0 for any lam > 0
        return C.add_(U0), None
    C.addmm_(U0, G, alpha=-1.0)  # R = C - U0 G, in C's buffer
    diag = torch.diagonal(G).clone()
    add, attempt = 0.0, 0
    while True:
        torch.diagonal(G).copy_(diag + (lam + add))
        info = _factor_(G)
        if info == 0:
            break
        if info < 0:
            raise ValueError(f"potrf: illegal argument {-info}")
        fill_upper_(G.T)  # G's lower triangle again from its untouched upper one (the diagonal is reset above)
        attempt += 1
        if attempt > max_attempts:
            raise FloatingPointError(f"Cholesky failed even with lam + {add:.3g}")
        # as bmm_solve: first delta sqrt(eps) of G's mean eigenvalue, then tenfold
        add = float(diag.abs().mean()) * torch.finfo(dt).eps ** 0.5 if attempt == 1 else add * 10.0
    _solve_factored_(G, C)
    return C.add_(U0), ((add, attempt) if attempt else None)


def dense_reference(G, C, U0, lam) -> torch.Tensor:
    """Float64 dense solve of one module, direct form, for tests and checks (not on the hot path)."""
    G, C, U0 = (t.to(torch.float64) for t in (G, C, U0))
    A = G + float(lam) * torch.eye(G.shape[-1], dtype=torch.float64, device=G.device)
    return torch.linalg.solve(A, (C + float(lam) * U0).T).T
