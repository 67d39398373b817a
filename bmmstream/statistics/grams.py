"""Sufficient statistics of the BMM regression, per module: G (d_in x d_in) and C (d_out x d_in).

Pure functions on tensors; where they are stored is store.py's business.

- data-free (Eq. 15):    G_t = U_t^T U_t
- data-assisted (Eq. 8): G_t = X_t X_t^T / n_t, the mean input Gram of task t (per-task
  normalised so tasks with more calibration tokens do not dominate)
- hybrid (Eq. 35):       G_t = eps * G_t^few + (1 - eps) * G_t^df, the plain convex combination, so
  eps = 0 is exactly data-free and eps = 1 exactly data-assisted. With `rescale` each side is first
  divided by its mean eigenvalue trace(G_t)/d_in (activation Grams and task-vector Grams live on
  scales orders of magnitude apart, so without it eps mostly picks the larger one).
In every case G = sum_t G_t and C = sum_t U_t G_t, accumulated task by task in one order, so equal
per-task Grams give bit-identical G and C whichever of combine / lowrank_combine built them;
datafree_stats may associate C_t = U_t U_t^T U_t the other way (below), so the hybrid endpoint
eps = 0 is taken from datafree_stats itself (methods/bmm.py), not from combine.

`dtype` is the accumulation dtype (None: the task vectors' dtype). methods/bmm.py accumulates in
float64: with low-rank task vectors G has a null space, and float32 roundoff there (about 1e-7 of
||G||) exceeds lam at small rho and spoils the solve (bench/precision.py).

FLOPs (bench/bmm_rate.py measures them against the machine's matmul peak). U^T U is symmetric, so
it is a rank-k update (SYRK: d_out d_in^2 FLOPs, one triangle) instead of a GEMM (2 d_out d_in^2);
on the CPU through scipy's BLAS on zero-copy views (torch has no SYRK), elsewhere as a blocked
product that skips most of the other triangle. C_t = U_t U_t^T U_t takes the cheaper association:
U_t (U_t^T U_t) costs 3 d_out d_in^2 with the SYRK, (U_t U_t^T) U_t costs d_in d_out^2 + 2 d_out^2 d_in
plus the d_out d_in^2 SYRK that G needs anyway; the second wins when 3 d_out < 2 d_in (k/v and
down projections). Both are 0.44-0.75x the 4 d_out d_in^2 of two GEMMs (0.58x over a Llama-3.1-8B layer).
"""
from __future__ import annotations

import functools

import torch

from bmmstream.statistics import blas_env
from bmmstream.plan.estimate import c_via_outer, datafree_flops  # the association rule and its cost: shape-only

# dtypes whose SYRK/SYMM go through scipy's BLAS on the CPU (others: torch's blocked products)
SCIPY_DTYPES = (torch.float32, torch.float64)
FILL_BLOCK = 1024  # rows per step when mirroring a triangle: temporaries of FILL_BLOCK^2, never d_in^2


def _scipy_blas(*ts: torch.Tensor) -> bool:
    """CPU tensors of one scipy dtype, and scipy's OpenBLAS threads sleep when idle (blas_env)."""
    return (all(t.device.type == "cpu" and t.dtype in SCIPY_DTYPES for t in ts) and len({t.dtype for t in ts}) == 1
            and blas_env.scipy_blas_fits())


def _blas_threads():
    """Limit scipy's BLAS to torch's thread count (the user's --threads) for the duration."""
    ctl = _blas_controller()
    if ctl is None:  # pragma: no cover - threadpoolctl older than 3 (a declared dependency)
        import contextlib

        return contextlib.nullcontext()
    return ctl.limit(limits=torch.get_num_threads())


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """scipy's BLAS libraries, found once per process: threadpoolctl's per-call discovery (parsing
    the loaded libraries) cost ~1 ms, several per module (7% of the statistics of a 0.35B layer)."""
    try:
        from threadpoolctl import ThreadpoolController  # threadpoolctl >= 3
    except ImportError:  # pragma: no cover - absent or older: scipy's BLAS runs with its own thread count
        return None
    import scipy.linalg.blas  # noqa: F401 - load the BLAS to be controlled before the discovery

    return ThreadpoolController().select(user_api="blas")


def _scipy_syrk(dtype: torch.dtype):
    from scipy.linalg import blas

    return blas.ssyrk if dtype == torch.float32 else blas.dsyrk


