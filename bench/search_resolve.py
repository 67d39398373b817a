"""Time per search trial: the eigenbasis re-solve (bmmstream.solve.spectral) vs a full Cholesky re-solve.

One trial re-solves every 2-D module of one transformer layer for a new lam:
  q, k, v, o: [4, h, h] (d_in = h), gate, up: [2, I, h] (d_in = h), down: [1, h, I] (d_in = I),
batched by shape as the pipeline does. Methods per trial:
  cholesky : G + lam I, torch.linalg.cholesky, torch.cholesky_solve of (C + lam U0)^T
  eigen    : (CQ + lam U0Q) diag(1/(e+lam)) Q^T        (eigh of G once, outside the trial)
  eigen_k  : U0 + A diag(1/(e_k+lam)) Q_k^T with k = d_in * rank_frac (truncated; error reported)
Statistics are synthetic data-free ones (G = sum_t U_t^T U_t, C = sum_t U_t U_t^T U_t over T random
task vectors), so the truncation error printed is for a flat random spectrum. `--real-base` with
`--real-experts` measures the truncation error instead on real task vectors (every 2-D linear weight
of the checkpoints; anchor U0 = 0.3 * sum_t U_t, i.e. task arithmetic), per fraction k / d_in.

    nice -n 10 python bench/search_resolve.py --hidden 512 2048
    nice -n 10 python bench/search_resolve.py --hidden --real-base BASE --real-experts E1 E2 E3
"""
from __future__ import annotations

import argparse
import time

import torch

from bmmstream.solve.spectral import prepare, solve_dense, truncation_errors


def layer_stats(h: int, inter: int, T: int, dtype, device, seed: int = 0):
    """[(name, G, C, U0)] for one layer's module batches, data-free statistics from T task vectors."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for name, n, d_out, d_in in (("qkvo", 4, h, h), ("gate_up", 2, inter, h), ("down", 1, h, inter)):
        G = torch.zeros(n, d_in, d_in, dtype=dtype, device=device)
        C = torch.zeros(n, d_out, d_in, dtype=dtype, device=device)
        U0 = torch.zeros(n, d_out, d_in, dtype=dtype, device=device)
        for _ in range(T):
            U = (torch.randn(n, d_out, d_in, generator=g) / d_in**0.5).to(dtype=dtype, device=device)
            Gt = U.transpose(-1, -2) @ U
            G += Gt
            C += U @ Gt
            U0 += 0.3 * U
        out.append((name, G, C, U0))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps, device):
    """(median seconds of `reps` calls, the last output); no separate warm-up: big sizes cost minutes."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def bench_size(h: int, args, device, dtype):
    inter = int(round(args.inter_ratio * h / 128)) * 128
    mods = layer_stats(h, inter, args.T, dtype, device)
    rho = 0.01
    t0 = time.perf_counter()
    exact = [prepare(G, C, U0) for _, G, C, U0 in mods]
    _sync(device)
    t_prep = time.perf_counter() - t0
    ks = [max(1, int(G.shape[-1] * args.rank_frac)) for _, G, _, _ in mods]
    trunc = [prepare(G, C, U0, k=k) for (_, G, C, U0), k in zip(mods, ks)]
    lams = [st.lam(rho) for st in exact]

    def chol_trial():
        return [solve_dense(G, C, U0, lam) for (_, G, C, U0), lam in zip(mods, lams)]

    def eigen_trial():
        return [st.solve(lam) for st, lam in zip(exact, lams)]

    def trunc_trial():
        return [st.solve(lam) for st, lam in zip(trunc, lams)]

    t_chol, ref = timed(chol_trial, args.reps, device)
    t_eig, eig = timed(eigen_trial, args.reps, device)
    t_trunc, tr = timed(trunc_trial, args.reps, device)
    # agreement of the exact eigen re-solve with Cholesky, and the truncation error (worst batch)
    eig_err = max(float((a - b).norm() / b.norm()) for a, b in zip(eig, ref))
    trunc_err = max(float((a - b).norm() / b.norm()) for a, b in zip(tr, ref))
    return {
        "hidden": h, "inter": inter, "modules": sum(G.shape[0] for _, G, _, _ in mods),
        "prep_s": t_prep, "chol_s": t_chol, "eigen_s": t_eig, "trunc_s": t_trunc,
        "eig_err": eig_err, "trunc_err": trunc_err, "rank_frac": args.rank_frac,
    }


def real_truncation(args):
    """Relative error of the rank-k re-solve on real data-free statistics, per k / d_in."""
    from safetensors import safe_open

    base = safe_open(f"{args.real_base}/model.safetensors", "pt")
    experts = [safe_open(f"{e}/model.safetensors", "pt") for e in args.real_experts]
    names = [n for n in base.keys() if n.endswith(".weight") and len(base.get_slice(n).get_shape()) == 2
             and "embed" not in n]
    fracs = args.real_fracs
    errs: dict[tuple[float, float], list[float]] = {(f, r): [] for f in fracs for r in args.real_rhos}
    for n in names:
        W = base.get_tensor(n).double()
        U = torch.stack([e.get_tensor(n).double() - W for e in experts])
        if not U.abs().max() > 0:
            continue
        G = (U.transpose(-1, -2) @ U).sum(0)
        C = (U @ (U.transpose(-1, -2) @ U)).sum(0)
        U0 = 0.3 * U.sum(0)
        d_in, mean_e = G.shape[-1], float(G.diagonal().mean())
        ks = [max(1, int(f * d_in)) for f in fracs]
        table = truncation_errors(G, C, U0, ks, [r * mean_e for r in args.real_rhos])
        for i, r in enumerate(args.real_rhos):
            for j, f in enumerate(fracs):
                errs[(f, r)].append(float(table[i, j]))
    print(f"# rank-k truncation error on real task vectors: {len(names)} modules, T={len(experts)}, "
          f"U0 = 0.3 * sum U_t; relative Frobenius error of U(lam) vs the exact solve")
    print("| k / d_in | rho | median error | max error |")
    print("|---|---|---|---|")
    for r in args.real_rhos:
        for f in fracs:
            e = sorted(errs[(f, r)])
            print(f"| {f} | {r:g} | {e[len(e) // 2]:.2e} | {e[-1]:.2e} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--inter-ratio", type=float, default=2.75,
                    help="MLP width = ratio * h rounded to 128 (2.75: 2048 -> 5632 as TinyLlama)")
    ap.add_argument("--T", type=int, default=2, help="experts in the synthetic statistics")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rank-frac", type=float, default=0.25)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--real-base", default=None, help="folder with the base model.safetensors")
    ap.add_argument("--real-experts", nargs="*", default=[], help="expert folders (model.safetensors)")
    ap.add_argument("--real-fracs", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--real-rhos", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    if args.real_base:
        real_truncation(args)
    if not args.hidden:
        return
    print(f"# search re-solve, one layer per trial, {args.dtype} on {dev_name}, T={args.T}, rho=0.01, "
          f"median of {args.reps}")
    print("| hidden | inter | modules | eigh once (s) | Cholesky trial (s) | eigen trial (s) | speed-up "
          f"| eigen_k trial (s), k=d_in*{args.rank_frac} | speed-up | eigen vs Cholesky rel. diff "
          "| eigen_k rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for h in args.hidden:
        r = bench_size(h, args, device, dtype)
        print(f"| {r['hidden']} | {r['inter']} | {r['modules']} | {r['prep_s']:.3f} | {r['chol_s']:.4f} "
              f"| {r['eigen_s']:.4f} | {r['chol_s'] / r['eigen_s']:.2f}x | {r['trunc_s']:.4f} "
              f"| {r['chol_s'] / r['trunc_s']:.2f}x | {r['eig_err']:.1e} | {r['trunc_err']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
