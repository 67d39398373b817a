"""Model Stock (Jang, Yun and Han, ECCV 2024, "Model Stock: All we need is just a few fine-tuned
models", arXiv 2403.19522; as mergekit `model_stock`, merge_methods/model_stock.py).

The fine-tuned weights lie on a thin shell around their centre; the merge interpolates between the
pre-trained weight W_0 and the average of the experts by the angle between their offsets U_i = W_i - W_0:
    cos = mean over pairs i < j of clamp(<U_i, U_j> / max(||U_i|| ||U_j||, 1e-6), -1, 1),
    t = N cos / (1 + (N - 1) cos),   merged = t mean_i W_i + (1 - t) W_0,  i.e.  U = t mean_i U_i.
Where |1 + (N - 1) cos| < 1e-6 there is no finite estimate and t = 0 (the base), as mergekit.
`filter_wise` (default false, as mergekit): cos and t per row (the last dimension; rows of the
(d_out, d_in) matrix methods see; a 1-D tensor is one row) instead of per tensor. Needs at least two
experts (mergekit: a base and two models). Every tensor kind is merged alike; no per-model parameters.
"""
from __future__ import annotations

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register


def stock_ratio(offsets: torch.Tensor) -> torch.Tensor:
    """t per row of `offsets` [N, rows, n]: [rows, 1]."""
    count = offsets.shape[0]
    norms = torch.linalg.vector_norm(offsets, dim=-1)  # [N, rows]
    cos = []
    for i in range(count):
        for j in range(i + 1, count):
            dot = (offsets[i] * offsets[j]).sum(-1)
            cos.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    den = 1.0 + (count - 1) * c
    singular = den.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(den), den)
    return torch.where(singular, torch.zeros_like(c), count * c / safe)


@register
class ModelStock(MergeMethod):
    """Model Stock (Jang et al. 2024; mergekit `model_stock`): U = t mean_i U_i, t from the offsets' angle."""

    name = "model_stock"
    defaults = {"filter_wise": False}

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        self.filter_wise = self.flag("filter_wise")

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        count = int(inp.deltas.shape[0])
        if count < 2:
            raise BmmError(f"merge method 'model_stock' needs at least 2 experts, got {count}")
        d = inp.deltas
        if self.filter_wise:
            rows = d.reshape(count, -1, d.shape[-1]) if d.dim() > 1 else d.reshape(count, 1, -1)
        else:
            rows = d.reshape(count, 1, -1)
        t = stock_ratio(rows)
        return (t * rows.mean(0)).reshape(inp.base.shape)
