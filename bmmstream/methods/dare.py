"""DARE: Drop And REscale (Yu et al., ICML 2024, "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch"; reference code github.com/yule-BUAA/MergeLM;
structurally like mergekit's `dare_linear` / `dare_ties`).

Each entry of each task vector is kept with probability `density` = 1 - p and rescaled by 1/density
(`rescale: false` skips the rescale, as mergekit allows), then the sparse task vectors are combined:
- combine "task_arithmetic" (like mergekit `dare_linear`): U = scale * sum_t U'_t,
- combine "ties" (like mergekit `dare_ties`): sign election by mass and disjoint mean of U'_t (the
  TIES reference's mean), times scale; the random drop replaces TIES' magnitude trim, as in mergekit.
  Differences from mergekit 0.1.5: it rescales each dropped tensor to keep its L1 norm rather than by
  1/density (the paper's rule, used here), and its dare_ties sums the agreeing entries unless
  `normalize: true`.
Per-model parameters, as mergekit (merge_methods/generalized_task_arithmetic.py): `density` (each
model dropped at its own rate; default the global density) and `weight` w_t (default 1), applied to
the rescaled sparse U'_t before combining (w_t U'_t; with "ties" the disjoint mean divides by the sum
of the agreeing weights). `normalize`: divide by sum_t w_t ("task_arithmetic") or by the agreeing
weights ("ties"); default: false for "task_arithmetic" (the plain sum), true for "ties" (the TIES
reference's disjoint mean; mergekit's dare_ties defaults to false: set `normalize: false` for it).
The masks are keyed by task index, so a weight of 0 is not the same draw as leaving the model out.
`scale` plays mergekit's `lambda` (accepted as an alias).
Registered as `dare` and under mergekit's names `dare_linear` / `dare_ties` (combine preset).
Give either `density` (mergekit style) or `p` (the paper's drop rate). Defaults: p = 0.9 (the
paper's headline setting; its LLM merge scripts also use 0.2, so set it for your models), scale 1.0
(the reference's scaling_coefficient). Every tensor kind is treated alike, like the reference
(which masks every parameter) and mergekit.

The mask comes from a counter-based generator (numpy Philox) whose 128-bit key is a BLAKE2b hash of
(seed, tensor name, task index): the same merge gives the same mask whatever the order in which
tensors are processed, and across a killed-and-resumed run.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register
from bmmstream.plan.estimate import numel_of
from bmmstream.methods.ties import combine_sparse, election_scratch_bytes
from bmmstream.methods.ties_kernels import MAX_TASKS

COMBINES = ("task_arithmetic", "ties")


def mask_key(seed: int, name: str, task: int) -> int:
    """128-bit Philox key for one (seed, tensor, task); stable across processes and platforms."""
    h = hashlib.blake2b(f"bmmstream.dare\0{seed}\0{name}\0{task}".encode(), digest_size=16)
    return int.from_bytes(h.digest(), "little")


def keep_mask(seed: int, name: str, task: int, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """Bernoulli(density) keep mask (bool, CPU) for one task's tensor."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    gen = np.random.Generator(np.random.Philox(key=mask_key(seed, name, task)))
    u = gen.random(n, dtype=np.float32)
    return torch.from_numpy(u < np.float32(density)).reshape(shape)


def dare_sparsify(
    deltas: torch.Tensor, name: str, seed: int, density: float | list[float], rescale: bool = True
) -> torch.Tensor:
    """Drop entries of each task vector at rate 1 - density and rescale the rest by 1/density
    (`density` one number, or one per task)."""
    t_count = deltas.shape[0]
    dens = [float(density)] * t_count if isinstance(density, (int, float)) else [float(d) for d in density]
    if all(d >= 1.0 for d in dens):
        return deltas
    out = torch.empty_like(deltas)
    shape = tuple(deltas.shape[1:])
    for t in range(t_count):
        if dens[t] >= 1.0:
            out[t] = deltas[t]
            continue
        mask = keep_mask(seed, name, t, shape, dens[t]).to(deltas.device)
        # in place in out[t]: where(mask, U_t, 0) / density without full-size temporaries
        torch.where(mask, deltas[t], deltas.new_zeros(()), out=out[t])
        if rescale:
            out[t].div_(dens[t])
    return out


@register
class Dare(MergeMethod):
    name = "dare"
    defaults = {
        "density": None, "p": None, "combine": "task_arithmetic", "scale": 1.0, "rescale": True, "normalize": None,
    }
    aliases = {"lambda": "scale"}
    tensor_parameters = {"weight": 1.0, "density": None}  # density: the global one

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        dens, p = self.params["density"], self.params["p"]
        if dens is not None and p is not None and abs(float(dens) + float(p) - 1.0) > 1e-12:
            raise BmmError(f"merge method 'dare': density {dens} and p {p} disagree (density = 1 - p)")
        if dens is None:
            dens = 1.0 - float(p) if p is not None else 0.1
        dens = float(dens)
        if not 0.0 < dens <= 1.0:
            raise BmmError(f"merge method 'dare': density must be in (0, 1] (p in [0, 1)), got {dens}")
        if self.params["combine"] not in COMBINES:
            raise BmmError(
                f"merge method 'dare': combine must be one of {list(COMBINES)}, got {self.params['combine']!r}"
            )
        self.density = dens
        self.params["density"], self.params["p"] = dens, 1.0 - dens
        if self.params["normalize"] is None:
            self.params["normalize"] = self.params["combine"] == "ties"
        self.scale, self.normalize = self.finite("scale"), self.flag("normalize")
        self.flag("rescale")

    def compute_work(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> dict[str, float]:
        return {"random": float(tasks * numel_of(matrix_shape))}  # dare_sparsify: one draw per element

    def working_copies(self, tasks: int) -> float:
        # measured, bench/method_memory.py (T = 2, 4, 8): the T rescaled sparse task vectors, one
        # task's mask, the merged value and the weight; TIES' election beyond MAX_TASKS experts (the
        # chunked torch path) keeps the full-size signs beside them
        if self.params["combine"] != "ties":
            return tasks + 2.25
        return tasks + 2.75 + (1.75 if tasks > MAX_TASKS else 0.0)

    def extra_bytes(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> int:
        return election_scratch_bytes(matrix_shape, tasks) if self.params["combine"] == "ties" else 0

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        count = int(inp.deltas.shape[0])
        dens = self.model_values("density", self.density, count) or self.density
        sparse = dare_sparsify(inp.deltas, inp.spec.name, self.seed, dens, bool(self.params["rescale"]))
        merged = combine_sparse(sparse, self.model_weights(inp), self.normalize, self.params["combine"] == "ties",
                                zero_sign="majority")
        return self.scale * merged


@register
class DareLinear(Dare):
    """mergekit's name for DARE + task arithmetic (`combine: task_arithmetic`)."""

    name = "dare_linear"
    defaults = {**Dare.defaults, "combine": "task_arithmetic"}


@register
class DareTies(Dare):
    """mergekit's name for DARE + TIES election and disjoint mean (`combine: ties`)."""

    name = "dare_ties"
    defaults = {**Dare.defaults, "combine": "ties"}
