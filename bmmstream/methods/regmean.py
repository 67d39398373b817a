"""RegMean (Jin et al., 2023, "Dataless knowledge fusion by merging weights of language models").

Per linear module, the merged weight minimises sum_t ||X_t W^T - X_t W_t^T||^2:

    W = (sum_t W_t G~_t) (sum_t G~_t)^-1,   G~_t = a G_t + (1 - a) diag(G_t)

with G_t = X_t^T X_t / n_t the per-task input Gram (`ModuleInput.grams`, normalised per task, as the
reference's `regmean_mean: true` does, so each task weighs the same whatever its token count). Since
(sum_t W_pre G~_t)(sum_t G~_t)^-1 = W_pre, the merged task vector is U = (sum_t U_t G~_t)(sum_t G~_t)^-1,
computed directly from the task vectors (no cancellation against W_pre). It is solved as the linear
system (sum_t G~_t) U^T = sum_t G~_t U_t^T by Cholesky, never with an explicit inverse; if the
factorisation fails (a singular sum, e.g. an input dimension never active), a diagonal damping
`1e-8 * mean(diag)` is added and raised tenfold until it succeeds, and the module is recorded in
`describe()["damped"]`.

`reduce_non_diagonal_ratio` (a; FusionBench's and MergeLM's name, also accepted as `reduce_nondiag`,
the reference's `regmean_reduce_nondiag`, and as `alpha`, this package's former name): shrinkage of the
off-diagonal Gram entries toward the diagonal (off-diagonal entries times a, diagonal kept). It is not
a final multiplier (that is `scale` elsewhere); RegMean has none. Default 0.9, our choice. The reference
code (bloomberg/dataless-model-merging, src/configs/defaults.yaml) ships `regmean_reduce_nondiag: -1`,
i.e. no shrinkage (a = 1); the paper shrinks toward the diagonal because the plain solution can stray far
from the individual models and the unshrunk sum is often ill conditioned (few tokens, d_in large).
0.9 is a mild shrinkage that keeps the sum positive definite whenever every diagonal entry is positive
(it is also the default of `--regmean_reduce_nondiag` in a derived implementation we read). Set
`reduce_non_diagonal_ratio: 1.0` to get exactly the reference code's default; 0 is the
per-input-dimension weighted average.

Tensors without Grams (biases and norms, embeddings and lm_head, heads after the layer stack) follow
the reference rule: the simple average of the experts, i.e. U = mean_t U_t.
"""
from __future__ import annotations

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register


def shrink_offdiag(grams: torch.Tensor, alpha: float) -> torch.Tensor:
    """a G + (1 - a) diag(G), batched over leading dimensions."""
    diag = torch.diag_embed(torch.diagonal(grams, dim1=-2, dim2=-1))
    return alpha * grams + (1.0 - alpha) * diag


def solve_spd(a: torch.Tensor, b: torch.Tensor, max_tries: int = 12) -> tuple[torch.Tensor, float]:
    """x with a x = b for symmetric PSD a, by Cholesky; returns (x, damping added to the diagonal)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    scale = float(torch.diagonal(a).abs().mean()) or 1.0
    damping = 0.0
    for i in range(max_tries + 1):
        l, info = torch.linalg.cholesky_ex(a + damping * eye if damping else a)
        if int(info) == 0:
            return torch.cholesky_solve(b, l), damping
        damping = scale * 1e-8 * (10.0**i)
    raise BmmError(f"Gram matrix not positive definite even with damping {damping:.3g}")


def regmean_task_vector(deltas: torch.Tensor, grams: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float]:
    """U = (sum_t U_t G~_t)(sum_t G~_t)^-1 for deltas [T, d_out, d_in], grams [T, d_in, d_in]."""
    g = shrink_offdiag(grams, alpha)
    rhs = torch.einsum("tij,toj->io", g, deltas)  # sum_t G~_t U_t^T  [d_in, d_out]
    ut, damping = solve_spd(g.sum(0), rhs)
    return ut.T, damping


@register
class RegMean(MergeMethod):
    name = "regmean"
    defaults = {"reduce_non_diagonal_ratio": 0.9}
    aliases = {"alpha": "reduce_non_diagonal_ratio", "reduce_nondiag": "reduce_non_diagonal_ratio"}
    needs_grams = True  # the pipeline runs the calibration stage first

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        key = "reduce_non_diagonal_ratio"
        a = self.params[key]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
            raise BmmError(f"merge method 'regmean': {self.given(key)} must be a number in [0, 1], got {a!r}")
        self.damped: dict[str, float] = {}

    def extra_bytes(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> int:
        # counted from the code: the T float32 Grams, their shrunk copy, the sum, its factor and a copy
        if kind != "linear" or len(matrix_shape) != 2:
            return 0
        return (2 * tasks + 3) * matrix_shape[1] ** 2 * 4

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        name = inp.spec.name
        if inp.grams is None or inp.base.ndim != 2 or inp.spec.kind != "linear":
            return inp.deltas.mean(0)
        t, d_out, d_in = inp.deltas.shape
        if tuple(inp.grams.shape) != (t, d_in, d_in):
            raise BmmError(
                f"{name}: input Grams have shape {tuple(inp.grams.shape)}, expected {(t, d_in, d_in)}"
            )
        work = torch.promote_types(inp.deltas.dtype, torch.float32)
        ratio = float(self.params["reduce_non_diagonal_ratio"])
        u, damping = regmean_task_vector(inp.deltas.to(work), inp.grams.to(work), ratio)
        if damping:
            self.damped[name] = damping
        return u.to(inp.base.dtype)

    def describe(self) -> dict:
        d = super().describe()
        if self.damped:
            d["damped"] = dict(self.damped)
        return d
