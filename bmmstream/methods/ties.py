"""TIES-Merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging
Models"; reference code github.com/prateeks/ties-merging, `ties_merging` in its notebook).

Per task, Trim the task vector to its top-`density` fraction by magnitude, Elect per entry the sign
with the larger total mass, and take the disjoint Mean of the entries that agree with it; U = scale *
that mean. Defaults follow the paper/reference: density 0.2 (k = 20%), scale (lambda) 1.0.

Threshold (`threshold`):
- "global" (default, as the reference): the reference flattens the whole model per task and keeps
  |U_t| >= the (d - int(d * density))-th smallest |U_t| (torch.kthvalue), d = all parameters. Here a
  first streaming pass (`prepass_observe`) sees every tensor of every kind (linear, embedding and
  vector, like the reference's flattened state dict) and builds per task a log-spaced histogram of
  |U_t| (bmmstream.methods.magnitude_histogram); the threshold is the lower edge of the bin holding that order statistic,
  so  tau_hist <= tau_exact < tau_hist * (1 + 2^-12)  (relative error bound 2.4e-4, on float32
  magnitudes). Entries within that sliver above tau_hist are kept too.
- "per_tensor" (mergekit's `ties`): keep exactly max(1, int(density * numel)) entries of each tensor
  per task, the largest by magnitude (the argsort rule of mergekit 0.1.5's `magnitude` sparsification).
Every tensor kind (2-D, embeddings, vectors) is merged by the same rule, as in the reference and mergekit.

Per-model parameters, as mergekit's `ties` (merge_methods/generalized_task_arithmetic.py): `density`
(each model trimmed to its own fraction; default the global `density`) and `weight` w_t (default 1).
With weights the election and the mean run on w_t * trimmed U_t: sign of sum_t w_t U_t, then
sum of the agreeing w_t U_t divided by the sum of the agreeing w_t (by 1 where none agrees); without
weights this is exactly the unweighted disjoint mean. `normalize: false` (mergekit allows it) skips
that division. A weight of 0 gives the merge without that model (its thresholds are per task).
`scale` plays mergekit's `lambda` (accepted as an alias).

Sign election: sign of the sum of the trimmed values. Where that sum is exactly 0 (exact
cancellations, common when bf16 checkpoints put deltas on a coarse grid): with threshold "global"
the reference's rule, the majority sign, taken over the tensor rather than the whole model (+1 if
that is 0 too); with "per_tensor" mergekit's rule, +1. (Measured: on a bf16 suite the two rules
differ in a few entries per tensor, which is why each mode follows its own source.)
"""
from __future__ import annotations

import numpy as np
import torch

from bmmstream.methods import magnitude_histogram as kernels
from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register, weighted_combination

THRESHOLDS = ("global", "per_tensor")


