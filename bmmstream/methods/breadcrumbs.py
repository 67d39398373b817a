"""Model Breadcrumbs (Davari and Belilovsky, ECCV 2024, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks", arXiv 2312.06795; as mergekit `breadcrumbs` / `breadcrumbs_ties`:
sparsify.py `magnitude_outliers` + merge_methods/generalized_task_arithmetic.py).

Per task and tensor, mask out the largest-magnitude outliers and the small entries: over the flattened
|U_t| sorted ascending, keep ranks [n_bot, n - n_top), with n_top = int(gamma n), target = int(density n),
n_bot = n - target - n_top (if n_bot < 0: n_top += n_bot, n_bot = 0), so exactly `target` entries stay;
density >= 1 keeps everything. mergekit at commit a6e40288 slices [n_bot:-n_top], which with n_top = 0
(gamma n < 1) is empty and zeros the whole tensor: the intent, keep up to the end, is implemented here
(mergekit 0.1.5 slices [n_bot : n_bot + target], the same ranks). Ties in |U| are broken by position.

Then combine, on the weighted masked task vectors w_t U'_t:
- `breadcrumbs`: task arithmetic, U = scale * sum_t w_t U'_t (/ sum_t w_t if `normalize`),
- `breadcrumbs_ties`: TIES sign consensus by mass (mergekit's "sum"; a zero mass elects +), U = scale *
  the sum of the agreeing entries (/ the sum of their weights if `normalize`).
`normalize` defaults to false for both, as mergekit. Per-model `weight` (1), `density` (default: the
global one, 0.9; mergekit's generic default 1.0 keeps every entry, outliers too) and
`gamma` (default: the global one, 0.01, mergekit's). `scale` plays mergekit's `lambda`
(alias), default 1. Every tensor kind is treated alike, as mergekit.
"""
from __future__ import annotations

import math

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register
from bmmstream.plan.estimate import numel_of, sort_work
from bmmstream.methods.ties import combine_sparse, election_scratch_bytes

COMBINES = ("task_arithmetic", "ties")


def breadcrumbs_bounds(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, n_top): keep ascending ranks [n_bot, n - n_top)."""
    if density >= 1.0:
        return 0, 0
    n_top = int(gamma * n)
    target = int(density * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, n_top


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Boolean keep mask of one task's tensor."""
    n = delta.numel()
    n_bot, n_top = breadcrumbs_bounds(n, density, gamma)
    if n_bot == 0 and n_top == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bot:n - n_top]] = True
    return mask.reshape(delta.shape)


def _fraction(v, what: str) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        return f"parameter '{what}' must be a number in [0, 1], got {v!r}"
    return None


@register
class Breadcrumbs(MergeMethod):
    """Model Breadcrumbs (Davari & Belilovsky 2023; mergekit `breadcrumbs`): outlier+small mask, then TA."""

    name = "breadcrumbs"
    combine = "task_arithmetic"
    defaults = {"density": 0.9, "gamma": 0.01, "scale": 1.0, "normalize": False}
    aliases = {"lambda": "scale"}
    tensor_parameters = {"weight": 1.0, "density": None, "gamma": None}  # None: the global one

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        d = self.params["density"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
            raise BmmError(f"merge method '{self.name}': density must be in (0, 1], got {d!r}")
        problem = _fraction(self.params["gamma"], "gamma")
        if problem:
            raise BmmError(f"merge method '{self.name}': {problem}")
        for i, (label, p) in enumerate(self.models):
            problem = _fraction(p["gamma"], "gamma") if "gamma" in p else None
            if problem:
                raise BmmError(f"models[{i}] ({label}): {problem}")
        self.scale, self.normalize = self.finite("scale"), self.flag("normalize")

    def masked(self, inp: ModuleInput) -> torch.Tensor:
        """The task vectors with each one's breadcrumbs mask applied."""
        count = int(inp.deltas.shape[0])
        dens, gam = self.per_model("density", count), self.per_model("gamma", count)
        out = torch.empty_like(inp.deltas)
        for t in range(count):
            mask = breadcrumbs_mask(inp.deltas[t], dens[t], gam[t])
            out[t] = torch.where(mask, inp.deltas[t], torch.zeros_like(inp.deltas[t]))
        return out

    def compute_work(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> dict[str, float]:
        n = numel_of(matrix_shape)
        return {"sort": tasks * sort_work(n, n)}  # breadcrumbs_mask: one sort per task

    def working_copies(self, tasks: int) -> float:
        # measured, bench/method_memory.py (T = 2, 4, 8, either combine): the T masked task vectors
        # beside one task's stable sort (|U|, the sorted values, int64 indices, the mask); the
        # election that follows needs less
        return tasks + 5.5

    def extra_bytes(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> int:
        return election_scratch_bytes(matrix_shape, tasks) if self.combine == "ties" else 0

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        merged = combine_sparse(self.masked(inp), self.model_weights(inp), self.normalize, self.combine == "ties")
        return self.scale * merged


@register
class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs masks, then TIES sign consensus (mergekit `breadcrumbs_ties`)."""

    name = "breadcrumbs_ties"
    combine = "ties"
