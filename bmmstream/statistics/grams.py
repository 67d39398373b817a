"""Sufficient statistics of the BMM regression, per module: G (d_in x d_in) and C (d_out x d_in).

Pure functions on tensors; where they are stored is store.py's business.

- data-free (Eq. 15):    G_t = U_t^T U_t
- data-assisted (Eq. 8): G_t = X_t X_t^T / n_t, the mean input Gram of task t (per-task
  normalised so tasks with more calibration tokens do not dominate)
- hybrid (Eq. 35):       G_t = eps * G_t^few + (1 - eps) * G_t^df, where each side is first divided
  by its mean eigenvalue trace(G_t)/d_in, because activation Grams and task-vector Grams live on
  scales many orders apart and eps would otherwise only pick the larger one.
In every case G = sum_t G_t and C = sum_t U_t G_t.
"""
from __future__ import annotations

import torch


def datafree_grams(deltas: torch.Tensor) -> torch.Tensor:
    """Per-task G_t = U_t^T U_t, [T, d_in, d_in]."""
    return deltas.transpose(-1, -2) @ deltas


def combine(deltas: torch.Tensor, grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = sum_t G_t, C = sum_t U_t G_t for per-task Grams [T, d_in, d_in]."""
    G = grams.sum(0)
    C = torch.einsum("toi,tij->oj", deltas, grams)
    return G, C


def task_weights(deltas: torch.Tensor) -> torch.Tensor:
    """w_t = mean_s ||U_s||^2 / ||U_t||^2: weights that give every task's Gram the same trace.

    The raw data-free sum weighs task t by ||U_t||^2, so an expert trained for fewer steps (a
    smaller task vector) is under-represented in G; these weights undo that, the data-free
    counterpart of dividing X_t X_t^T by n_t. Equal norms give weights 1 (the raw sum)."""
    sq = deltas.flatten(1).pow(2).sum(1)
    w = sq.mean() / sq.clamp_min(torch.finfo(sq.dtype).tiny)
    return torch.where(sq > 0, w, torch.zeros_like(w))


def datafree_stats(deltas: torch.Tensor, normalize_tasks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """G = sum_t w_t U_t^T U_t and C = sum_t w_t U_t U_t^T U_t, accumulated task by task
    (w_t = 1, the paper's Eq. 15, unless `normalize_tasks`: see task_weights)."""
    d_out, d_in = deltas.shape[-2:]
    w = task_weights(deltas) if normalize_tasks else torch.ones(deltas.shape[0], dtype=deltas.dtype, device=deltas.device)
    G = torch.zeros(d_in, d_in, dtype=deltas.dtype, device=deltas.device)
    C = torch.zeros(d_out, d_in, dtype=deltas.dtype, device=deltas.device)
    for wt, U in zip(w, deltas):  # one task's d_in x d_in Gram resident at a time
        Gt = wt * (U.T @ U)
        G += Gt
        C += U @ Gt
    return G, C


def _unit_trace(g: torch.Tensor) -> torch.Tensor:
    d = g.shape[-1]
    tr = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1) / d
    return torch.where(tr > 0, tr, torch.ones_like(tr))


def hybrid_grams(deltas: torch.Tensor, few: torch.Tensor, eps: float) -> torch.Tensor:
    """eps * G_few + (1 - eps) * G_df per task, each side scaled to mean eigenvalue 1."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    df = datafree_grams(deltas)
    few = few / _unit_trace(few)[:, None, None]
    df = df / _unit_trace(df)[:, None, None]
    return eps * few + (1.0 - eps) * df