def elect_and_mean(
    trimmed: torch.Tensor,
    zero_sign: str = "majority",
    weights: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Sign election by mass and disjoint mean over the task axis 0 of trimmed task vectors.

    Where the mass is exactly 0: "majority" takes the majority of the elected signs over the tensor
    (the reference's rule, over the tensor instead of the model), "positive" takes +1 (mergekit).
    `weights` [T] (mergekit's per-model weight): the election and the mean run on w_t * trimmed_t
    and the divisor is the sum of the agreeing weights; `normalize` False: no division."""
    if weights is not None:
        trimmed = trimmed * weights.reshape((-1,) + (1,) * (trimmed.dim() - 1))
    sign = torch.sign(trimmed.sum(0))
    zero = sign == 0
    if zero_sign == "positive":
        sign = torch.where(zero, torch.ones_like(sign), sign)
    elif bool(zero.any()):
        majority = torch.sign(sign.sum())
        sign = torch.where(zero, majority if majority != 0 else torch.ones_like(majority), sign)
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = torch.where(agree, trimmed, torch.zeros_like(trimmed))
    if not normalize:
        return selected.sum(0)
    if weights is None:
        count = agree.sum(0).clamp(min=1).to(trimmed.dtype)
        return selected.sum(0) / count
    w = weights.reshape((-1,) + (1,) * (trimmed.dim() - 1))
    divisor = torch.where(agree, w, torch.zeros_like(w)).sum(0)
    return selected.sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def combine_sparse(
    sparse: torch.Tensor, weights: torch.Tensor | None, normalize: bool, consensus: bool, zero_sign: str = "positive"
) -> torch.Tensor:
    """mergekit's last step for sparsified task vectors: TIES sign consensus and (weighted) disjoint mean,
    or without consensus the weighted sum (divided by the weights' sum if `normalize`)."""
    if consensus:
        return elect_and_mean(sparse, zero_sign, weights, normalize)
    return weighted_combination(sparse, weights, normalize)


def topk_mask_per_tensor(deltas: torch.Tensor, density: float | list[float]) -> torch.Tensor:
    """mergekit's magnitude sparsification: per task keep the max(1, int(density * numel)) largest |U|
    (`density` one number, or one per task)."""
    t_count = deltas.shape[0]
    dens = [float(density)] * t_count if isinstance(density, (int, float)) else [float(d) for d in density]
    if all(d >= 1.0 for d in dens):
        return torch.ones_like(deltas, dtype=torch.bool)
    flat = deltas.reshape(t_count, -1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for t in range(t_count):
        if dens[t] >= 1.0:
            mask[t] = True
            continue
        k = max(1, int(dens[t] * flat.shape[1])) if flat.shape[1] else 0
        order = torch.argsort(flat[t].abs().float(), descending=True)[:k]
        mask[t, order] = True
    return mask.reshape(deltas.shape)


def global_keep_index(numel: int, density: float) -> int:
    """1-based rank (ascending) of the threshold, as the reference: k = d - int(d * density)."""
    if density >= 1.0:
        return 0
    return numel - int(numel * density)


def trim_by_threshold(deltas: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    tau = torch.tensor(thresholds, dtype=deltas.dtype, device=deltas.device)
    tau = tau.reshape((-1,) + (1,) * (deltas.dim() - 1))
    return torch.where(deltas.abs() >= tau, deltas, torch.zeros_like(deltas))


@register
class Ties(MergeMethod):
    name = "ties"
    defaults = {"density": 0.2, "scale": 1.0, "threshold": "global", "normalize": True}
    aliases = {"lambda": "scale"}
    tensor_parameters = {"weight": 1.0, "density": None}  # density: the global one

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        d = float(self.params["density"])
        if not 0.0 < d <= 1.0:
            raise BmmError(f"merge method 'ties': density must be in (0, 1], got {d}")
        if self.params["threshold"] not in THRESHOLDS:
            raise BmmError(
                f"merge method 'ties': threshold must be one of {list(THRESHOLDS)}, "
                f"got {self.params['threshold']!r}"
            )
        self.scale, self.normalize = self.finite("scale"), self.flag("normalize")
        self.needs_prepass = self.params["threshold"] == "global"
        self._counts: np.ndarray | None = None
        self._numel = 0
        self._thresholds: list[float] | None = None

    def densities(self, count: int) -> list[float]:
        """Per-task density: each model's own `density`, else the global one."""
        return self.per_model("density", count)

    # -- pass 1: per-task magnitude histograms over the whole model ------------------------
    def prepass_observe(self, inp: ModuleInput) -> None:
        t_count = inp.deltas.shape[0]
        if self._counts is None:
            self._counts = np.zeros((t_count, kernels.NUM_BINS), dtype=np.int64)
        elif self._counts.shape[0] != t_count:
            raise BmmError(f"{inp.spec.name}: {t_count} task vectors, expected {self._counts.shape[0]}")
        for t in range(t_count):
            kernels.add_magnitude_histogram(inp.deltas[t], self._counts[t])
        self._numel += inp.deltas[0].numel()
        self._thresholds = None

    def prepass_state(self) -> dict:
        taus = self.thresholds()
        return {
            "thresholds": taus,
            "numel": self._numel,
            "density": float(self.params["density"]),
            "densities": self.densities(len(taus)),
            "relative_error_bound": kernels.REL_ERROR,
            "kinds": "all",
        }

    def load_prepass_state(self, state: dict) -> None:
        count = len(state["thresholds"])
        stored = [float(x) for x in state.get("densities", [state.get("density", -1)] * count)]
        wanted = self.densities(count)
        if stored != wanted:
            def show(d: list[float]) -> str:
                return str(d[0]) if len(set(d)) == 1 else str(d)

            raise BmmError(
                f"ties prepass state was computed for density {show(stored)}, config says {show(wanted)}"
            )
        self._thresholds = [float(x) for x in state["thresholds"]]
        self._numel = int(state["numel"])

    def thresholds(self) -> list[float]:
        if self._thresholds is None:
            if self._counts is None:
                raise BmmError("ties (threshold: global): no tensor was seen by the prepass")
            dens = self.densities(len(self._counts))
            self._thresholds = [
                kernels.kth_smallest_from_histogram(c, global_keep_index(self._numel, d))
                for c, d in zip(self._counts, dens)
            ]
            self._counts = None  # 8 MiB per task, no longer needed
        return self._thresholds

    # -- pass 2 ----------------------------------------------------------------------------
    def trim(self, inp: ModuleInput) -> torch.Tensor:
        deltas = inp.deltas
        if self.params["threshold"] == "per_tensor":
            mask = topk_mask_per_tensor(deltas, self.densities(deltas.shape[0]))
            return torch.where(mask, deltas, torch.zeros_like(deltas))
        taus = self.thresholds()
        if len(taus) != deltas.shape[0]:
            raise BmmError(f"{inp.spec.name}: {deltas.shape[0]} task vectors, prepass saw {len(taus)}")
        return trim_by_threshold(deltas, taus)

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        zero_sign = "positive" if self.params["threshold"] == "per_tensor" else "majority"
        merged = elect_and_mean(self.trim(inp), zero_sign, self.model_weights(inp), self.normalize)
        return self.scale * merged
