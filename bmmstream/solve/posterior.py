"""Posterior sampling of a merged linear (the paper's App. B) and the calibration it is judged by.

BMM's merged rows are the MAP of a Gaussian posterior: row i of U is N(U_MAP[i], beta^-1 (G + lam I)^-1),
rows independent, with G the module's (d_in x d_in) Gram of the merge and lam its absolute damping.
`sample_rows` draws S such matrices through the Cholesky factor of G + lam I (no inverse is formed);
`ensemble_probs` averages the softmax predictions of the sampled models; `ece` is the expected
calibration error with equal-width confidence bins; `ensemble_nll` the ensemble's negative
log-likelihood (what beta is chosen by). Pure functions on tensors.
"""
from __future__ import annotations

import math

import torch


def sample_rows(U_map: torch.Tensor, G: torch.Tensor, lam: float, beta: float, S: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """S draws of the merged matrix, shape (S, d_out, d_in): U_MAP + X with every row of X ~
    N(0, (G + lam I)^-1 / beta), independent. X^T = L^-T Z / sqrt(beta) with L L^T = G + lam I and
    Z standard normal, so Cov = L^-T L^-1 / beta = (G + lam I)^-1 / beta. beta = inf gives U_MAP.
    Computed in the dtype of G (use float64 for small lam); returned in U_map's dtype."""
    if S < 1:
        raise ValueError(f"sample_rows: S must be >= 1, got {S}")
    if not beta > 0:
        raise ValueError(f"sample_rows: beta must be > 0, got {beta}")
    d_out, d_in = U_map.shape
    if G.shape != (d_in, d_in):
        raise ValueError(f"sample_rows: G has shape {tuple(G.shape)}, expected ({d_in}, {d_in})")
    if math.isinf(beta):
        return U_map.unsqueeze(0).expand(S, d_out, d_in).clone()
    dtype = G.dtype
    A = G + lam * torch.eye(d_in, dtype=dtype, device=G.device)
    L = torch.linalg.cholesky(A)
    Z = torch.randn(S, d_in, d_out, dtype=dtype, device=G.device, generator=generator)
    X = torch.linalg.solve_triangular(L.mT.expand(S, d_in, d_in), Z, upper=True)  # L^T X = Z
    return (U_map.to(dtype).unsqueeze(0) + X.mT / math.sqrt(beta)).to(U_map.dtype)


def ensemble_probs(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the S models' softmax predictions: logits (S, N, C) -> probabilities (N, C)."""
    return torch.softmax(logits.to(torch.float64), dim=-1).mean(dim=0)


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 20) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |bin| / N * |accuracy -
    mean confidence|, confidence = max probability, bin k = (k/bins, (k+1)/bins] (0 in the first)."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"ece: probs (N, C) and labels (N,) expected, got {tuple(probs.shape)}, "
                         f"{tuple(labels.shape)}")
    conf, pred = probs.to(torch.float64).max(dim=1)
    correct = (pred == labels).to(torch.float64)
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    n = conf.numel()
    total = torch.zeros((), dtype=torch.float64)
    for k in range(bins):
        m = idx == k
        if m.any():
            total = total + m.sum().to(torch.float64) / n * (correct[m].mean() - conf[m].mean()).abs()
    return float(total)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(dim=1) == labels).to(torch.float64).mean())


def ensemble_nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over rows of -log p[label], p the S models' averaged softmax: logits (S, N, C), labels (N,).
    A proper scoring rule, so what a posterior's beta is chosen by. Computed in log space
    (logsumexp over the models of log_softmax at the label), so a confidently wrong row gives a
    large finite loss rather than the inf of log(0) after a softmax underflow."""
    if logits.ndim != 3 or labels.shape != logits.shape[1:2]:
        raise ValueError(f"ensemble_nll: logits (S, N, C) and labels (N,) expected, got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")
    S, N, _ = logits.shape
    lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    at = lp.gather(-1, labels.to(torch.long).view(1, N, 1).expand(S, N, 1)).squeeze(-1)  # (S, N)
    return float(-(torch.logsumexp(at, dim=0) - math.log(S)).mean())
