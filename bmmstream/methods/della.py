"""DELLA-Merging (Deep, Bhardwaj and Poria, 2024, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", arXiv 2406.11617: MagPrune; as mergekit `della` / `della_linear`:
sparsify.py `della_magprune` + merge_methods/generalized_task_arithmetic.py).

MagPrune, per task and per row (the last dimension; a 1-D tensor is one row; higher ranks are flattened
to rows of the last dimension): rank |U| ascending within the row (rank 1 the smallest, ties broken by
position), rank_norm = (rank - 1)/(n - 1) (0 for a one-entry row), keep probability
p = density - epsilon + 2 epsilon rank_norm, keep ~ Bernoulli(p), and rescale (`rescale`):
- "probability" (default, the paper's rule): kept entries divided by their own p,
- "l1" (mergekit >= 0.1): the masked tensor times ||U_t||_1 / ||U'_t||_1 (unchanged when either is < 1e-7),
- "none": the mask only.
The draw uses the same keyed counter-based uniforms as DARE (bmmstream.methods.dare.mask_key: Philox
keyed by seed, tensor name, task), so a merge is the same whatever the tensor order and across a
killed-and-resumed run; with epsilon = 0 the mask is DARE's at the same density.

Then combine the weighted sparse task vectors w_t U'_t:
- `della`: TIES sign consensus by mass (mergekit's "sum"; a zero mass elects +) and the agreeing entries'
  sum, divided by their weights' sum when `normalize` (default true, as mergekit),
- `della_linear`: the weighted sum, / sum_t w_t when `normalize` (default false, as mergekit).
U = scale * that (`lambda` alias, default 1). Per-model `weight` (1), `density` and `epsilon` (default:
the global ones, density 0.5 - set it for your models; mergekit's generic default 1.0 prunes nothing -
and epsilon 0.15, mergekit's). density - epsilon and density + epsilon must lie in (0, 1), except that
density 1 keeps the task vector as it is (as mergekit). Every tensor kind is treated alike, as mergekit.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from bmmstream.errors import BmmError
from bmmstream.methods.dare import mask_key
from bmmstream.methods.registry import MergeMethod, ModuleInput, register
from bmmstream.plan.estimate import numel_of, sort_work
from bmmstream.methods.ties import combine_sparse, election_scratch_bytes
from bmmstream.methods.ties_kernels import MAX_TASKS

RESCALES = ("probability", "l1", "none")


def keyed_uniforms(seed: int, name: str, task: int, n: int) -> np.ndarray:
    """n float32 uniforms in [0, 1) for one (seed, tensor, task), the stream DARE's keep_mask compares."""
    gen = np.random.Generator(np.random.Philox(key=mask_key(seed, name, task)))
    return gen.random(n, dtype=np.float32)


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability per entry (float64, rows of the last dimension), in delta's shape."""
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.reshape(1, 1)
    n = rows.shape[-1]
    order = torch.argsort(rows.abs(), dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=rows.device).expand_as(order).contiguous())
    rank_norm = ranks.to(torch.float64) / (n - 1) if n > 1 else torch.zeros(rows.shape, dtype=torch.float64)
    return ((density - epsilon) + 2.0 * epsilon * rank_norm).reshape(delta.shape)


# entries per step of magprune (whole rows): its float64/int64 scratch, ~50 bytes an entry, stays
# below the election's working copies that follow (bench/method_memory.py at 1024 x 2048 and 4096 x 8192)
MAGPRUNE_CHUNK = 1 << 18


def magprune(
    delta: torch.Tensor, name: str, seed: int, task: int, density: float, epsilon: float, rescale: str,
    chunk: int = MAGPRUNE_CHUNK,
) -> torch.Tensor:
    """One task's MagPrune-sparsified tensor. Ranks are per row of the last dimension, so a contiguous
    tensor is pruned a few rows (about `chunk` entries) at a time: the ranks, probabilities and masks of
    a whole tensor were ~9 copies of it in float64 and int64. The values are the same."""
    if density >= 1.0 or delta.numel() == 0:
        return delta
    u = torch.from_numpy(keyed_uniforms(seed, name, task, delta.numel()))

    def prune(x: torch.Tensor, ux: torch.Tensor) -> torch.Tensor:
        p = magprune_probabilities(x.cpu(), density, epsilon)
        keep = (ux < p.to(torch.float32)).to(x.device)
        kept = torch.where(keep, x, torch.zeros_like(x))
        return kept / p.to(device=x.device, dtype=x.dtype) if rescale == "probability" else kept

    if delta.is_contiguous() and delta.dim() > 1 and delta.numel() > chunk:
        rows = delta.reshape(-1, delta.shape[-1])
        ur, kept = u.reshape(rows.shape), torch.empty_like(rows)
        step = max(1, int(chunk) // int(rows.shape[-1]))
        for a in range(0, int(rows.shape[0]), step):
            kept[a:a + step] = prune(rows[a:a + step], ur[a:a + step])
        kept = kept.reshape(delta.shape)
    else:  # one step on the tensor itself (a strided input keeps its own layout for the l1 sums)
        kept = prune(delta, u.reshape(delta.shape))
    if rescale == "l1":
        before, after = float(delta.abs().sum()), float(kept.abs().sum())
        return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)
    return kept


