"""Bayesian Model Merging (arXiv 2605.12843): the anchor-regularised closed form.

Per 2-D module: U = (C + lam U0)(G + lam I)^-1 and W = W_pre + s U, where U0 is the task vector of
the anchor method (any registry method, `anchor`, with `anchor_parameters`), G and C the statistics
of statistics/grams.py (data_free, data_assisted or hybrid), lam = rho * trace(G)/d_in per group
(or the absolute `lam`), s the scale of the module's block. rho, lam and scale may each be given per
block as a list (one entry per block), rho/lam entries being a number or a mapping group -> number.
A group missing from a mapping (or null) takes the default relative rho 0.01 (lam = 0.01 * trace(G)/d_in),
for `lam` mappings too (never lam = 0: an unregularised solve on a singular G); solve_records say
which rho or lam each module used ("lam_mode").

Numerics: G and C are accumulated and the system solved in float64 (`statistics_dtype`), for the
residual U - U0 = (C - U0 G)(G + lam I)^-1 (solve.closed_form): float32 statistics of low-rank task
vectors are off by O(1) at rho <= 1e-5 (bench/precision.py); float64 costs 2-3x the float32
statistics + solve time on a CPU. `statistics_dtype: compute` uses the run's compute dtype instead (faster, and only
safe for well-conditioned G). A Cholesky that fails is retried with lam + delta (toward the anchor)
and the delta is recorded ("damping"). Zero task vectors give the anchor (the lam -> inf limit).

Hybrid statistics (Eq. 35): per task eps * G_few + (1 - eps) * G_df, so eps = 0 is exactly
data-free and eps = 1 exactly data-assisted; `hybrid_rescale: true` first scales each side to unit
mean eigenvalue (their scales differ by orders of magnitude).

Tensors that are not regressed (kind "vector": biases and norms; kind "embedding": embeddings
and lm_head, which are vocab-sized and never form vocab x vocab products) take the anchor's value
W_pre + U0, unscaled. Defaults: anchor task_arithmetic (scale 0.3), rho 0.01, scale 1.0.
`normalize_tasks: true` weighs each task's data-free Gram to equal trace (grams.task_weights), so
experts with small task vectors are not drowned out; off by default (the paper's raw sum).

Refused in one line: rho, lam or scale negative, NaN, infinite or not a number; scale above 1e6
(surely a mistake: 1e309 in YAML is inf); blocks not an integer >= 1; eps outside [0, 1]; flags
(hybrid_rescale, normalize_tasks, keep_statistics) that are not true/false;
statistics that hold NaN/Inf (named by module).
"""
from __future__ import annotations

import math

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, get_method, register
from bmmstream.plan.layout import GROUPS
from bmmstream.solve.closed_form import NonFiniteStatistics, bmm_solve, lam_from_rho
from bmmstream.statistics.grams import (
    combine, datafree_stats, hybrid_grams, lowrank_combine, lowrank_datafree_stats, lowrank_hybrid_grams,
)

STATISTICS = ("data_free", "data_assisted", "hybrid")
STATISTICS_DTYPES = ("float64", "compute")
DEFAULT_RHO = 0.01
MAX_SCALE = 1e6


def _number(value, key: str, what: str) -> float:
    """A finite number >= 0 (bool and str refused), else one BmmError line."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BmmError(f"bmm: parameter '{key}' must be {what}, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or x < 0:
        raise BmmError(f"bmm: parameter '{key}' must be a finite number >= 0, got {x!r}")
    return x


def _per_group(value, key: str) -> dict[str, float | None]:
    """One value per group; a group missing from a mapping (or null there, as a search's best point
    writes it) gets None (rho: DEFAULT_RHO; lam: the default relative rho at solve time)."""
    what = "a number or a mapping group -> number"
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(GROUPS))
        if unknown:
            raise BmmError(f"bmm: parameter '{key}' has unknown group(s) {unknown}; groups: {list(GROUPS)}")
        out = {g: None if value.get(g) is None else _number(value[g], key, what) for g in GROUPS}
        if key == "rho":
            out = {g: DEFAULT_RHO if v is None else v for g, v in out.items()}
        return out
    x = _number(value, key, what)
    return {g: x for g in GROUPS}


def _per_block(value, key: str, blocks: int) -> list[dict[str, float | None]] | None:
    """rho/lam as one number, a mapping group -> number, or a list of those, one per block."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != blocks:
            raise BmmError(f"bmm: {key} lists {len(value)} values but blocks is {blocks}")
        return [_per_group(v, key) for v in value]
    return [_per_group(value, key)] * blocks


