"""Task arithmetic (Ilharco et al., 2023, "Editing models with task arithmetic").

U = scale * sum_t w_t U_t, applied to every tensor (2-D, embeddings and vectors alike), as in the
reference code and mergekit. Default scale 0.3 (the paper's usual choice on its ViT suite; mergekit
has no default and users always set it). `scale` plays mergekit's `lambda` (accepted as an alias).

Per-model `weight` w_t (default 1) and global `normalize` (default false) follow mergekit's
`task_arithmetic` (merge_methods/generalized_task_arithmetic.py): with normalize the weighted sum is
divided by sum_t w_t (by 1 where |sum_t w_t| < 1e-8). A weight of 0 gives the merge without that model.
"""
from __future__ import annotations

import torch

from bmmstream.methods.registry import MergeMethod, ModuleInput, RawModule, register, weighted_combination


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    defaults = {"scale": 0.3, "normalize": False}
    aliases = {"lambda": "scale"}
    tensor_parameters = {"weight": 1.0}

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        self.scale, self.normalize = self.finite("scale"), self.flag("normalize")

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        # weighted_combination returns a new tensor: scaled in place, the same values without a second copy
        return weighted_combination(inp.deltas, self.model_weights(inp), self.normalize).mul_(self.scale)

    def raw_scratch_bytes(self, tasks: int) -> int:
        from bmmstream.methods.linear_kernels import fused_merge_scratch_bytes

        return fused_merge_scratch_bytes(tasks)

    def merge_raw(self, raw: RawModule, out_dtype: torch.dtype) -> torch.Tensor | None:
        """W_pre + scale * sum_t w_t U_t straight from the stored tensors (linear_kernels), the same bytes."""
        from bmmstream.methods.linear_kernels import fused_merge  # numba: imported when first merged

        weights = self.model_values("weight", 1.0, len(raw.experts))
        # weighted_combination's divisor, computed as it does (a float32 sum of the float32 weights)
        divisor = (float(len(raw.experts)) if weights is None
                   else float(torch.tensor(weights, dtype=torch.float32).sum()))
        return fused_merge(raw, out_dtype, weights=weights, divide=self.normalize,
                           div=divisor if abs(divisor) >= 1e-8 else 1.0, scale=self.scale, cm1=None)
