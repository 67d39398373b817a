"""Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces"; reference code github.com/danielm1405/iso-merging, `iso_c`,
`iso_cts`).

iso_c: M = sum_t U_t = P S Q^T; U = scale * mean(S) * P Q^T (a flat spectrum on the span of M).
iso_cts (parameter f = common_space_fraction, default 0.8 as the reference): with r = min(m, n),
  common = int(r * f), per_task = min(r // T, round((r - common) / T)), common = r - T * per_task
  (the reference's rounding, which makes the task-specific total a multiple of T);
  the top `common` singular triplets of M, plus for each task the top `per_task` singular triplets of
  its residual U_t - P_c P_c^T U_t outside the common column space; the stacked left and right
  vectors are replaced by their polar factors and every singular value by the mean of the stacked
  singular values: U = scale * mean(S_all) * U_perp V_perp. With f = 1 this is iso_c.

Non-2-D tensors ("vector") and embeddings/lm_head ("embedding"): the mean of the task vectors, times
scale (the reference averages non-2-D tensors; its LLM ports keep embed_tokens/lm_head out of the SVD).
scale (the reference's `alpha`, accepted as an alias): the reference tunes it on validation data per
model and task count (no universal value); the default here is 1.0, i.e. untuned: set it for your suite.

SVDs run on the tensors' device, batched over equal-shape tensors of a streaming unit.
"""
from __future__ import annotations

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register
from bmmstream.plan.estimate import svd_flops
from bmmstream.methods.tsv import merge_batched, polar, svd, svd_dtype


def iso_c_merge(deltas: torch.Tensor) -> torch.Tensor:
    """Iso-C of stacked task vectors [..., T, m, n] -> [..., m, n] (scale 1)."""
    x = svd_dtype(deltas)
    u, s, vh = svd(x.sum(-3))
    return ((u * s.mean(-1, keepdim=True).unsqueeze(-1)) @ vh).to(deltas.dtype)


def iso_cts_sizes(r: int, t_count: int, f: float) -> tuple[int, int]:
    """(common dimension, per-task dimension) as the reference computes them."""
    common = int(r * f)
    per_task = min(r // t_count, round((r - common) / t_count))
    return r - t_count * per_task, per_task


def iso_cts_merge(deltas: torch.Tensor, f: float) -> torch.Tensor:
    """Iso-CTS of stacked task vectors [..., T, m, n] -> [..., m, n] (scale 1)."""
    x = svd_dtype(deltas)
    t_count, m, n = x.shape[-3:]
    lead = x.shape[:-3]
    common, per_task = iso_cts_sizes(min(m, n), t_count, f)
    u, s, vh = svd(x.sum(-3))
    us, ss, vs = [u[..., :common]], [s[..., :common]], [vh[..., :common, :]]
    if per_task > 0:
        uc = us[0].unsqueeze(-3)  # [..., 1, m, c]
        resid = x - uc @ (uc.transpose(-1, -2) @ x)
        ut, st, vt = svd(resid)
        us.insert(0, ut[..., :per_task].movedim(-3, -2).reshape(*lead, m, t_count * per_task))
        ss.insert(0, st[..., :per_task].reshape(*lead, t_count * per_task))
        vs.insert(0, vt[..., :per_task, :].reshape(*lead, t_count * per_task, n))
    u_all, s_all, v_all = torch.cat(us, -1), torch.cat(ss, -1), torch.cat(vs, -2)
    flat = s_all.mean(-1, keepdim=True).unsqueeze(-1)
    return ((polar(u_all) * flat) @ polar(v_all)).to(deltas.dtype)


class _IsoBase(MergeMethod):
    aliases = {"alpha": "scale"}

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        self.finite("scale")

    def _other(self, inp: ModuleInput) -> torch.Tensor:
        return float(self.params["scale"]) * inp.deltas.mean(0)

    def _merge_2d(self, deltas: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    svds = 1  # SVDs per linear tensor, besides T more where the method takes each task's own (svds_per_task)
    svds_per_task = 0

    def compute_work(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> dict[str, float]:
        if kind != "linear" or len(matrix_shape) != 2:
            return {}
        return {"svd": (self.svds + self.svds_per_task * tasks) * svd_flops(*matrix_shape)}

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        return self.merge_unit([inp])[inp.spec.name]

    def merge_unit(self, inputs: list[ModuleInput]) -> dict[str, torch.Tensor]:
        scale = float(self.params["scale"])
        return merge_batched(inputs, lambda d: scale * self._merge_2d(d), self._other)


@register
class IsoC(_IsoBase):
    name = "iso_c"
    defaults = {"scale": 1.0}

    def _merge_2d(self, deltas: torch.Tensor) -> torch.Tensor:
        return iso_c_merge(deltas)


@register
class IsoCTS(_IsoBase):
    name = "iso_cts"
    defaults = {"scale": 1.0, "common_space_fraction": 0.8}
    svds, svds_per_task = 3, 1  # the sum's, T residuals', two polar factors

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        f = float(self.params["common_space_fraction"])
        if not 0.0 <= f <= 1.0:
            raise BmmError(f"merge method 'iso_cts': common_space_fraction must be in [0, 1], got {f}")

    def _merge_2d(self, deltas: torch.Tensor) -> torch.Tensor:
        return iso_cts_merge(deltas, float(self.params["common_space_fraction"]))
