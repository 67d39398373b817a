"""Cauchy product-of-experts merge (Bui et al., 2026, "Model Merging as Probabilistic Inference in
Fine-Tuning Parameter Space", arXiv 2607.01689: heavy-tailed PoE with Cauchy experts).

Only the paper's abstract was available when this was written, so the update below is derived from
the objective named in issue 3, not copied from the authors' code; the defaults are ours.
Each task is a Cauchy expert on the directional residual U_t^T (U - U_t) (d_in x d_in):
    J(U) = sum_t log(||U_t^T (U - U_t)||_F^2 + eps ||U_t||_F^2).
Iteratively reweighted least squares: with alpha_t = 1 / (||U_t^T (U_k - U_t)||^2 + eps ||U_t||^2)
at the current iterate, the next iterate minimises the weighted quadratic majoriser plus a tiny
proximal term,
    sum_t alpha_t ||U_t^T (U - U_t)||^2 + r ||U - U_k||^2
    =>  (sum_t alpha_t P_t + r I) U = sum_t alpha_t P_t U_t + r U_k,   P_t = U_t U_t^T (d_out x d_out),
solved by Cholesky (float64; on failure r grows tenfold and the solve is retried). Because log is
concave, J never increases (majorise-minimise), and the proximal term keeps U where the output-side
Gram is rank-deficient (directions no task touches) instead of sending it to zero; with T = 1 the
fixed point is U_1 itself. r = ridge * trace(sum alpha P) / d_out.
Start: U_0 = sum_t U_t. Stop when ||U_{k+1} - U_k||_F / ||U_k||_F < tol or after max_iter steps.
Defaults (ours): eps 1e-3, ridge 1e-6, tol 1e-4, max_iter 50.

Non-2-D tensors ("vector") and embeddings/lm_head ("embedding", where P_t would be vocab x vocab):
the mean of the task vectors (the product of equal isotropic Gaussian experts).
"""
from __future__ import annotations

import math

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register

MAX_RIDGE_RETRIES = 8


def cauchy_objective(u: torch.Tensor, deltas: torch.Tensor, eps: float) -> float:
    """J(U) = sum_t log(||U_t^T (U - U_t)||^2 + eps ||U_t||^2) (tasks with U_t = 0 left out)."""
    total = 0.0
    for ut in deltas:
        n2 = float(ut.pow(2).sum())
        if n2 > 0:
            total += math.log(float((ut.T @ (u - ut)).pow(2).sum()) + eps * n2)
    return total


def poe_cauchy_merge(
    deltas: torch.Tensor,
    eps: float = 1e-3,
    ridge: float = 1e-6,
    tol: float = 1e-4,
    max_iter: int = 50,
    objective: list | None = None,
) -> torch.Tensor:
    """Cauchy PoE merge of stacked task vectors [T, m, n] -> [m, n] by IRLS.

    If `objective` is a list, J at every iterate (the start included) is appended to it."""
    dt = deltas.dtype
    x = deltas.to(torch.float64)
    keep = [t for t in range(x.shape[0]) if float(x[t].pow(2).sum()) > 0]
    u = x.sum(0)
    if not keep:
        return u.to(dt)
    x = x[keep]
    m = x.shape[1]
    norms2 = x.pow(2).sum((1, 2))
    rhs_t = torch.stack([ut @ (ut.T @ ut) for ut in x])  # P_t U_t, fixed across iterations
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    for it in range(max_iter + 1):
        resid = torch.stack([(ut.T @ (u - ut)).pow(2).sum() for ut in x])
        floor = resid + eps * norms2
        if objective is not None:
            objective.append(float(floor.log().sum()))
        if it == max_iter:
            break
        alpha = 1.0 / floor
        alpha = alpha / alpha.max()  # a common factor does not change the step
        a = torch.einsum("t,tij,tkj->ik", alpha, x, x)
        rhs = torch.einsum("t,tij->ij", alpha, rhs_t)
        r = ridge * float(torch.trace(a)) / m
        if not r > 0:
            r = ridge
        for _ in range(MAX_RIDGE_RETRIES):
            chol, info = torch.linalg.cholesky_ex(a + r * eye)
            if int(info) == 0:
                break
            r *= 10.0
        else:
            raise BmmError("poe_cauchy: output-side Gram not positive definite even with damping")
        new = torch.cholesky_solve(rhs + r * u, chol)
        step = float((new - u).norm()) / max(float(u.norm()), 1e-30)
        u = new
        if step < tol:
            if objective is not None:
                resid = torch.stack([(ut.T @ (u - ut)).pow(2).sum() for ut in x])
                objective.append(float((resid + eps * norms2).log().sum()))
            break
    return u.to(dt)


@register
class PoECauchy(MergeMethod):
    name = "poe_cauchy"
    defaults = {"eps": 1e-3, "ridge": 1e-6, "tol": 1e-4, "max_iter": 50}

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        p = self.params
        if not (float(p["eps"]) > 0 and float(p["ridge"]) > 0 and float(p["tol"]) > 0 and int(p["max_iter"]) >= 0):
            raise BmmError(f"merge method 'poe_cauchy': eps, ridge, tol must be > 0 and max_iter >= 0, got {p}")

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        if inp.spec.kind != "linear" or inp.deltas.dim() != 3:
            return inp.deltas.mean(0)
        p = self.params
        return poe_cauchy_merge(
            inp.deltas, float(p["eps"]), float(p["ridge"]), float(p["tol"]), int(p["max_iter"])
        )
