"""Bayesian Model Merging (arXiv 2605.12843): the anchor-regularised closed form.

Per 2-D module: U = (C + lam U0)(G + lam I)^-1 and W = W_pre + s U, where U0 is the task vector of
the anchor method (any registry method, `anchor`, with `anchor_parameters`), G and C the statistics
of stats.py (data_free, data_assisted or hybrid), lam = rho * trace(G)/d_in per group (or the
absolute `lam`), s the scale of the module's block. rho, lam and scale may each be given per block
as a list (one entry per block), rho/lam entries being a number or a mapping group -> number.

Tensors that are not regressed (kind "vector": biases and norms; kind "embedding": embeddings
and lm_head, which are vocab-sized and never form vocab x vocab products) take the anchor's value
W_pre + U0, unscaled. Defaults: anchor task_arithmetic (scale 0.3), rho 0.01, scale 1.0.
`normalize_tasks: true` weighs each task's data-free Gram to equal trace (stats.task_weights), so
experts with small task vectors are not drowned out; off by default (the paper's raw sum).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, get_method, register
from bmmstream.plan.layout import GROUPS
from bmmstream.solve.closed_form import bmm_solve, lam_from_rho
from bmmstream.statistics.grams import combine, datafree_stats, hybrid_grams

STATISTICS = ("data_free", "data_assisted", "hybrid")
DEFAULT_RHO = 0.01


def _per_group(value, key: str) -> dict[str, float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return {g: float(value) for g in GROUPS}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(GROUPS))
        if unknown:
            raise BmmError(f"bmm: parameter '{key}' has unknown group(s) {unknown}; groups: {list(GROUPS)}")
        out = {g: float(value.get(g, DEFAULT_RHO if key == "rho" else 0.0)) for g in GROUPS}
        if any(v < 0 for v in out.values()):
            raise BmmError(f"bmm: parameter '{key}' must be >= 0, got {value}")
        return out
    raise BmmError(f"bmm: parameter '{key}' must be a number or a mapping group -> number, got {value!r}")


def _per_block(value, key: str, blocks: int) -> list[dict[str, float]] | None:
    """rho/lam as one number, a mapping group -> number, or a list of those, one per block."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != blocks:
            raise BmmError(f"bmm: {key} lists {len(value)} values but blocks is {blocks}")
        return [_per_group(v, key) for v in value]
    return [_per_group(value, key)] * blocks


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
        "keep_statistics": False,
        "normalize_tasks": False,
    }
    uses_statistics = True

    def __init__(self, params: dict | None = None, *, seed: int = 0):
        super().__init__(params, seed=seed)
        p = self.params
        if p["anchor"] == "bmm":
            raise BmmError("bmm: the anchor cannot be bmm itself")
        self.anchor = get_method(p["anchor"], p["anchor_parameters"] or {}, seed=seed)
        self.needs_prepass = self.anchor.needs_prepass
        self.needs_grams = p["statistics"] != "data_free" or bool(getattr(self.anchor, "needs_grams", False))
        if p["statistics"] not in STATISTICS:
            raise BmmError(f"bmm: statistics must be one of {list(STATISTICS)}, got {p['statistics']!r}")
        if p["lam"] is not None and "rho" in (params or {}):
            raise BmmError("bmm: give either 'rho' (relative to trace(G)/d_in) or 'lam' (absolute), not both")
        blocks = int(p["blocks"])
        if blocks < 1:
            raise BmmError(f"bmm: blocks must be >= 1, got {blocks}")
        self.lam = _per_block(p["lam"], "lam", blocks)
        self.rho = None if self.lam is not None else _per_block(p["rho"], "rho", blocks)
        scale = p["scale"]
        self.scales = [float(scale)] * blocks if isinstance(scale, (int, float)) else [float(s) for s in scale]
        if len(self.scales) != blocks:
            raise BmmError(f"bmm: scale lists {len(self.scales)} values but blocks is {blocks}")
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
    def module_statistics(self, inp: ModuleInput) -> dict[str, torch.Tensor]:
        """G and C of one linear module from its task vectors (and input Grams when collected)."""
        kind = self.params["statistics"]
        norm = bool(self.params["normalize_tasks"])
        if kind == "data_free":
            G, C = datafree_stats(inp.deltas, norm)
        elif inp.grams is None:
            # linears outside the layer stack (e.g. BERT's pooler) see no calibration input:
            # they fall back to the data-free statistics
            G, C = datafree_stats(inp.deltas, norm)
        else:
            grams = inp.grams if kind == "data_assisted" else hybrid_grams(inp.deltas, inp.grams, float(self.params["eps"]))
            G, C = combine(inp.deltas, grams)
        return {"G": G, "C": C}

    def unit_statistics(self, inputs: list[ModuleInput]) -> dict[str, dict[str, torch.Tensor]]:
        return {i.spec.name: self.module_statistics(i) for i in inputs if i.spec.kind == "linear"}

    @staticmethod
    def _hp(per_block: list[dict[str, float]], inp: ModuleInput) -> float:
        return per_block[min(inp.spec.block, len(per_block) - 1)][inp.spec.group]

    # -- merge -----------------------------------------------------------------------------
    def merge_unit(
        self, inputs: list[ModuleInput], stats: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor]:
        anchor = self.anchor.merge_unit(inputs)
        out: dict[str, torch.Tensor] = {}
        by_shape: dict[tuple, list[ModuleInput]] = defaultdict(list)
        for inp in inputs:
            if inp.spec.kind == "linear":
                by_shape[tuple(inp.base.shape)].append(inp)
            else:
                out[inp.spec.name] = anchor[inp.spec.name]
        if stats is None:
            stats = self.unit_statistics([i for group in by_shape.values() for i in group])
        for shape, group in sorted(by_shape.items()):
            names = [i.spec.name for i in group]
            G = torch.stack([stats[n]["G"] for n in names])
            C = torch.stack([stats[n]["C"] for n in names])
            U0 = torch.stack([anchor[n] for n in names])
            if self.lam is not None:
                lam = torch.tensor([self._hp(self.lam, i) for i in group], dtype=G.dtype, device=G.device)
            else:
                rho = torch.tensor([self._hp(self.rho, i) for i in group], dtype=G.dtype, device=G.device)
                lam = lam_from_rho(G, rho)
            U, damped = bmm_solve(G, C, U0, lam)
            damp = {d.index: d for d in damped}
            for k, inp in enumerate(group):
                s = self.scales[min(inp.spec.block, len(self.scales) - 1)]
                out[inp.spec.name] = s * U[k]
                rec = {"module": inp.spec.name, "lam": float(lam[k]), "scale": s}
                if k in damp:
                    rec["damping"] = damp[k].added
                self.solve_records.append(rec)
        return out
