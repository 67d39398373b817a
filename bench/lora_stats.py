"""BMM's data-free statistics pass on LoRA experts: low-rank factors vs the densified task vectors.

Llama-3.2-1B layer shapes (hidden 2048, intermediate 8192, 32/8 heads of 64), rank 16, T = 3
adapters with random factors; per module BMM.module_statistics (float64, the default) once with
the factors (G_t = A^T (B^T B) A, C_t = B [(A A^T)(B^T B)] A: O(r d_in^2 + r d_out d_in) per task)
and once on the dense U_t = s B A (U_t^T U_t and U_t G_t: O(d_out d_in^2)), as the pipeline would
call it. Prints the time of each path per module, their total ratio (acceptance: >= 10x) and the
relative difference of G and C (float64: ~1e-15). Densifying U_t = s B A is not counted against
the dense path (the pipeline does it for every method anyway).

    nice -n 5 python bench/lora_stats.py            # ~1 min on 2 CPU cores
    nice -n 5 python bench/lora_stats.py --with-down  # adds down_proj (d_in 8192: dense ~4x longer)
"""
from __future__ import annotations

import argparse
import time

import torch

from bmmstream.methods.registry import ModuleInput, get_method
from bmmstream.plan.layout import ModuleSpec

HIDDEN, INTER, KV = 2048, 8192, 512
MODULES = {  # name: (d_out, d_in, group)
    "q_proj": (HIDDEN, HIDDEN, "attn_in"),
    "k_proj": (KV, HIDDEN, "attn_in"),
    "v_proj": (KV, HIDDEN, "attn_in"),
    "o_proj": (HIDDEN, HIDDEN, "attn_out"),
    "gate_proj": (INTER, HIDDEN, "mlp_in"),
    "up_proj": (INTER, HIDDEN, "mlp_in"),
}
DOWN = {"down_proj": (HIDDEN, INTER, "mlp_out")}


def timed(fn, repeats: int) -> tuple[float, dict]:
    """Best of `repeats` wall times (the machine is shared: the minimum is the least disturbed run)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--with-down", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs of each path")
    args = ap.parse_args()
    bmm = get_method("bmm", {})
    modules = {**MODULES, **(DOWN if args.with_down else {})}
    g = torch.Generator().manual_seed(0)
    scaling = 32 / args.rank  # lora_alpha 32
    total_low = total_dense = 0.0
    print(f"torch threads {torch.get_num_threads()}, rank {args.rank}, T = {args.tasks}, float32 factors and deltas, "
          f"float64 statistics, best of {args.repeats}")
    print(f"{'module':10s} {'shape':>12s} {'low-rank s':>11s} {'dense s':>9s} {'ratio':>7s} {'rel G':>9s} {'rel C':>9s}")
    for name, (d_out, d_in, group) in modules.items():
        factors = [(scaling * 0.01 * torch.randn(d_out, args.rank, generator=g),
                    0.01 * torch.randn(args.rank, d_in, generator=g)) for _ in range(args.tasks)]
        deltas = torch.stack([B @ A for B, A in factors])  # what the pipeline densifies (float32)
        spec = ModuleSpec(f"model.layers.0.{name}.weight", (d_out, d_in), "linear", group, 0, 0, 1)
        base = torch.zeros(d_out, d_in)
        t_low, low = timed(lambda: bmm.module_statistics(ModuleInput(spec, base, deltas, factors=factors)), args.repeats)
        t_dense, dense = timed(lambda: bmm.module_statistics(ModuleInput(spec, base, deltas)), args.repeats)
        rel = {k: float((low[k] - dense[k]).norm() / dense[k].norm()) for k in ("G", "C")}
        total_low += t_low
        total_dense += t_dense
        print(f"{name:10s} {f'{d_out}x{d_in}':>12s} {t_low:11.3f} {t_dense:9.2f} {t_dense / t_low:7.1f} "
              f"{rel['G']:9.1e} {rel['C']:9.1e}")
        del deltas, low, dense
    print(f"{'total':10s} {'':>12s} {total_low:11.3f} {total_dense:9.2f} {total_dense / total_low:7.1f}")
    print(f"statistics pass: low-rank {total_dense / total_low:.1f}x faster than densified (acceptance >= 10x)")


if __name__ == "__main__":
    main()
