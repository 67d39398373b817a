"""TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
Model Merging"; reference code github.com/AntoAndGar/task_singular_vectors,
`compute_and_sum_svd_mem_reduction`).

For a 2-D weight (m x n, r = min(m, n)) and T tasks: keep each task's top k = floor(r / T) singular
triplets, concatenate them (U_cat: m x Tk, S_cat, V_cat: Tk x n), replace U_cat and V_cat by their
polar factors (the nearest matrices with orthonormal columns/rows: P Q^T from the SVD P S Q^T), and
return scale * U_perp diag(S_cat) V_perp. The reference computes k as int(r * (1/T)); floor(r / T)
is the same number without float rounding. k = 0 (T > r) gives a zero update, as in the reference.

Non-2-D tensors (kind "vector"): the mean of the task vectors, as the reference. Embeddings and
lm_head (kind "embedding"): the mean as well: the reference (ViT) has no vocab-sized tables and the
LLM ports of these SVD methods leave embed_tokens/lm_head out of the decomposition.
Default scale 1.0 (the paper's setting: TSV-M needs no scaling search). scale multiplies every
tensor's update, as the reference's scaling coefficient (its `alpha`, accepted as an alias) does.

SVDs run on the tensors' device (GPU when the pipeline computes there) in float32 or float64, batched
over tensors of equal shape within a streaming unit.
"""
from __future__ import annotations

from typing import Callable

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register
from bmmstream.plan.estimate import svd_flops

# Cap on the elements stacked into one batched SVD call (B * T * m * n): bounds the extra memory.
BATCH_ELEMENTS = 1 << 27


def svd_dtype(x: torch.Tensor) -> torch.Tensor:
    """SVD needs float32/float64: upcast half-precision compute dtypes."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; a matrix on which LAPACK's float32 divide-and-conquer does not converge is redone
    in float64, alone, so its batch-mates keep their float32 result.

    Needed on real weights: ISO-CTS's stacked right singular bases of SmolLM2's q/gate/up projections
    (576 x 576, nearly all singular values ~1) make float32 gesdd fail; float64 converges.
    """
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.dim() > 2:
            parts = [svd(e) for e in x.unbind(0)]
            return tuple(torch.stack(p) for p in zip(*parts))  # type: ignore[return-value]
        if x.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def polar(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor P Q^T of x = P S Q^T (batched over leading dims)."""
    p, _, qh = svd(x)
    return p @ qh


def tsv_merge(deltas: torch.Tensor) -> torch.Tensor:
    """TSV-Merge of stacked task vectors [..., T, m, n] -> [..., m, n] (scale 1)."""
    dt = deltas.dtype
    x = svd_dtype(deltas)
    t_count, m, n = x.shape[-3:]
    k = min(m, n) // t_count
    if k == 0:
        return torch.zeros(x.shape[:-3] + (m, n), dtype=dt, device=x.device)
    u, s, vh = svd(x)
    lead = x.shape[:-3]
    u_cat = u[..., :k].movedim(-3, -2).reshape(*lead, m, t_count * k)  # task-major column blocks
    s_cat = s[..., :k].reshape(*lead, t_count * k)
    v_cat = vh[..., :k, :].reshape(*lead, t_count * k, n)
    out = (polar(u_cat) * s_cat.unsqueeze(-2)) @ polar(v_cat)
    return out.to(dt)


def merge_batched(
    inputs: list[ModuleInput],
    merge_2d: Callable[[torch.Tensor], torch.Tensor],
    merge_other: Callable[[ModuleInput], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Run `merge_2d` on [B, T, m, n] stacks of equal-shape linear tensors, `merge_other` on the rest."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[ModuleInput]] = {}
    for inp in inputs:
        if inp.spec.kind == "linear" and inp.deltas.dim() == 3:
            key = (tuple(inp.deltas.shape), inp.deltas.dtype, inp.deltas.device)
            groups.setdefault(key, []).append(inp)
        else:
            out[inp.spec.name] = merge_other(inp)
    for key, group in groups.items():
        per = max(1, BATCH_ELEMENTS // max(1, group[0].deltas.numel()))
        for i in range(0, len(group), per):
            chunk = group[i : i + per]
            try:
                merged = merge_2d(torch.stack([g.deltas for g in chunk]))
            except torch.linalg.LinAlgError as e:
                names = ", ".join(g.spec.name for g in chunk)
                raise BmmError(f"tensor(s) {names}: SVD did not converge even in float64 ({str(e).splitlines()[0]})") from None
            for g, u in zip(chunk, merged.unbind(0)):
                out[g.spec.name] = u
    return {inp.spec.name: out[inp.spec.name] for inp in inputs}


@register
class TSV(MergeMethod):
    name = "tsv"
    defaults = {"scale": 1.0}
    aliases = {"alpha": "scale"}

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        self.finite("scale")

    def _other(self, inp: ModuleInput) -> torch.Tensor:
        return float(self.params["scale"]) * inp.deltas.mean(0)

    def compute_work(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> dict[str, float]:
        if kind != "linear" or len(matrix_shape) != 2:
            return {}
        return {"svd": (tasks + 2) * svd_flops(*matrix_shape)}  # tsv_merge: T SVDs and two polar factors

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        return self.merge_unit([inp])[inp.spec.name]

    def merge_unit(self, inputs: list[ModuleInput]) -> dict[str, torch.Tensor]:
        scale = float(self.params["scale"])
        return merge_batched(inputs, lambda d: scale * tsv_merge(d), self._other)