def _check(density, epsilon) -> str | None:
    """What is wrong with a (density, epsilon) pair, or None."""
    for key, v in (("density", density), ("epsilon", epsilon)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"parameter '{key}' must be a finite number, got {v!r}"
    if epsilon < 0:
        return f"parameter 'epsilon' must be >= 0, got {epsilon!r}"
    if not 0.0 < density <= 1.0:
        return f"parameter 'density' must be in (0, 1], got {density!r}"
    if density < 1.0 and not (0.0 < density - epsilon and density + epsilon < 1.0):
        return (f"density {density:g} +- epsilon {epsilon:g} must lie inside (0, 1) "
                f"(got [{density - epsilon:g}, {density + epsilon:g}])")
    return None


@register
class Della(MergeMethod):
    """DELLA (Deep et al. 2024; mergekit `della`): MagPrune by magnitude rank, rescale, TIES consensus."""

    name = "della"
    combine = "ties"
    defaults = {"density": 0.5, "epsilon": 0.15, "scale": 1.0, "normalize": True, "rescale": "probability"}
    aliases = {"lambda": "scale"}
    tensor_parameters = {"weight": 1.0, "density": None, "epsilon": None}  # None: the global one

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        problem = _check(self.params["density"], self.params["epsilon"])
        if problem:
            raise BmmError(f"merge method '{self.name}': {problem}")
        for i, (label, p) in enumerate(self.models):
            problem = _check(p.get("density", self.params["density"]), p.get("epsilon", self.params["epsilon"]))
            if problem:
                raise BmmError(f"models[{i}] ({label}): {problem}")
        r = self.params["rescale"]
        if r not in RESCALES:
            raise BmmError(
                f"merge method '{self.name}': rescale must be one of {list(RESCALES)} "
                f"(mergekit's rescale: true is 'l1'), got {r!r}"
            )
        self.scale, self.normalize = self.finite("scale"), self.flag("normalize")

    def sparsified(self, inp: ModuleInput) -> torch.Tensor:
        """Each task vector pruned by MagPrune and rescaled."""
        count = int(inp.deltas.shape[0])
        dens, eps = self.per_model("density", count), self.per_model("epsilon", count)
        out = torch.empty_like(inp.deltas)
        for t in range(count):
            out[t] = magprune(inp.deltas[t], inp.spec.name, self.seed, t, dens[t], eps[t], self.params["rescale"])
        return out

    def compute_work(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> dict[str, float]:
        n = numel_of(matrix_shape)
        row = int(matrix_shape[-1]) if matrix_shape else 1
        return {"sort": tasks * sort_work(n, row), "random": float(tasks * n)}  # magprune: ranks in rows, draws

    def working_copies(self, tasks: int) -> float:
        # measured, bench/method_memory.py (T = 2, 4, 8): the T sparsified task vectors (MagPrune runs
        # 2^18 entries at a time), the merged value and the weight; TIES' election beyond
        # MAX_TASKS experts (the chunked torch path) keeps the full-size signs beside them
        if self.combine != "ties":
            return tasks + 1.75
        return tasks + 2.0 + (2.0 if tasks > MAX_TASKS else 0.0)

    def extra_bytes(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> int:
        return election_scratch_bytes(matrix_shape, tasks) if self.combine == "ties" else 0

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        merged = combine_sparse(self.sparsified(inp), self.model_weights(inp), self.normalize, self.combine == "ties")
        return self.scale * merged


@register
class DellaLinear(Della):
    """DELLA's MagPrune, then a weighted sum of the task vectors (mergekit `della_linear`)."""

    name = "della_linear"
    combine = "task_arithmetic"
    defaults = {**Della.defaults, "normalize": False}
