"""float32 (the default compute dtype) vs a float64 dense reference on low-rank task vectors.

For task vectors of rank 1, 4 and 16 (LoRA-derived experts: U_t = B_t A_t) and rho 1e-2 .. 1e-6,
prints the max relative Frobenius error ||U - U_ref|| / ||U_ref|| of the merged task vector over
the modules (anchors task_arithmetic and TIES, so one anchor lies in the experts' span and one
does not), for
  merge  : methods/bmm.py's merge_unit on float32 inputs (statistics + batched Cholesky), and
  search : solve/spectral.py's re-solve from the same statistics (what a search trial writes),
each "before" (the direct forms (C + lam U0)(G + lam I)^-1 in float32 of commit ef248ce), "now"
(float64 statistics and solve, the default) and "f32 stats" (`statistics_dtype: compute`: the
residual form, but G, C and the solve in float32; the column that makes float64 the default).
The reference: G, C, U0 from float64 task vectors, torch.linalg.solve in float64 (dense_reference).
Then the time of one module's statistics + solve, now vs before (the float64 accumulation's price).

    nice -n 5 python bench/precision.py            # < 2 min on 2 CPU cores
"""
from __future__ import annotations

import time

import torch

from bmmstream.methods.registry import ModuleInput, get_method
from bmmstream.plan.layout import ModuleSpec
from bmmstream.solve.closed_form import dense_reference
from bmmstream.solve.spectral import eigen_factor, prepare, solve_eigen
from bmmstream.statistics.grams import datafree_stats

T, D_OUT, D_IN = 3, 192, 256
RANKS = (1, 4, 16)
RHOS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
ANCHORS = (("task_arithmetic", {"scale": 0.3}), ("ties", {"threshold": "per_tensor", "density": 0.2}))


def lora_deltas(rank: int, seed: int) -> torch.Tensor:
    """T task vectors of exact rank `rank` in float64 (rounded to float32 values, as a checkpoint holds)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(T, D_OUT, rank, generator=g, dtype=torch.float64)
    A = torch.randn(T, rank, D_IN, generator=g, dtype=torch.float64)
    return (1e-3 * B @ A / rank**0.5).float().double()


def module(deltas: torch.Tensor) -> ModuleInput:
    spec = ModuleSpec("m", (D_OUT, D_IN), "linear", "attn_in", 0, 0, 1)
    return ModuleInput(spec, torch.zeros(D_OUT, D_IN, dtype=deltas.dtype), deltas)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def legacy_merge(G: torch.Tensor, C: torch.Tensor, U0: torch.Tensor, lam: float) -> torch.Tensor:
    """ef248ce's bmm_solve: direct form in the statistics' dtype, damping on failure."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype)
    A = G + lam * eye
    L, info = torch.linalg.cholesky_ex(A)
    add = float(torch.diagonal(G).abs().mean()) * torch.finfo(G.dtype).eps * 16
    while int(info) != 0:
        L, info = torch.linalg.cholesky_ex(A + add * eye)
        add *= 10
    return torch.cholesky_solve((C + lam * U0).T, L).T


def legacy_search(G: torch.Tensor, C: torch.Tensor, U0: torch.Tensor, rho: float) -> torch.Tensor:
    """ef248ce's exact spectral re-solve: (CQ + lam U0Q) diag(1/(e+lam)) Q^T, all in float32."""
    e, Q = eigen_factor(G)
    return solve_eigen(C @ Q, U0 @ Q, e, Q, rho * e.mean())


def errors() -> dict:
    out = {}
    for rank in RANKS:
        cases = []
        for a, (anchor, ap) in enumerate(ANCHORS):
            d64 = lora_deltas(rank, seed=10 * rank + a)
            d32 = d64.float()
            cases.append((anchor, ap, d64, d32))
        for rho in RHOS:
            errs = {"merge before": 0.0, "merge now": 0.0, "f32 stats": 0.0, "search before": 0.0, "search now": 0.0}
            for anchor, ap, d64, d32 in cases:
                params = {"anchor": anchor, "anchor_parameters": ap, "rho": rho}
                # float64 dense reference, independent of the code under test
                U0_64 = get_method(anchor, ap).merge_unit([module(d64)])["m"]
                G64 = sum(u.T @ u for u in d64)
                C64 = sum(u @ u.T @ u for u in d64)
                ref = dense_reference(G64, C64, U0_64, rho * G64.trace() / D_IN)
                # now: the merge as methods/bmm.py runs it on float32 inputs, and the search's re-solve
                m = get_method("bmm", params)
                inp = module(d32)
                errs["merge now"] = max(errs["merge now"], rel(m.merge_unit([inp])["m"], ref))
                m32 = get_method("bmm", {**params, "statistics_dtype": "compute"})
                errs["f32 stats"] = max(errs["f32 stats"], rel(m32.merge_unit([inp])["m"], ref))
                st = m.module_statistics(inp)
                U0_32 = m.anchor.merge_unit([inp])["m"]
                sp = prepare(st["G"][None], st["C"][None], U0_32[None])
                errs["search now"] = max(errs["search now"], rel(sp.solve(sp.lam(rho))[0], ref))
                # before: float32 statistics, direct forms
                G32, C32 = datafree_stats(d32)
                lam32 = float(rho * G32.trace() / D_IN)
                errs["merge before"] = max(errs["merge before"], rel(legacy_merge(G32, C32, U0_32, lam32), ref))
                errs["search before"] = max(errs["search before"], rel(legacy_search(G32, C32, U0_32, rho), ref))
            out[(rank, rho)] = errs
    return out


def timing(d_out: int = 1024, d_in: int = 1024, reps: int = 5) -> tuple[float, float]:
    """Seconds for one module's statistics + solve: before (float32 throughout) and now."""
    g = torch.Generator().manual_seed(0)
    d = (1e-3 * torch.randn(T, d_out, d_in, generator=g)).float()
    spec = ModuleSpec("m", (d_out, d_in), "linear", "attn_in", 0, 0, 1)
    inp = ModuleInput(spec, torch.zeros(d_out, d_in), d)
    m = get_method("bmm", {"rho": 0.01})
    U0 = m.anchor.merge_unit([inp])["m"]

    def before():
        G, C = datafree_stats(d)
        return legacy_merge(G, C, U0, float(0.01 * G.trace() / d_in))

    def now():
        return m.merge_unit([inp])["m"]

    best = {"before": float("inf"), "now": float("inf")}
    for _ in range(reps):  # interleaved, best of reps: the machine is shared
        for name, fn in (("before", before), ("now", now)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best["before"], best["now"]


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    print(f"max relative error of the merged task vector vs float64 dense reference "
          f"(T={T}, {D_OUT}x{D_IN}, float32 inputs; anchors TA 0.3 and TIES per_tensor 0.2)")
    print(f"{'rank':>4} {'rho':>7} | {'merge before':>12} {'merge now':>10} {'f32 stats':>10} | "
          f"{'search before':>13} {'search now':>10}")
    for (rank, rho), e in errors().items():
        print(f"{rank:>4} {rho:>7.0e} | {e['merge before']:>12.2e} {e['merge now']:>10.2e} {e['f32 stats']:>10.2e} | "
              f"{e['search before']:>13.2e} {e['search now']:>10.2e}")
    tb, tn = timing()
    print(f"time, one 1024x1024 module, T={T}, statistics + solve: before {tb * 1e3:.0f} ms (float32), "
          f"now {tn * 1e3:.0f} ms; ratio now/before {tn / tb:.2f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
