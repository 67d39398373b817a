"""The staged search design (`optimizer: staged`, the default): it cannot do worse than the grid it holds.

Stage 1 scores the shared grid: one damping for every group and block x one scale, on a coarse
lattice that covers the whole ranges, edges included (log-spaced dampings; with the default sizes
it contains the 9-point `grid` baseline from budget 36; below that `stage1: [9, 1]`, the grid's
damping line, holds it from budget 9, at a cost where the best scale is not the grid's: see
bench/search_design_synth.py). A short line stage then bisects the shared damping at the best
lattice point's scale (`line`, default up to 3 trials): the midpoint between the best point on that
line and its better neighbour, again from the new best; these are shared points like the grid's, so
they may be the choice without a guard, and a coarse lattice still reaches an optimum between its
dampings (on the decoder suite the lattice's 1e-4 and 0.0316 bracket the grid's winner, 2.8e-4).
Stage 2 refines per block and per group from the best few
stage-1 points by coordinate steps (a pattern search in unit coordinates, damping on a log scale;
a step that pays is doubled, a poll that fails halves them all; with B > 1 a group's value moves in
every block at once before blocks move alone): a chain steps to a neighbour that beats its current
point (by more than `move_z` noise units, default any strict gain, so small gains add up), and a
point may become the search's choice only when it beats the incumbent (the best choice so far,
first the best grid point) by more than the noise. The noise is a bootstrap over the per-row
scores when the scorer gives them (paired when both points were scored on the same rows), else the
fixed `margin`. So on a plateau of equal scores, or within noise, the grid's winner stays the choice.

Decisions depend only on the scores told, so a resumed search replays them exactly.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bmmstream.errors import BmmError
from bmmstream.search.space import SearchSpace, from_unit, params_key

GRID_DAMPINGS = 9  # the shared-grid baseline's size: the default lattice holds it exactly


@dataclass(frozen=True)
class DesignOptions:
    """Options of the staged design (the `search.design:` section).

    stage1: [n_damping, n_scale] of the stage-1 lattice; default from the budget (about half of it,
        at most 9 dampings, 2 scales (the edges) below 27 stage-1 trials, 3 from there).
    line: trials of the line stage (shared-damping bisection after stage 1); default
        min(3, half the trials left after stage 1); 0 goes from stage 1 straight to the refinement.
    refine_from: how many of the best stage-1 points share the refinement budget (each chain
        gets an equal share; when every chain has converged the next stage-1 points start more).
        1 (the default) measured best on synthetic objectives (edge, interior, per-group optima).
    noise_z: a point becomes the choice only when it beats the incumbent by more than noise_z
        bootstrap standard errors (and `margin`).
    move_z: a refinement chain steps to a neighbour that beats its current point by more than
        move_z standard errors (and `margin`); 0 follows any strict gain, so small gains add up.
    margin: the smallest accepted gain (the whole guard when the scorer gives no per-row scores).
    bootstrap: bootstrap resamples per comparison.
    min_step: a chain stops when its step (unit coordinates) falls below this.
    first_step: the first step of every coordinate, in lattice spacings (1 measured a little
        better than 0.5 on noisy synthetic validation sets, equal at B = 3).
    """

    stage1: tuple[int, int] | None = None
    line: int | None = None
    refine_from: int = 1
    noise_z: float = 2.0
    move_z: float = 0.0
    margin: float = 0.0
    bootstrap: int = 200
    min_step: float = 1.0 / 64
    first_step: float = 1.0

    @classmethod
    def from_config(cls, cfg: dict | None) -> "DesignOptions":
        cfg = dict(cfg or {})
        known = {"stage1", "line", "refine_from", "noise_z", "move_z", "margin", "bootstrap", "min_step", "first_step"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise BmmError(f"search.design: unknown key(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        if cfg.get("stage1") is not None:
            s1 = cfg["stage1"]
            if (not isinstance(s1, (list, tuple)) or len(s1) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in s1)):
                raise BmmError(f"search.design.stage1 must be [n_damping, n_scale], integers >= 1, got {s1!r}")
            kw["stage1"] = (int(s1[0]), int(s1[1]))
        for name, lo in (("line", 0), ("refine_from", 1), ("bootstrap", 1)):
            if name in cfg:
                v = cfg[name]
                if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                    raise BmmError(f"search.design.{name} must be an integer >= {lo}, got {v!r}")
                kw[name] = v
        for name in ("noise_z", "move_z", "margin", "min_step", "first_step"):
            if name in cfg:
                v = cfg[name]
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                    raise BmmError(f"search.design.{name} must be a finite number >= 0, got {v!r}")
                kw[name] = float(v)
        return cls(**kw)

    def signature(self) -> dict:
        return {"stage1": list(self.stage1) if self.stage1 else None, "line": self.line, "refine_from": self.refine_from,
                "noise_z": self.noise_z, "move_z": self.move_z, "margin": self.margin, "bootstrap": self.bootstrap,
                "min_step": self.min_step, "first_step": self.first_step}


def stage1_shape(space: SearchSpace, budget: int, opts: DesignOptions) -> tuple[int, int]:
    """(n_damping, n_scale) of the stage-1 lattice, trimmed so it fits the budget."""
    scale_free = space.scale_range[0] != space.scale_range[1]
    damp_free = space.rho_range[0] != space.rho_range[1]
    if opts.stage1 is not None:
        nd, ns = opts.stage1
    else:
        target = max(1, budget // 2)
        ns = 1 if not scale_free or target < 4 else (2 if target < 27 else 3)
        nd = min(GRID_DAMPINGS, max(1, target // ns))
    nd = nd if damp_free else 1
    ns = ns if scale_free else 1
    while nd * ns > budget:  # never more stage-1 points than trials
        if ns > 1 and (nd == 1 or ns >= nd):
            ns -= 1
        else:
            nd -= 1
    return nd, ns


def line_trials(space: SearchSpace, budget: int, opts: DesignOptions) -> int:
    """Trials of the line stage: `opts.line`, else min(3, half of what stage 1 leaves); none when the
    damping is fixed or the lattice has one damping (nothing to bisect)."""
    nd, ns = stage1_shape(space, budget, opts)
    if nd < 2 or space.rho_range[0] == space.rho_range[1]:
        return 0
    left = budget - nd * ns
    return max(0, min(left, opts.line if opts.line is not None else min(3, left // 2)))


def bootstrap_noise(rows_a: Sequence[float] | None, rows_b: Sequence[float] | None, *, z: float,
                    margin: float, n_boot: int, seed: int) -> float:
    """The gain b must show over a to count: max(margin, z * bootstrap standard error of mean(b) -
    mean(a)). Paired (resampling the row differences) when both were scored on the same rows,
    independent resamples otherwise; just `margin` when either lacks per-row scores."""
    if rows_a is None or rows_b is None or len(rows_a) < 2 or len(rows_b) < 2:
        return margin
    a, b = np.asarray(rows_a, dtype=np.float64), np.asarray(rows_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if len(a) == len(b):
        d = b - a
        means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    else:
        means = (b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(axis=1)
                 - a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1))
    return max(margin, z * float(means.std(ddof=1)))


@dataclass
class _Scored:
    params: dict
    score: float
    rows: list[float] | None


class StagedAsker:
    """Asks the stage-1 lattice, then coordinate refinements; see the module docstring.

    The driver calls `ask_batch(n)` only after every earlier point was told, so the design may
    decide between batches; `eligible(params)` says whether a point may be the search's choice."""

    def __init__(self, space: SearchSpace, budget: int, seed: int, opts: DesignOptions | None = None):
        self.space, self.budget, self.seed = space, budget, seed
        self.opts = opts or DesignOptions()
        nd, ns = stage1_shape(space, budget, self.opts)
        self.stage1 = space.lattice(nd, ns)
        self.line_left = line_trials(space, budget, self.opts)
        self.line_keys: list[str] = []  # the line stage's points (lattice points on it first), asked order
        self.line_scale = 1.0
        # moves of one value in every block first (B > 1), then per block and group
        self.coords = space.tied_coordinates() + space.coordinates()
        # initial step: `first_step` lattice spacings (unit coordinates), a quarter where unsampled
        f = self.opts.first_step
        self.step0 = {c: (f / (nd - 1) if nd > 1 else 0.25) if c[0] == "damping"
                      else (f / (ns - 1) if ns > 1 else 0.25) if c[0] == "scale" else 0.25
                      for c in self.coords}
        self.known: dict[str, _Scored] = {}  # every told point by params_key
        self.queue: deque[dict] = deque(self.stage1)
        self.asked = 0
        self.stage = 1
        self.eligible_keys: set[str] = {params_key(p) for p in self.stage1}
        self.incumbent: _Scored | None = None
        self.starts: list[_Scored] = []
        self.chain = -1
        self.chain_asked = 0
        self.chain_budget = 0
        self.current: _Scored | None = None
        self.steps: dict[tuple, float] = {}
        self.poll: list[str] = []  # keys of the current poll's points
        self.first: tuple[tuple, int] | None = None  # (coord, sign) tried first in the next poll
        self.comparisons = 0

    # -- the driver's interface --------------------------------------------------------------
    def ask_batch(self, n: int) -> list[tuple[Any, dict]]:
        if self.stage == 1 and not self.queue:
            self._start_line()
        if self.stage == "line" and not self._line_next():
            self._start_stage2()
        if self.stage == 2:
            self._decide()
        out = []
        while self.queue and len(out) < n:
            out.append((None, self.queue.popleft()))
        if not out:  # nothing left to try: the incumbent again (a cached score, no evaluation)
            out.append((None, self.incumbent.params if self.incumbent else self.stage1[0]))
        self.asked += len(out)
        self.chain_asked += len(out)
        return out

    def ask(self) -> tuple[Any, dict]:
        return self.ask_batch(1)[0]

    def tell(self, handle: Any, score: float, rows: Sequence[float] | None = None, params: dict | None = None
             ) -> None:
        if params is None:
            raise ValueError("StagedAsker.tell needs the point told")
        key = params_key(params)
        if key not in self.known:
            self.known[key] = _Scored(params, float(score), list(rows) if rows is not None else None)

    def eligible(self, params: dict) -> bool:
        return params_key(params) in self.eligible_keys

    def close(self) -> None:
        pass

    # -- decisions -----------------------------------------------------------------------------
    def _noise(self, a: _Scored, b: _Scored) -> float:
        self.comparisons += 1
        o = self.opts
        return bootstrap_noise(a.rows, b.rows, z=o.noise_z, margin=o.margin, n_boot=o.bootstrap,
                               seed=self.seed * 1_000_003 + self.comparisons)

    def _beats(self, new: _Scored, old: _Scored) -> bool:
        if not math.isfinite(new.score):
            return False
        if not math.isfinite(old.score):
            return True
        return new.score - old.score > self._noise(old, new)

    def _moves_to(self, new: _Scored) -> bool:
        """A chain follows any gain larger than `move_z` noise units (0: any strict gain), so small
        gains can add up; the choice itself is guarded by `noise_z` against the incumbent."""
        if not math.isfinite(new.score):
            return False
        if not math.isfinite(self.current.score):
            return True
        gain = new.score - self.current.score
        if self.opts.move_z == self.opts.noise_z:
            return gain > self._noise(self.current, new)
        o = self.opts
        self.comparisons += 1
        need = bootstrap_noise(self.current.rows, new.rows, z=o.move_z, margin=o.margin, n_boot=o.bootstrap,
                               seed=self.seed * 1_000_003 + self.comparisons)
        return gain > need

    def _best_first(self, keys: list[str]) -> list[_Scored]:
        """The told points among keys, best score first (ties: the earlier key first)."""
        scored = [self.known[k] for k in keys if k in self.known]
        return [scored[i] for i in sorted(range(len(scored)), key=lambda i: (-_finite(scored[i].score), i))]

    def _damping_u(self, params: dict) -> float:
        return self.space.unit_value(params, ("damping", 0, self.space.groups_of(0)[0]))

    def _start_line(self) -> None:
        self.stage = "line"
        ranked = self._best_first([params_key(p) for p in self.stage1])
        if self.line_left <= 0 or not ranked or not math.isfinite(ranked[0].score):
            self.line_left = 0
            return
        self.line_scale = ranked[0].params["blocks"][0]["scale"]
        self.line_keys = [params_key(p) for p in self.stage1 if p["blocks"][0]["scale"] == self.line_scale]

    def _line_next(self) -> bool:
        """Queue the next line point (the midpoint, on the log-damping axis, between the line's best
        point and its better neighbour, the wider gap on a tie); False when the line stage is over."""
        while self.line_left > 0:
            best = self._best_first(self.line_keys)[0]
            pts = sorted((self._damping_u(self.known[k].params), _finite(self.known[k].score))
                         for k in self.line_keys if k in self.known)
            ub = self._damping_u(best.params)
            i = next(j for j, (u, _) in enumerate(pts) if u == ub)
            sides = [(pts[j][1], abs(pts[j][0] - ub), -j, (pts[j][0] + ub) / 2)
                     for j in (i - 1, i + 1) if 0 <= j < len(pts) and abs(pts[j][0] - ub) / 2 >= self.opts.min_step]
            if not sides:
                break
            u = max(sides)[3]
            p = self.space.shared_point(from_unit(u, self.space.rho_range, log=True), self.line_scale)
            k = params_key(p)
            if k in self.line_keys:
                break  # the midpoint rounds onto a point the line has: nothing new to learn
            self.line_keys.append(k)
            self.eligible_keys.add(k)  # a shared point, as the grid's: no guard
            if k in self.known:
                continue
            self.queue.append(p)
            self.line_left -= 1
            return True
        self.line_left = 0
        return False

    def _start_stage2(self) -> None:
        self.stage = 2
        lattice = [params_key(p) for p in self.stage1]
        scored = [self.known[k] for k in lattice + [k for k in self.line_keys if k not in lattice] if k in self.known]
        order = sorted(range(len(scored)), key=lambda i: (-_finite(scored[i].score), i))
        self.starts = [scored[i] for i in order if math.isfinite(scored[i].score)]
        self.incumbent = self.starts[0] if self.starts else None
        self.stage2_budget = self.budget - self.asked
        self._next_chain()

    def _next_chain(self) -> None:
        self.chain += 1
        self.queue.clear()
        self.poll = []
        if self.chain >= len(self.starts) or not self.coords:
            self.current = None
            return
        k = self.opts.refine_from
        share = math.ceil(self.stage2_budget / k) if self.chain < k else self.budget
        self.chain_budget, self.chain_asked = share, 0
        self.current = self.starts[self.chain]
        self.steps = dict(self.step0)
        self.first = None
        self._new_poll()

    def _new_poll(self) -> None:
        """Queue the current point's coordinate neighbours not scored yet (all are in `poll`)."""
        cur = self.current
        moves = [(c, s) for c in self.coords for s in (1, -1)]
        if self.first in moves:  # continue in the direction that just paid off
            i = moves.index(self.first)
            moves = moves[i:] + moves[:i]
        self.poll, self.queue = [], deque()
        self.moves: dict[str, tuple[tuple, int]] = {}
        for c, s in moves:
            p = self.space.moved(cur.params, c, s * self.steps[c])
            k = params_key(p)
            if k == params_key(cur.params) or k in self.moves:
                continue  # at an edge: no move
            self.poll.append(k)
            self.moves[k] = (c, s)
            if k not in self.known:
                self.queue.append(p)

    def _decide(self) -> None:
        """After the told points: move when a poll point beats the current one by more than the
        noise (opportunistic), shrink the step when the whole poll failed, end a chain when its step
        or its budget is spent; at most one new poll per call unless a poll has nothing to ask."""
        while self.current is not None:
            told = [self.known[k] for k in self.poll if k in self.known]
            best = max(told, key=lambda t: _finite(t.score), default=None)
            if best is not None and self._moves_to(best):
                self.first = self.moves[params_key(best.params)]
                c = self.first[0]
                self.steps[c] = min(2 * self.steps[c], 0.5)  # a paying direction: longer strides
                self.current = best
                if self.incumbent is None or self._beats(best, self.incumbent):
                    self.incumbent = best
                    self.eligible_keys.add(params_key(best.params))
                if self.chain_asked >= self.chain_budget:
                    self._next_chain()
                    continue
                self._new_poll()
            elif not self.queue:  # the whole poll failed
                if self.chain_asked >= self.chain_budget:
                    self._next_chain()
                    continue
                self.steps = {c: v / 2 for c, v in self.steps.items()}
                if max(self.steps.values()) < self.opts.min_step:
                    self._next_chain()
                    continue
                self.first = None
                self._new_poll()
            elif self.chain_asked >= self.chain_budget:
                self._next_chain()
                continue
            if self.queue:
                return


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf
