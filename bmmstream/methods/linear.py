"""Linear merge: a weighted average of the models' weights (Wortsman et al., ICML 2022, "Model soups";
mergekit `linear`, merge_methods/linear.py).

merged = sum_t w_t W_t, divided by sum_t w_t when `normalize` (default true, as mergekit). Per-model
`weight` w_t (default 1 here; mergekit requires it). The base model is not among the averaged models
(mergekit averages the models listed; list the base among the experts to include it). In task-vector
terms, with c = 1 (normalize) or sum_t w_t (no normalize):
    U = merged - W_pre = sum_t w_t U_t / (normalize ? sum_t w_t : 1) + (c - 1) W_pre,
computed in the compute dtype. Weights summing to 0 with `normalize` are refused (mergekit divides by 0).
Every tensor kind is averaged alike, as in mergekit.
"""
from __future__ import annotations

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, RawModule, register, weighted_combination


@register
class Linear(MergeMethod):
    """Linear / model soup (Wortsman et al. 2022; mergekit `linear`): sum_t w_t W_t / sum_t w_t."""

    name = "linear"
    defaults = {"normalize": True}
    tensor_parameters = {"weight": 1.0}

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        self.normalize = self.flag("normalize")
        total = sum(float(p.get("weight", 1.0)) for _, p in self.models)
        if self.normalize and self.models and abs(total) < 1e-8:
            raise BmmError(
                f"merge method 'linear': the per-model weights sum to {total:g}; "
                f"cannot normalize by it (set normalize: false)"
            )

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        weights = self.model_weights(inp)
        total = float(inp.deltas.shape[0]) if weights is None else float(weights.sum())
        mixed = weighted_combination(inp.deltas, weights, self.normalize)
        c = 1.0 if self.normalize else total
        return mixed if c == 1.0 else mixed + (c - 1.0) * inp.base

    def raw_scratch_bytes(self, tasks: int) -> int:
        from bmmstream.methods.linear_kernels import fused_merge_scratch_bytes

        return fused_merge_scratch_bytes(tasks)

    def merge_raw(self, raw: RawModule, out_dtype: torch.dtype) -> torch.Tensor | None:
        """sum_t w_t W_t (/ sum_t w_t) straight from the stored tensors (linear_kernels), the same bytes
        as `merge` followed by W_pre + U."""
        from bmmstream.methods.linear_kernels import fused_merge  # numba: imported when first merged

        weights = self.model_values("weight", 1.0, len(raw.experts))
        total = (float(len(raw.experts)) if weights is None
                 else float(torch.tensor(weights, dtype=torch.float32).sum()))
        c = 1.0 if self.normalize else total
        return fused_merge(raw, out_dtype, weights=weights, divide=self.normalize,
                           div=total if abs(total) >= 1e-8 else 1.0, scale=1.0,
                           cm1=None if c == 1.0 else c - 1.0)
