"""The outer search space (DESIGN.md section 2): per block a scale and one damping per module group.

A point of the space is a plain, JSON-serialisable dict that the pipeline consumes:

    {"blocks": [{"scale": 1.12, "rho": {"attn_in": 0.01, "attn_out": 0.2,
                                         "mlp_in": 3e-3, "mlp_out": 0.05}}, ...],   # B entries
     "eps": 0.4}                                                                     # hybrid only

The damping key is "rho" (relative: lam = rho * trace(G) / d_in) or "lam" (absolute, the paper's
lam), per `SearchSpace.lam_mode`. Only groups that hold a regressed module of the plan are searched
(`plan_groups`): a family without an MLP group, or a generic family whose linears are all "other",
never gets a dimension that reaches nothing; `groups` then lists the searched groups, per block when
blocks differ (`block_groups`). Every value is rounded to `SIG_DIGITS` significant digits
(`canonical`) so that a point has one spelling: cache keys and resume checks compare these.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bmmstream.errors import BmmError
from bmmstream.plan.layout import Plan

SEARCH_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
SIG_DIGITS = 6


def round_sig(x: float, digits: int = SIG_DIGITS) -> float:
    """x rounded to `digits` significant digits (the canonical spelling of a parameter value)."""
    return float(f"{float(x):.{digits}g}")


def canonical(params: Any) -> Any:
    """Round every float of a (nested) point; tuples become lists, so JSON round trips are exact."""
    if isinstance(params, dict):
        return {str(k): canonical(v) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return [canonical(v) for v in params]
    if isinstance(params, (bool, np.bool_)):
        return bool(params)
    if isinstance(params, (int, float, np.integer, np.floating)):
        return round_sig(params)
    return params


def params_key(params: dict) -> str:
    """Stable text of a point: canonical values, sorted keys."""
    return json.dumps(canonical(params), sort_keys=True, separators=(",", ":"))


def _check_range(name: str, rng: Any, *, positive: bool, lo_min: float | None = None,
                 hi_max: float | None = None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise BmmError(f"search.{name} must be a pair [low, high] of numbers, got {rng!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise BmmError(f"search.{name} must satisfy low <= high (finite), got [{lo}, {hi}]")
    if positive and lo <= 0:
        raise BmmError(f"search.{name} must be positive (it is searched log-uniformly), got [{lo}, {hi}]")
    if lo_min is not None and lo < lo_min or hi_max is not None and hi > hi_max:
        raise BmmError(f"search.{name} must lie within [{lo_min}, {hi_max}], got [{lo}, {hi}]")
    return lo, hi


def plan_groups(plan: Plan) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Per block: the searched groups holding at least one regressed linear of the plan, and the
    groups dropped because no module of that block is in them. Refuses when no block has any."""
    have = {(m.block, m.group) for m in plan.modules if m.kind == "linear"}
    kept = [tuple(g for g in SEARCH_GROUPS if (b, g) in have) for b in range(plan.num_blocks)]
    dropped = [tuple(g for g in SEARCH_GROUPS if g not in k) for k in kept]
    if not any(kept):
        raise BmmError(
            f"search: no regressed module of this '{plan.family}' model is in a searched group "
            f"({', '.join(SEARCH_GROUPS)}), so no rho would reach the model; add an architecture table "
            "in bmmstream/plan/architectures/ or merge with fixed parameters (bmm merge)"
        )
    return kept, dropped


# The paper's search spaces (absolute lam, log-uniform; s uniform; B from the config's `blocks`).
PRESETS: dict[str, dict[str, list[float]]] = {
    "paper_llm": {"lam_range": [1e-3, 100.0], "scale_range": [1.0, 1.3]},
    "paper_vit": {"lam_range": [1e-4, 1.0], "scale_range": [1.0, 1.3]},
}