def _scales(value, blocks: int) -> list[float]:
    what = "a number or a list of numbers (one per block)"
    values = list(value) if isinstance(value, (list, tuple)) else [value] * blocks
    out = []
    for v in values:
        x = _number(v, "scale", what)
        if x > MAX_SCALE:
            raise BmmError(f"bmm: parameter 'scale' must be at most {MAX_SCALE:g}, got {x!r}")
        out.append(x)
    if len(out) != blocks:
        raise BmmError(f"bmm: scale lists {len(out)} values but blocks is {blocks}")
    return out


@register
class BMM(MergeMethod):
    name = "bmm"
    defaults = {
        "anchor": "task_arithmetic",
        "anchor_parameters": {},
        "statistics": "data_free",
        "rho": DEFAULT_RHO,
        "lam": None,
        "scale": 1.0,
        "blocks": 1,
        "eps": 0.5,
        "hybrid_rescale": False,
        "statistics_dtype": "float64",
        "keep_statistics": False,
        "normalize_tasks": False,
    }
    uses_statistics = True

    def __init__(self, params: dict | None = None, *, seed: int = 0, **kw):
        super().__init__(params, seed=seed, **kw)  # kw: what the registry passes on (per-model parameters)
        p = self.params
        if p["anchor"] == "bmm":
            raise BmmError("bmm: the anchor cannot be bmm itself")
        self.anchor = get_method(p["anchor"], p["anchor_parameters"] or {}, seed=seed, models=self.anchor_models())
        self.needs_prepass = self.anchor.needs_prepass
        self.needs_grams = p["statistics"] != "data_free" or bool(getattr(self.anchor, "needs_grams", False))
        if p["statistics"] not in STATISTICS:
            raise BmmError(f"bmm: statistics must be one of {list(STATISTICS)}, got {p['statistics']!r}")
        if p["statistics_dtype"] not in STATISTICS_DTYPES:
            raise BmmError(f"bmm: statistics_dtype must be one of {list(STATISTICS_DTYPES)}, got {p['statistics_dtype']!r}")
        for flag in ("hybrid_rescale", "normalize_tasks", "keep_statistics"):
            if not isinstance(p[flag], bool):
                raise BmmError(f"bmm: parameter '{flag}' must be true or false, got {p[flag]!r}")
        eps = p["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= float(eps) <= 1.0:
            raise BmmError(f"bmm: parameter 'eps' must be a number in [0, 1], got {eps!r}")
        if p["lam"] is not None and "rho" in (params or {}):
            raise BmmError("bmm: give either 'rho' (relative to trace(G)/d_in) or 'lam' (absolute), not both")
        blocks = p["blocks"]
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise BmmError(f"bmm: blocks must be an integer >= 1, got {blocks!r}")
        self.lam = _per_block(p["lam"], "lam", blocks)
        self.rho = None if self.lam is not None else _per_block(p["rho"], "rho", blocks)
        self.scales = _scales(p["scale"], blocks)
        self.solve_records: list[dict] = []

    # the anchor's prepass (e.g. TIES' global threshold) is BMM's prepass
    def prepass_observe(self, inp: ModuleInput) -> None:
        self.anchor.prepass_observe(inp)

    def prepass_state(self) -> dict:
        return self.anchor.prepass_state()

    def load_prepass_state(self, state: dict) -> None:
        self.anchor.load_prepass_state(state)

    def describe(self) -> dict:
        d = super().describe()
        d["parameters"]["lam_mode"] = "absolute" if self.lam is not None else "relative (rho * trace(G)/d_in)"
        d["anchor"] = self.anchor.describe()
        return d

    # -- statistics ------------------------------------------------------------------------
    @property
    def gram_dtype(self) -> torch.dtype:
        """Calibration Grams in float64 with the float64 statistics (statistics/data_assisted.py)."""
        return torch.float32 if self.params["statistics_dtype"] == "compute" else torch.float64

    def statistics_dtype(self, inp: ModuleInput) -> torch.dtype:
        return torch.float64 if self.params["statistics_dtype"] == "float64" else inp.deltas.dtype

    def module_statistics(self, inp: ModuleInput, eps: float | None = None) -> dict[str, torch.Tensor]:
        """G and C of one linear module from its task vectors (and input Grams when collected);
        `eps` overrides the hybrid eps (the search keeps the two ends eps = 1 and eps = 0)."""
        kind = self.params["statistics"]
        norm = bool(self.params["normalize_tasks"])
        dt = self.statistics_dtype(inp)
        lowrank = inp.factors  # LoRA experts: r-sized products, U_t never densified here
        e = float(self.params["eps"] if eps is None else eps)
        if kind == "data_free" or inp.grams is None or (
            kind == "hybrid" and e == 0.0 and not lowrank and not self.params["hybrid_rescale"]
        ):
            # hybrid eps = 0 is the data-free statistics, bit for bit (datafree_stats' association
            # differs from combine()'s sum of U_t G_t)
            # linears outside the layer stack (e.g. BERT's pooler) see no calibration input:
            # they fall back to the data-free statistics
            G, C = lowrank_datafree_stats(lowrank, norm, dt) if lowrank else datafree_stats(inp.deltas, norm, dt)
        elif kind == "data_assisted":
            G, C = lowrank_combine(lowrank, inp.grams, dt) if lowrank else combine(inp.deltas, inp.grams, dt)
        else:
            rescale = bool(self.params["hybrid_rescale"])
            if lowrank:
                G, C = lowrank_combine(lowrank, lowrank_hybrid_grams(lowrank, inp.grams, e, rescale, dt), dt)
            else:
                G, C = combine(inp.deltas, hybrid_grams(inp.deltas, inp.grams, e, rescale, dt), dt)
        return {"G": G, "C": C}

    def unit_statistics(self, inputs: list[ModuleInput]) -> dict[str, dict[str, torch.Tensor]]:
        return {i.spec.name: self.module_statistics(i) for i in inputs if i.spec.kind == "linear"}

    @staticmethod
    def _hp(per_block: list[dict[str, float | None]], inp: ModuleInput) -> float | None:
        return per_block[min(inp.spec.block, len(per_block) - 1)][inp.spec.group]

    def module_lam(self, G: torch.Tensor, group: list[ModuleInput]) -> tuple[torch.Tensor, list[str]]:
        """lam per module of a batch [B] in G's dtype, and how each was chosen (for solve_records)."""
        dt, dev = G.dtype, G.device
        given = [self._hp(self.lam, i) for i in group] if self.lam is not None else [None] * len(group)
        rho = [DEFAULT_RHO if self.lam is not None else self._hp(self.rho, i) for i in group]
        rel = lam_from_rho(G, torch.tensor(rho, dtype=dt, device=dev))
        lam = torch.stack([rel[k] if v is None else torch.tensor(v, dtype=dt, device=dev) for k, v in enumerate(given)])
        modes = [
            "absolute" if v is not None
            else f"relative rho={r:g}" + (f" (default: group '{i.spec.group}' not in lam)" if self.lam is not None else "")
            for v, r, i in zip(given, rho, group)
        ]
        return lam, modes

    # -- merge -----------------------------------------------------------------------------
    # merge_unit(inputs, stats) is the union of merge_unit([inp], {name: stats[name]}) over the unit's
    # modules, bit for bit: a pipeline may hand BMM one module at a time (its T task vectors and its
    # statistics are then the only ones resident) and write the same output.
    merges_by_module = True

    def merge_unit(
        self, inputs: list[ModuleInput], stats: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Module by module: anchor, statistics (taken from `stats`, which is consumed: each module's
        G and C are popped and solved in place, or computed here when absent), solve. A module's
        stats may carry the anchor task vector "U0" (a search's stored one), used instead of merging
        the anchor again."""
        out: dict[str, torch.Tensor] = {}
        for inp in inputs:
            name = inp.spec.name
            if inp.spec.kind != "linear":
                out[name] = self.anchor.merge_unit([inp])[name]
                continue
            st = stats.pop(name, None) if stats is not None else None
            U0 = st.pop("U0", None) if st is not None else None
            if U0 is None:
                U0 = self.anchor.merge_unit([inp])[name]
            if st is None:
                st = self.module_statistics(inp)
            out[name] = self._solve_module(inp, st, U0)
            del st
        return out

    def _solve_module(self, inp: ModuleInput, st: dict[str, torch.Tensor], U0: torch.Tensor) -> torch.Tensor:
        """s * U for one module; G and C of `st` are handed to the solve (overwritten in place)."""
        name = inp.spec.name
        G, C = st.pop("G")[None], st.pop("C")[None]
        lam, modes = self.module_lam(G, [inp])
        dt = torch.float64 if self.params["statistics_dtype"] == "float64" else G.dtype
        try:
            U, damped = bmm_solve(G, C, U0[None], lam, dtype=dt, overwrite=True)
        except NonFiniteStatistics as e:
            raise BmmError(
                f"bmm: module '{name}': {e.what} holds NaN or Inf (from NaN/Inf or overflowing "
                f"values in the base or an expert); cannot solve"
            ) from None
        del G, C
        s = self.scales[min(inp.spec.block, len(self.scales) - 1)]
        rec = {"module": name, "lam": float(lam[0]), "lam_mode": modes[0], "scale": s}
        if damped:
            rec["damping"] = damped[0].added
            rec["damping_attempts"] = damped[0].attempts
        self.solve_records.append(rec)
        U = U[0]
        return U.mul_(s) if s != 1.0 else U