def syrk_lower_(A: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """out's lower triangle (diagonal included) := beta * out + alpha * A^T A; the strict upper
    triangle is left as it was on the CPU path (mirror it with fill_upper_). `out` is a contiguous
    [k, k] tensor in A's dtype, A is [n, k], C- or F-contiguous (e.g. U or U.T)."""
    if _scipy_blas(A, out) and out.is_contiguous() and (A.is_contiguous() or A.T.is_contiguous()):
        # numpy views of the torch buffers: out (row-major) is its transpose in Fortran order, so
        # BLAS's upper triangle is torch's lower one
        a, trans = (A.numpy().T, 0) if A.is_contiguous() else (A.numpy(), 1)
        c = out.numpy().T
        with _blas_threads():
            r = _scipy_syrk(A.dtype)(alpha, a, beta=beta, c=c, trans=trans, lower=0, overwrite_c=1)
        if r.ctypes.data != c.ctypes.data:  # f2py copied instead of writing in place (never for these views)
            out.copy_(torch.from_numpy(r.T))
        return out
    # other devices and dtypes: a block-row product per panel, the diagonal blocks computed whole
    # (at most 1/4 of the GEMM's surplus work)
    k = A.shape[1]
    step = max(1, -(-k // 4))
    for j0 in range(0, k, step):
        j1 = min(k, j0 + step)
        out[j0:j1, :j1].addmm_(A[:, j0:j1].T, A[:, :j1], beta=beta, alpha=alpha)
    return out


def symm_acc_(S: torch.Tensor, B: torch.Tensor, C: torch.Tensor, alpha: float, right: bool) -> torch.Tensor:
    """C += alpha * B S (`right`) or alpha * S B, where only S's lower triangle is valid (a SYMM:
    the triangle is never mirrored); S, C contiguous, B C-contiguous."""
    if _scipy_blas(S, B, C) and S.is_contiguous() and C.is_contiguous() and B.is_contiguous():
        from scipy.linalg import blas

        symm = blas.ssymm if S.dtype == torch.float32 else blas.dsymm
        # row-major C is C^T to Fortran: C^T += alpha S B^T (S on the left) or alpha B^T S (right)
        c = C.numpy().T
        with _blas_threads():
            r = symm(alpha, S.numpy().T, B.numpy().T, beta=1.0, c=c, side=0 if right else 1, lower=0, overwrite_c=1)
        if r.ctypes.data != c.ctypes.data:  # f2py copied (never for these views)
            C.copy_(torch.from_numpy(r.T))
        return C
    fill_upper_(S)
    return C.addmm_(B, S, alpha=alpha) if right else C.addmm_(S, B, alpha=alpha)


def fill_upper_(S: torch.Tensor) -> torch.Tensor:
    """Mirror S's lower triangle into its upper one in place (block by block: no d x d temporary)."""
    d = S.shape[-1]
    for r0 in range(0, d, FILL_BLOCK):
        r1 = min(d, r0 + FILL_BLOCK)
        blk = S[r0:r1, r0:r1]
        blk.copy_(blk.tril() + blk.tril(-1).T)
        if r1 < d:
            S[r0:r1, r1:].copy_(S[r1:, r0:r1].T)
    return S


def gram_(U: torch.Tensor, out: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """alpha U^T U, full symmetric, [d_in, d_in] in U's dtype (SYRK + mirror); `out` reused if given."""
    d_in = U.shape[-1]
    if out is None:
        out = torch.empty(d_in, d_in, dtype=U.dtype, device=U.device)
    return fill_upper_(syrk_lower_(U, out, alpha=alpha))


def datafree_grams(deltas: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-task G_t = U_t^T U_t, [T, d_in, d_in] (SYRK per task)."""
    dt = dtype or deltas.dtype
    T, _, d_in = deltas.shape
    out = torch.empty(T, d_in, d_in, dtype=dt, device=deltas.device)
    for t, U in enumerate(deltas):
        gram_(U.to(dt), out[t])
    return out


def _accumulate(deltas: torch.Tensor, grams, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """G = sum_t G_t, C = sum_t U_t G_t in `dtype`; `grams` yields G_t (one resident at a time)."""
    d_out, d_in = deltas.shape[-2:]
    G = torch.zeros(d_in, d_in, dtype=dtype, device=deltas.device)
    C = torch.zeros(d_out, d_in, dtype=dtype, device=deltas.device)
    for U, Gt in zip(deltas, grams):
        Gt = Gt.to(dtype)
        G += Gt
        C += U.to(dtype) @ Gt
    return G, C


def combine(
    deltas: torch.Tensor, grams: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """G = sum_t G_t, C = sum_t U_t G_t for per-task Grams [T, d_in, d_in]."""
    return _accumulate(deltas, grams, dtype or deltas.dtype)


def task_weights(deltas: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """w_t = mean_s ||U_s||^2 / ||U_t||^2: weights that give every task's Gram the same trace.

    The raw data-free sum weighs task t by ||U_t||^2, so an expert trained for fewer steps (a
    smaller task vector) is under-represented in G; these weights undo that, the data-free
    counterpart of dividing X_t X_t^T by n_t. Equal norms give weights 1 (the raw sum)."""
    sq = deltas.to(dtype or deltas.dtype).flatten(1).pow(2).sum(1)
    w = sq.mean() / sq.clamp_min(torch.finfo(sq.dtype).tiny)
    return torch.where(sq > 0, w, torch.zeros_like(w))


def datafree_stats(
    deltas: torch.Tensor, normalize_tasks: bool = False, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """G = sum_t w_t U_t^T U_t and C = sum_t w_t U_t U_t^T U_t, accumulated task by task in `dtype`
    (w_t = 1, the paper's Eq. 15, unless `normalize_tasks`: see task_weights)."""
    dt = dtype or deltas.dtype
    T, d_out, d_in = deltas.shape
    dev = deltas.device
    w = [1.0] * T if not normalize_tasks else [float(x) for x in task_weights(deltas, dt)]
    G = torch.zeros(d_in, d_in, dtype=dt, device=dev)
    C = torch.zeros(d_out, d_in, dtype=dt, device=dev)
    if c_via_outer(d_out, d_in):
        # G: one rank-(T d_out) update over the stacked task vectors when no cast or weight is needed
        stacked = deltas.dtype == dt and not normalize_tasks and deltas.is_contiguous()
        if stacked:
            syrk_lower_(deltas.reshape(T * d_out, d_in), G)
        H = torch.zeros(d_out, d_out, dtype=dt, device=dev)
        for t in range(T):  # one task's cast copy and d_out x d_out Gram resident at a time
            if w[t] == 0.0:
                continue
            U = deltas[t].to(dt).contiguous()
            if not stacked:
                syrk_lower_(U, G, alpha=w[t], beta=1.0)
            syrk_lower_(U.T, H)  # U U^T, lower triangle
            symm_acc_(H, U, C, w[t], right=False)  # C += w (U U^T) U
            del U  # the next task's cast copy is not allocated beside this one
    else:
        Gt = torch.zeros(d_in, d_in, dtype=dt, device=dev)  # upper triangle stays 0: SYRK writes the lower
        for t in range(T):  # one task's d_in x d_in Gram resident at a time
            if w[t] == 0.0:
                continue
            U = deltas[t].to(dt).contiguous()
            syrk_lower_(U, Gt)
            G.add_(Gt, alpha=w[t])
            symm_acc_(Gt, U, C, w[t], right=True)  # C += w U (U^T U)
            del U
    fill_upper_(G)  # once per module: the lower triangle was accumulated
    return G, C


def _unit_trace(g: torch.Tensor) -> torch.Tensor:
    d = g.shape[-1]
    tr = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1) / d
    return torch.where(tr > 0, tr, torch.ones_like(tr))


def hybrid_grams(
    deltas: torch.Tensor, few: torch.Tensor, eps: float, rescale: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """eps * G_few + (1 - eps) * G_df per task (each side first scaled to mean eigenvalue 1 if `rescale`)."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    dt = dtype or deltas.dtype
    df = datafree_grams(deltas, dt)
    few = few.to(dt)
    if rescale:
        few = few / _unit_trace(few)[:, None, None]
        df = df / _unit_trace(df)[:, None, None]
    if eps == 0.0:  # the exact endpoints (0 * few would turn an Inf into NaN)
        return df
    if eps == 1.0:
        return few
    return eps * few + (1.0 - eps) * df


# -- low-rank task vectors (LoRA experts) ------------------------------------------------------
# U_t = B_t A_t with B_t [d_out, r_t] (the LoRA scaling folded in) and A_t [r_t, d_in]. U_t^T U_t
# and U_t U_t^T U_t then come from r-sized products, O(r d_in^2 + r d_out d_in) per task instead of
# O(d_out d_in^2), and U_t is never formed:
#   G_t = A^T (B^T B) A            C_t = U_t G_t = B [(A A^T)(B^T B)] A
# r_t = 0 (a module an adapter leaves alone) gives G_t = 0, C_t = 0.
Factors = list[tuple[torch.Tensor, torch.Tensor]]


def lowrank_grams(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """G_t = A^T (B^T B) A, [d_in, d_in], for U_t = B A."""
    dt = dtype or B.dtype
    B, A = B.to(dt), A.to(dt)
    return A.T @ ((B.T @ B) @ A)


def _lowrank_sq_norms(factors: Factors, dtype: torch.dtype) -> torch.Tensor:
    """||B_t A_t||_F^2 = <B^T B, A A^T> per task, [T]."""
    return torch.stack([
        ((B.to(dtype).T @ B.to(dtype)) * (A.to(dtype) @ A.to(dtype).T)).sum() for B, A in factors
    ])


def lowrank_task_weights(factors: Factors, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """task_weights (equal-trace weights) from the factors: trace(U_t^T U_t) = ||U_t||_F^2."""
    sq = _lowrank_sq_norms(factors, dtype)
    w = sq.mean() / sq.clamp_min(torch.finfo(sq.dtype).tiny)
    return torch.where(sq > 0, w, torch.zeros_like(w))


def _shapes(factors: Factors) -> tuple[int, int]:
    d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
    for B, A in factors:
        if B.shape[0] != d_out or A.shape[1] != d_in or B.shape[1] != A.shape[0]:
            raise ValueError(f"factors {tuple(B.shape)} x {tuple(A.shape)} do not form a ({d_out}, {d_in}) task vector")
    return d_out, d_in


def lowrank_datafree_stats(
    factors: Factors, normalize_tasks: bool = False, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """datafree_stats for U_t = B_t A_t without forming U_t: G = sum_t w_t A^T (B^T B) A and
    C = sum_t w_t B [(A A^T)(B^T B)] A, accumulated task by task in `dtype`."""
    dt = dtype or factors[0][0].dtype
    d_out, d_in = _shapes(factors)
    dev = factors[0][0].device
    w = lowrank_task_weights(factors, dt) if normalize_tasks else None
    G = torch.zeros(d_in, d_in, dtype=dt, device=dev)
    C = torch.zeros(d_out, d_in, dtype=dt, device=dev)
    for t, (B, A) in enumerate(factors):  # r x r products first: d_out x d_in is touched once
        B, A = B.to(dt), A.to(dt)
        M = B.T @ B if w is None else w[t] * (B.T @ B)  # w_t B^T B
        G.addmm_(A.T, M @ A)  # in place: no d_in x d_in temporary per task
        C.addmm_(B @ ((A @ A.T) @ M), A)
    return G, C


def lowrank_combine(factors: Factors, grams: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """combine() for U_t = B_t A_t: G = sum_t G_t, C = sum_t B_t (A_t G_t), O(r d_in^2 + r d_out d_in) per task."""
    dt = dtype or factors[0][0].dtype
    d_out, d_in = _shapes(factors)
    dev = factors[0][0].device
    G = torch.zeros(d_in, d_in, dtype=dt, device=dev)
    C = torch.zeros(d_out, d_in, dtype=dt, device=dev)
    for (B, A), Gt in zip(factors, grams):
        Gt = Gt.to(dt)
        G += Gt
        C.addmm_(B.to(dt), A.to(dt) @ Gt)
    return G, C


def lowrank_hybrid_grams(
    factors: Factors, few: torch.Tensor, eps: float, rescale: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """hybrid_grams for U_t = B_t A_t: the data-free side A^T (B^T B) A from the factors, then the
    same mixing (and endpoints) as hybrid_grams."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    dt = dtype or factors[0][0].dtype
    df = torch.stack([lowrank_grams(B, A, dt) for B, A in factors])
    few = few.to(dt)
    if rescale:
        few = few / _unit_trace(few)[:, None, None]
        df = df / _unit_trace(df)[:, None, None]
    if eps == 0.0:
        return df
    if eps == 1.0:
        return few
    return eps * few + (1.0 - eps) * df
