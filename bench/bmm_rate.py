"""Data-free BMM statistics + solve against this machine's measured matmul peak (issue 17).

Measures torch.mm GFLOP/s on large squares (float32 and float64, the same thread count), then runs
the data-free statistics (statistics/grams.py: SYRK + the cheaper association for C) and the
in-place Cholesky solve (solve/closed_form.py) on the modules of Llama-shaped layers (q, k, v, o,
gate, up, down; T task vectors each) in float32 (`statistics_dtype: compute`) and float64 (the
default), and prints counted FLOPs / stage wall as a fraction of the peak of the same dtype.
Peaks are measured before and after every stage and averaged (A B A B), so other work on a shared
machine weighs on both sides alike. The old statistics (two GEMMs per task: U^T U, then U G_t) run
beside them for the speedup.

Counted FLOPs are the work the chosen algorithm must do: SYRK d_out d_in^2, GEMM 2 m n k, Cholesky
d^3/3, the two triangular solves 2 d_out d_in^2, R = C - U0 G 2 d_out d_in^2 (a SYRK computes half
the product of a GEMM, so it is counted as half).
Acceptance: float32 statistics + solve >= 60% of the float32 matmul peak.

    python bench/bmm_rate.py [--threads 2] [--experts 4] [--layers 1024x2816,2048x5632]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bmmstream.solve.closed_form import bmm_solve, lam_from_rho  # noqa: E402
from bmmstream.statistics.grams import datafree_flops, datafree_stats  # noqa: E402


def peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Best-of-runs torch.mm FLOP/s on n x n squares."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def layer_shapes(hidden: int, inter: int) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of one Llama layer (4 query heads per key/value head)."""
    kv = hidden // 4
    return [("q", hidden, hidden), ("k", kv, hidden), ("v", kv, hidden), ("o", hidden, hidden),
            ("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)]


def old_stats(deltas: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics before issue 17: G_t = U^T U and C += U G_t as two GEMMs per task."""
    d_out, d_in = deltas.shape[1:]
    G = torch.zeros(d_in, d_in, dtype=dt)
    C = torch.zeros(d_out, d_in, dtype=dt)
    for U in deltas:
        U = U.to(dt)
        Gt = U.T @ U
        G += Gt
        C += U @ Gt
    return G, C


def solve_flops(d_out: int, d_in: int) -> float:
    return 2.0 * d_out * d_in**2 + d_in**3 / 3.0 + 2.0 * d_out * d_in**2


def run(shapes, T: int, sdt: torch.dtype, old: bool) -> dict:
    """Stage walls and counted FLOPs over the modules, each stage bracketed by peak measurements."""
    g = torch.Generator().manual_seed(0)
    res = {"stats_s": 0.0, "solve_s": 0.0, "old_s": 0.0, "stats_f": 0.0, "solve_f": 0.0, "old_f": 0.0, "peaks": []}
    res["peaks"].append(peak(sdt))
    for _, d_out, d_in in shapes:
        deltas = torch.randn(T, d_out, d_in, generator=g) * 1e-3  # compute dtype float32, as a merge holds them
        U0 = deltas.mean(0)
        t0 = time.perf_counter()
        G, C = datafree_stats(deltas, dtype=sdt)
        res["stats_s"] += time.perf_counter() - t0
        res["stats_f"] += datafree_flops(d_out, d_in, T)
        lam = lam_from_rho(G[None], 0.01)
        t0 = time.perf_counter()
        bmm_solve(G[None], C[None], U0[None], lam, dtype=sdt, overwrite=True)
        res["solve_s"] += time.perf_counter() - t0
        res["solve_f"] += solve_flops(d_out, d_in)
        del G, C
        if old:
            t0 = time.perf_counter()
            old_stats(deltas, sdt)
            res["old_s"] += time.perf_counter() - t0
            res["old_f"] += 4.0 * T * d_out * d_in**2
    res["peaks"].append(peak(sdt))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch (and BLAS) threads; default torch's")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--layers", default="1024x2816,2048x5632", help="hidden x intermediate of each Llama layer")
    ap.add_argument("--no-old", action="store_true", help="skip the two-GEMM statistics of before issue 17")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import numpy
    import scipy

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads, BLAS: "
          f"{'MKL' if torch.backends.mkl.is_available() else 'other'}), scipy {scipy.__version__}, "
          f"numpy {numpy.__version__}, {platform.machine()} {platform.processor()}, T={args.experts}")
    rows = []
    for spec in args.layers.split(","):
        hidden, inter = (int(x) for x in spec.split("x"))
        shapes = layer_shapes(hidden, inter)
        for sdt in (torch.float32, torch.float64):
            r = run(shapes, args.experts, sdt, not args.no_old)
            pk = sum(r["peaks"]) / len(r["peaks"])
            name = str(sdt).removeprefix("torch.")
            for stage, s, f in (("statistics", r["stats_s"], r["stats_f"]), ("solve", r["solve_s"], r["solve_f"]),
                                ("statistics+solve", r["stats_s"] + r["solve_s"], r["stats_f"] + r["solve_f"]),
                                ("old statistics (2 GEMMs)", r["old_s"], r["old_f"])):
                if s <= 0:
                    continue
                rows.append((spec, name, stage, f, s, f / s / 1e9, pk / 1e9))
            if r["old_s"] > 0:
                rows.append((spec, name, f"speedup of the statistics vs old: {r['old_s'] / r['stats_s']:.2f}x",
                             None, None, None, pk / 1e9))
    print(f"\n{'layer':>10} {'dtype':>8} {'stage':<26} {'GFLOP':>8} {'wall s':>8} {'GFLOP/s':>8} "
          f"{'peak':>7} {'of peak':>8}")
    verdict = []
    for spec, name, stage, f, s, rate, pk in rows:
        if f is None:
            print(f"{spec:>10} {name:>8} {stage}  (peak {pk:.1f} GFLOP/s)")
            continue
        print(f"{spec:>10} {name:>8} {stage:<26} {f / 1e9:8.1f} {s:8.2f} {rate:8.1f} {pk:7.1f} {rate / pk:8.0%}")
        if stage == "statistics+solve" and name == "float32":
            verdict.append((spec, rate / pk))
    for spec, frac in verdict:
        print(f"acceptance {spec} float32 statistics+solve: {frac:.0%} of the float32 matmul peak "
              f"({'PASS' if frac >= 0.6 else 'FAIL'} >= 60%)")


if __name__ == "__main__":
    main()
