"""Task arithmetic (Ilharco et al., 2023, "Editing models with task arithmetic").

U = scale * sum_t U_t, applied to every tensor (2-D, embeddings and vectors alike), as in the
reference code and mergekit. Default scale 0.3 (the paper's usual choice on its ViT suite; mergekit
has no default and users always set it).
"""
from __future__ import annotations

import torch

from bmmstream.methods.registry import MergeMethod, ModuleInput, register


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    defaults = {"scale": 0.3}

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        return float(self.params["scale"]) * inp.deltas.sum(0)