def apply_preset(search: dict) -> dict:
    """The `search:` section with its `preset` expanded; keys given beside the preset win, except
    rho_range, which would silently switch the preset's absolute lam to relative and is refused."""
    if "preset" not in search:
        return dict(search)
    name = search["preset"]
    if name not in PRESETS:
        raise BmmError(f"search.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    if "rho_range" in search:
        raise BmmError(f"search.preset: {name} searches absolute lam; give lam_range to change it, not rho_range")
    return {**PRESETS[name], **{k: v for k, v in search.items() if k != "preset"}}


@dataclass(frozen=True)
class SearchSpace:
    """B blocks x (scale, one damping per group), plus eps when statistics are hybrid.

    A range with low == high fixes that value (it is then not searched).
    `eps_default` is the eps of points that do not search it (the grid baseline).
    `block_groups` (one tuple per block) replaces `groups` when blocks search different groups; when
    every block has the same groups it is folded into `groups`.
    """

    num_blocks: int
    scale_range: tuple[float, float] = (1.0, 1.3)
    rho_range: tuple[float, float] = (1e-4, 1.0)
    lam_mode: str = "relative"  # "relative" (key "rho") or "absolute" (key "lam")
    hybrid: bool = False
    eps_range: tuple[float, float] = (0.0, 1.0)
    eps_default: float = 0.5
    groups: tuple[str, ...] = SEARCH_GROUPS
    block_groups: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise BmmError(f"search space: blocks must be an integer >= 1, got {self.num_blocks!r}")
        if self.lam_mode not in ("relative", "absolute"):
            raise BmmError(f"search space: lam_mode must be 'relative' or 'absolute', got {self.lam_mode!r}")
        object.__setattr__(self, "scale_range", _check_range("scale_range", self.scale_range, positive=True))
        object.__setattr__(self, "rho_range", _check_range("rho_range", self.rho_range, positive=True))
        object.__setattr__(
            self, "eps_range", _check_range("eps_range", self.eps_range, positive=False, lo_min=0.0, hi_max=1.0)
        )
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.block_groups is not None:
            bg = tuple(tuple(g) for g in self.block_groups)
            if len(bg) != self.num_blocks:
                raise BmmError(f"search space: {len(bg)} block group lists for {self.num_blocks} blocks")
            uniform = all(g == bg[0] for g in bg)
            object.__setattr__(self, "groups", bg[0] if uniform else tuple(g for g in SEARCH_GROUPS
                                                                           if any(g in b for b in bg)))
            object.__setattr__(self, "block_groups", None if uniform else bg)
        for g in {g for b in range(self.num_blocks) for g in self.groups_of(b)}:
            if g not in SEARCH_GROUPS:
                raise BmmError(f"search space: unknown group {g!r}; groups: {list(SEARCH_GROUPS)}")
        if not any(self.groups_of(b) for b in range(self.num_blocks)):
            raise BmmError("search space: no group to search a damping for")

    def groups_of(self, block: int) -> tuple[str, ...]:
        """The groups searched in one block."""
        return self.groups if self.block_groups is None else self.block_groups[block]

    @classmethod
    def from_config(cls, search: dict, *, num_blocks: int, hybrid: bool = False,
                    block_groups: list[tuple[str, ...]] | None = None) -> "SearchSpace":
        """Build from the config's `search:` section (preset, rho_range or lam_range, scale_range,
        eps_range); `block_groups`: the groups to search per block (`plan_groups`), default all four."""
        search = apply_preset(search)
        if "rho_range" in search and "lam_range" in search:
            raise BmmError("search: give rho_range (relative lam) or lam_range (absolute lam), not both")
        kw: dict[str, Any] = {"num_blocks": num_blocks, "hybrid": hybrid}
        if block_groups is not None:
            kw["block_groups"] = tuple(tuple(g) for g in block_groups)
        if "lam_range" in search:
            kw["rho_range"], kw["lam_mode"] = search["lam_range"], "absolute"
        elif "rho_range" in search:
            kw["rho_range"] = search["rho_range"]
        for name in ("scale_range", "eps_range"):
            if name in search:
                kw[name] = search[name]
        return cls(**kw)

    # -- description -------------------------------------------------------------------------
    @property
    def damping_key(self) -> str:
        return "rho" if self.lam_mode == "relative" else "lam"

    @property
    def dimension(self) -> int:
        """Number of searched values (ranges with low == high are fixed, not searched)."""
        free = lambda r: int(r[0] != r[1])  # noqa: E731
        per_block = sum(free(self.scale_range) + len(self.groups_of(b)) * free(self.rho_range)
                        for b in range(self.num_blocks))
        return per_block + (free(self.eps_range) if self.hybrid else 0)

    def signature(self) -> dict:
        """What identifies the space (part of a search's identity on disk)."""
        return {
            "num_blocks": self.num_blocks,
            "scale_range": list(self.scale_range),
            "rho_range": list(self.rho_range),
            "lam_mode": self.lam_mode,
            "hybrid": self.hybrid,
            "eps_range": list(self.eps_range) if self.hybrid else None,
            "groups": list(self.groups) if self.block_groups is None else [list(g) for g in self.block_groups],
        }

    def signature_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.signature(), sort_keys=True).encode()).hexdigest()[:12]

    # -- nevergrad -----------------------------------------------------------------------------
    def parametrization(self, seed: int):
        """The space as a seeded nevergrad ng.p.Dict; `to_params(candidate.value)` gives the plain form."""
        import nevergrad as ng

        def scalar(rng):
            lo, hi = rng
            return lo if lo == hi else ng.p.Scalar(lower=lo, upper=hi)

        def log(rng):
            lo, hi = rng
            return lo if lo == hi else ng.p.Log(lower=lo, upper=hi)

        blocks = [
            ng.p.Dict(scale=scalar(self.scale_range),
                      damping=ng.p.Dict(**{g: log(self.rho_range) for g in self.groups_of(b)}))
            for b in range(self.num_blocks)
        ]
        top: dict[str, Any] = {"blocks": ng.p.Tuple(*blocks)}
        if self.hybrid:
            top["eps"] = scalar(self.eps_range)
        param = ng.p.Dict(**top)
        param.random_state.seed(seed)
        return param

    def to_params(self, value: dict) -> dict:
        """Nevergrad's value of `parametrization()` -> the canonical plain point."""
        out: dict[str, Any] = {
            "blocks": [{"scale": b["scale"], self.damping_key: dict(b["damping"])} for b in value["blocks"]]
        }
        if self.hybrid:
            out["eps"] = value["eps"]
        return canonical(out)

    # -- baselines -----------------------------------------------------------------------------
    def shared_point(self, damping: float, scale: float = 1.0) -> dict:
        """Every block and group shares one damping and one scale (the grid baseline)."""
        out: dict[str, Any] = {
            "blocks": [{"scale": scale, self.damping_key: {g: damping for g in self.groups_of(b)}}
                       for b in range(self.num_blocks)]
        }
        if self.hybrid:
            out["eps"] = self.eps_default
        return canonical(out)

    def grid_dampings(self, n: int) -> list[float]:
        """n dampings log-spaced over the range end to end (the geometric middle if n == 1)."""
        lo, hi = self.rho_range
        return [math.sqrt(lo * hi)] if n == 1 else [float(v) for v in np.geomspace(lo, hi, n)]

    def grid(self, n: int) -> list[dict]:
        """n shared dampings, log-spaced over the range end to end (the geometric middle if n == 1)."""
        scale = min(max(1.0, self.scale_range[0]), self.scale_range[1])
        return [self.shared_point(v, scale) for v in self.grid_dampings(n)]

    def lattice(self, n_damping: int, n_scale: int) -> list[dict]:
        """Shared points on a coarse lattice covering the whole ranges, edges included: n_damping
        log-spaced dampings x n_scale evenly spaced scales, damping-major. n_scale == 1 uses the grid's
        scale, so `lattice(n, 1) == grid(n)` and the staged search contains the grid baseline."""
        if n_damping < 1 or n_scale < 1:
            raise BmmError(f"search lattice: need >= 1 damping and scale value, got {n_damping} x {n_scale}")
        lo, hi = self.scale_range
        scales = (list(np.linspace(lo, hi, n_scale)) if n_scale > 1 and lo != hi
                  else [min(max(1.0, lo), hi)])
        return [self.shared_point(d, s) for d in self.grid_dampings(n_damping) for s in scales]

    # -- coordinates (for coordinate refinement) -------------------------------------------------
    def coordinates(self) -> list[tuple[str, int | None, str | None]]:
        """The searched values as (kind, block, group): ("scale", b, None), ("damping", b, g),
        ("eps", None, None); fixed ranges are left out."""
        out: list[tuple[str, int | None, str | None]] = []
        for b in range(self.num_blocks):
            if self.scale_range[0] != self.scale_range[1]:
                out.append(("scale", b, None))
            if self.rho_range[0] != self.rho_range[1]:
                out += [("damping", b, g) for g in self.groups_of(b)]
        if self.hybrid and self.eps_range[0] != self.eps_range[1]:
            out.append(("eps", None, None))
        return out

    def tied_coordinates(self) -> list[tuple[str, None, str | None]]:
        """Coordinates moving every block at once: ("scale", None, None), ("damping", None, g);
        only with more than one block (with one they equal `coordinates()`)."""
        if self.num_blocks == 1:
            return []
        out: list[tuple[str, None, str | None]] = []
        if self.scale_range[0] != self.scale_range[1]:
            out.append(("scale", None, None))
        if self.rho_range[0] != self.rho_range[1]:
            out += [("damping", None, g) for g in SEARCH_GROUPS
                    if any(g in self.groups_of(b) for b in range(self.num_blocks))]
        return out

    def moved(self, params: dict, coord: tuple, delta: float) -> dict:
        """The point with one coordinate moved by `delta` in unit coordinates (clipped to the range);
        a tied coordinate (block None) moves that value in every block that has it."""
        kind, b, g = coord
        if b is not None or kind == "eps":
            return self.with_unit_value(params, coord, self.unit_value(params, coord) + delta)
        out = params
        for blk in range(self.num_blocks):
            if kind == "scale" or g in self.groups_of(blk):
                c = (kind, blk, g)
                out = self.with_unit_value(out, c, self.unit_value(out, c) + delta)
        return out

    def unit_value(self, params: dict, coord: tuple) -> float:
        """One coordinate of a point mapped to [0, 1] (damping on a log scale)."""
        kind, b, g = coord
        if kind == "scale":
            return _to_unit(params["blocks"][b]["scale"], self.scale_range, log=False)
        if kind == "damping":
            return _to_unit(params["blocks"][b][self.damping_key][g], self.rho_range, log=True)
        return _to_unit(params["eps"], self.eps_range, log=False)

    def with_unit_value(self, params: dict, coord: tuple, u: float) -> dict:
        """A copy of the point with one coordinate set from u in [0, 1] (clipped); canonical."""
        kind, b, g = coord
        out = json.loads(json.dumps(params))
        u = min(max(float(u), 0.0), 1.0)
        if kind == "scale":
            out["blocks"][b]["scale"] = from_unit(u, self.scale_range, log=False)
        elif kind == "damping":
            out["blocks"][b][self.damping_key][g] = from_unit(u, self.rho_range, log=True)
        else:
            out["eps"] = from_unit(u, self.eps_range, log=False)
        return canonical(out)

    def random_point(self, rng: np.random.Generator) -> dict:
        """Scale and eps uniform, damping log-uniform; draws in a fixed order so a seed replays."""
        llo, lhi = math.log(self.rho_range[0]), math.log(self.rho_range[1])
        blocks = []
        for b in range(self.num_blocks):
            scale = rng.uniform(*self.scale_range)
            damp = {g: math.exp(rng.uniform(llo, lhi)) for g in self.groups_of(b)}
            blocks.append({"scale": scale, self.damping_key: damp})
        out: dict[str, Any] = {"blocks": blocks}
        if self.hybrid:
            out["eps"] = rng.uniform(*self.eps_range)
        return canonical(out)

    def to_bmm_parameters(self, params: dict) -> dict:
        """A point as the bmm merge method's parameters: rho (or lam) and scale as per-block lists."""
        key = self.damping_key
        out: dict[str, Any] = {
            key: [dict(b[key]) for b in params["blocks"]],
            "scale": [b["scale"] for b in params["blocks"]],
            "blocks": self.num_blocks,
        }
        if self.hybrid:
            out["eps"] = params["eps"]
        return out

    # -- checking --------------------------------------------------------------------------------
    def validate(self, params: dict) -> dict:
        """Check a user-given point (e.g. from a best-params JSON) against the space; return it canonical."""
        if not isinstance(params, dict) or not isinstance(params.get("blocks"), list):
            raise BmmError("search point: expected a dict with a 'blocks' list")
        if len(params["blocks"]) != self.num_blocks:
            raise BmmError(f"search point: {len(params['blocks'])} blocks given, the space has {self.num_blocks}")
        key = self.damping_key
        for i, b in enumerate(params["blocks"]):
            if not isinstance(b, dict) or "scale" not in b or not isinstance(b.get(key), dict):
                raise BmmError(f"search point: block {i} needs 'scale' and a '{key}' dict")
            missing = sorted(set(self.groups_of(i)) - set(b[key]))
            if missing:
                raise BmmError(f"search point: block {i} '{key}' lacks group(s) {missing}")
            for g in self.groups_of(i):
                if not float(b[key][g]) > 0:
                    raise BmmError(f"search point: block {i} {key}[{g}] must be > 0, got {b[key][g]}")
        if self.hybrid and "eps" not in params:
            raise BmmError("search point: hybrid statistics need 'eps'")
        return canonical(params)


def _to_unit(x: float, rng: tuple[float, float], *, log: bool) -> float:
    lo, hi = rng
    if lo == hi:
        return 0.0
    if log:
        return (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (x - lo) / (hi - lo)


def from_unit(u: float, rng: tuple[float, float], *, log: bool) -> float:
    lo, hi = rng
    if u <= 0.0:
        return lo  # the edges exactly, not exp(log(lo)) with its rounding
    if u >= 1.0:
        return hi
    if log:
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return lo + u * (hi - lo)
