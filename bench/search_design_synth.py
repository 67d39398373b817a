"""The staged design's stage-1 shape at small budgets, on synthetic noisy validation sets.

Real suites cost an hour per seed here; this bench asks the question the real decoder suite raised
(at budget 12 the staged search scored below the grid) on objectives whose true accuracy is known,
so each rule's choice can be scored without test noise. A validation row has a difficulty u ~ U(0, 1);
a point with true skill a(p) gets it right when u + n < a(p), where n ~ N(0, sigma) is drawn per point
and row: models that differ a little share most of their errors (paired rows, as on real data).
The search scores most trials on a proxy (the first `proxy` rows), then its 3 best eligible points on
all `val` rows, as `bench/search_compare.py` does. Printed: mean true accuracy of the chosen point
over seeds, in how many seeds each rule's choice is >= the grid's (same budget, same rows), and how
often a staged choice lies off its stage-1 lattice (i.e. the refinement changed it).

    python bench/search_design_synth.py --budgets 12 20 --seeds 30 --shapes line most_2s most_3s
"""
from __future__ import annotations

import argparse
import hashlib
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

from bmmstream.search import SearchSpace, run_search
from bmmstream.search.design import DesignOptions, stage1_shape
from bmmstream.search.space import params_key

SIGMA = 0.15
GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def _lr(p: dict, g: str) -> float:
    return math.log10(p["blocks"][0]["rho"][g])


def _s(p: dict) -> float:
    return p["blocks"][0]["scale"]


# true skill a(p) of a point; log10 rho in [-4, 1], scale in [1.0, 1.3]. Each spans 3-5 points of
# accuracy over the space, as the real suites' searches did (their models scored within 2-4 points).
LANDSCAPES = {
    # the decoder's shape: best at low damping and scale 1, a mild slope (3 points over the range)
    "low_rho": lambda p: (0.70 - 0.0067 * sum(max(0.0, _lr(p, g) + 3.5) for g in GROUPS) / 4
                          - 0.02 * (_s(p) - 1.0) / 0.3),
    # the dec3 decoder suite's shape (2026-12-07): a peak between the default lattice's dampings
    # (full validation 77.2 at rho 2.8e-4, 76.3 at 1e-4, 73.8 at 8.1e-4, 70.3 at 0.0316; scale 1.3 far below)
    "low_peak": lambda p: (0.72 - 0.03 * sum(abs(_lr(p, g) + 3.5) for g in GROUPS) / 4
                           - 0.06 * (_s(p) - 1.0) / 0.3),
    # best at the top edges (scale 1.3, rho 10^0.5 and up)
    "edge": lambda p: (0.72 - 0.0005 * sum(min(0.0, _lr(p, g) - 0.5) ** 2 for g in GROUPS)
                       - 0.3 * (_s(p) - 1.3) ** 2),
    # an interior optimum (rho 1e-2, scale 1.15)
    "interior": lambda p: 0.72 - 0.001 * sum((_lr(p, g) + 2) ** 2 for g in GROUPS) - 0.5 * (_s(p) - 1.15) ** 2,
    # the groups want different dampings (attention 1e-3, MLP 1), scale 1.1
    "per_group": lambda p: (0.72 - 0.001 * ((_lr(p, "attn_in") + 3) ** 2 + (_lr(p, "attn_out") + 3) ** 2
                                              + _lr(p, "mlp_in") ** 2 + _lr(p, "mlp_out") ** 2)
                            - 0.5 * (_s(p) - 1.1) ** 2),
}


def true_acc(a: float) -> float:
    """Expected accuracy over fresh rows: P(u + n < a) = integral over u of Phi((a - u) / sigma)."""
    u = (np.arange(4000) + 0.5) / 4000
    return float(norm.cdf((a - u) / SIGMA).mean())


def unit(p: dict) -> np.ndarray:
    """A point's unit coordinates: log10 rho over [-4, 1] per group, scale over [1.0, 1.3]."""
    return np.array([(_lr(p, g) + 4) / 5 for g in GROUPS] + [(_s(p) - 1.0) / 0.3])


