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
per-task Grams give bit-identical G and C whichever function built them.

`dtype` is the accumulation dtype (None: the task vectors' dtype). methods/bmm.py accumulates in
float64: with low-rank task vectors G has a null space, and float32 roundoff there (about 1e-7 of
||G||) exceeds lam at small rho and spoils the solve (bench/precision.py).
"""
from __future__ import annotations

import torch


def datafree_grams(deltas: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-task G_t = U_t^T U_t, [T, d_in, d_in] (the same product, task by task, as datafree_stats)."""
    dt = dtype or deltas.dtype
    return torch.stack([U.to(dt).T @ U.to(dt) for U in deltas])


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
    w = task_weights(deltas, dt) if normalize_tasks else None

    def grams():
        for t, U in enumerate(deltas):  # one task's d_in x d_in Gram resident at a time
            U = U.to(dt)
            Gt = U.T @ U
            yield Gt if w is None else w[t] * Gt

    return _accumulate(deltas, grams(), dt)


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