class Validation:
    """One seed's validation rows; scores a point on the first `n` of them (per-row results).

    length 0: each point's row noise is independent of every other point's (a harsh model: two
    points one small step apart disagree on as many rows as two far apart). length > 0: the noise of
    row i is sigma * f_i(x), f_i a random smooth function of the point's unit coordinates x (random
    Fourier features of an RBF kernel of that length), so nearby points share their errors, as
    nearby merges do on real rows (on the decoder suite, one group's damping moved by half the range
    changed 1-3 of 75 proxy rows)."""

    def __init__(self, skill, seed: int, rows: int, length: float = 0.0, features: int = 64):
        rng = np.random.default_rng(seed)
        self.skill, self.u = skill, rng.random(rows)
        self.seed, self.length = seed, length
        if length > 0:
            self.w = rng.normal(0.0, 1.0 / length, (features, 5))
            self.b = rng.uniform(0.0, 2 * math.pi, features)
            self.a = rng.normal(0.0, 1.0, (rows, features)) * math.sqrt(2.0 / features)

    def noise(self, p: dict) -> np.ndarray:
        if self.length > 0:
            return SIGMA * (self.a @ np.cos(self.w @ unit(p) + self.b))
        h = int.from_bytes(hashlib.sha256(f"{self.seed}|{params_key(p)}".encode()).digest()[:8], "little")
        return np.random.default_rng(h).normal(0.0, SIGMA, len(self.u))

    def scorer(self, n: int):
        def score(p: dict):
            rows = (self.u[:n] + self.noise(p)[:n] < self.skill(p)).astype(float)
            return float(rows.mean()), rows.tolist()
        return score


# other stage-1 shapes to compare with the default, by budget
SHAPES = {
    # the default's own (half the budget, the 2 scale edges), under a name, to vary its guard's z
    "half_2s": lambda b: stage1_shape(SearchSpace(1, scale_range=(1.0, 1.3)), b, DesignOptions()),
    "line": lambda b: (min(9, max(1, b - max(1, b // 4))), 1),  # the damping line at scale 1
    "most_2s": lambda b: (min(9, max(1, (b - max(2, b // 6)) // 2)), 2),  # most of the budget, 2 scales
    "most_3s": lambda b: (min(9, max(1, (b - max(2, b // 6)) // 3)), 3),  # most of the budget, 3 scales
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", type=int, default=[12, 20, 30])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--val", type=int, default=268, help="validation rows (the decoder suite's)")
    ap.add_argument("--proxy", type=int, default=75, help="proxy rows (25 per task there)")
    ap.add_argument("--landscapes", nargs="+", default=list(LANDSCAPES))
    ap.add_argument("--length", type=float, default=0.0,
                    help="correlation length of the row noise in unit coordinates (0: independent per point)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="stage-1 shapes beside the default")
    ap.add_argument("--noise-z", nargs="+", type=float, default=[2.0], help="the guard's z for each shape")
    args = ap.parse_args()
    space = SearchSpace(1, rho_range=(1e-4, 10.0), scale_range=(1.0, 1.3))
    t0 = time.perf_counter()
    print(f"validation {args.val} rows, proxy {args.proxy}, sigma {SIGMA}, noise length {args.length}, {args.seeds} seeds; "
          "true accuracy of the choice, mean over seeds [seeds >= grid]")
    for budget in args.budgets:
        rules = {"staged (default)": ("staged", None), "no line": ("staged", {"line": 0})}
        for shape in args.shapes:
            nd, ns = SHAPES[shape](budget)
            for z in args.noise_z:
                rules[f"{shape} {nd}x{ns} z{z:g}"] = ("staged", {"stage1": [nd, ns], "noise_z": z})
        rules |= {"grid": ("grid", None), "random": ("random", None)}
        for name in args.landscapes:
            skill = LANDSCAPES[name]
            res: dict[str, list[float]] = {r: [] for r in rules}
            refined = {r: 0 for r, (o, _) in rules.items() if o == "staged"}
            for seed in range(args.seeds):
                val = Validation(skill, 1000 + seed, args.val, args.length)
                with tempfile.TemporaryDirectory() as d:
                    for rule, (opt, design) in rules.items():
                        r = run_search(space, val.scorer(args.val), proxy_evaluate=val.scorer(args.proxy),
                                       optimizer=opt, budget=budget, seed=seed, full_top_k=3, design=design,
                                       run_dir=Path(d) / rule.replace(" ", "_"), write_report=False)
                        res[rule].append(true_acc(skill(r.best_params)))
                        if opt == "staged":  # did the refinement change the choice?
                            nd, ns = stage1_shape(space, budget, DesignOptions.from_config(design))
                            lattice = {params_key(q) for q in space.lattice(nd, ns)}
                            refined[rule] += params_key(r.best_params) not in lattice
            g = np.array(res["grid"])
            best = true_acc(max(skill(p) for p in space.lattice(50, 7)))  # a dense shared lattice
            cells = "  ".join(f"{r} {100 * np.mean(v):.2f} [{int(np.sum(np.array(v) >= g - 1e-12))}/{len(v)}]"
                              for r, v in res.items())
            print(f"budget {budget:3d} {name:9s} (dense shared best {100 * best:.2f}): {cells}", flush=True)
            print("    choice off the stage-1 lattice (the refinement's): "
                  + ", ".join(f"{r} {k}/{args.seeds}" for r, k in refined.items()), flush=True)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
