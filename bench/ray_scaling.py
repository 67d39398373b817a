"""Wall time of a BMM merge on 1 vs 2 Ray workers, per-unit timings, and a projection to 8 GPUs at 70B.

The merge is chosen so that BMM's data-free statistics (G = sum_t U_t^T U_t, C = sum_t U_t G_t, float64)
dominate: a synthetic Llama with wide layers and a tiny vocabulary. Steps:
1. per-unit compute time, single process, via the pipeline's own `_merge_unit` (reads + statistics +
   solve + anchor, no writing);
2. wall time of the whole merge: local (this process), `--executor ray` with 1 and with 2 workers on
   one local Ray with 2 CPU slots (started once; its start-up is timed apart); the three outputs are
   compared file by file (they must be byte-identical).
Everything runs with `--threads` torch threads (default 1): Ray workers use the driver's thread count
(float reductions round by it), and 2 workers x 1 thread is what 2 cores hold without oversubscription;
3. a projection to 8 GPUs for a 70B Llama (80 layers, hidden 8192, intermediate 28672, 64 heads, 8 KV
   heads) from the FLOP count of each unit and a sustained GPU rate (the stated assumptions are printed).

`--mode search` (or `both`): `bmm search` with `--budget` seeded random trials on the same suite,
in this process and with `--executor ray` on 1 and 2 workers (each an actor with its own resident
model, trials in flight = workers). Timed: the trial phase alone (run_search: ask, evaluate, tell;
the statistics pass and the actors' start-up are timed apart), as trials/s; each trial streams every
module's factors from the store, re-solves, writes the model and scores it with a forward pass over
`--score-tokens` random tokens. The three searches' trials (as sets) and best points must be equal.

    nice -n 5 python bench/ray_scaling.py [--hidden 512 --intermediate 1536 --layers 8 --experts 4]
    nice -n 5 python bench/ray_scaling.py --mode search [--budget 16 --score-tokens 2048]
"""
from __future__ import annotations

import argparse
import filecmp
import math
import os
import shutil
import tempfile
import time
from pathlib import Path


def linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> list[tuple[int, int]]:
    """(d_out, d_in) of one Llama layer's seven linears."""
    kv = hidden // heads * kv_heads
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
            (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]


def layer_flops(shapes: list[tuple[int, int]], experts: int) -> float:
    """Data-free BMM per layer: per task G_t (2 d_out d_in^2) and U_t G_t (2 d_out d_in^2); one solve
    per module (Cholesky d_in^3 / 3 and 2 d_out d_in^2 for the right-hand sides)."""
    return sum(experts * 4 * o * i * i + i ** 3 / 3 + 2 * o * i * i for o, i in shapes)


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the driver and of each worker")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--gpu-tflops", type=float, default=30.0,
                    help="sustained float64 GEMM rate of one GPU for the projection (H100/H200: 67 peak)")
    ap.add_argument("--write-gbps", type=float, default=1.0, help="driver's write bandwidth, GB/s")
    ap.add_argument("--read-gbps", type=float, default=2.0, help="each worker's read bandwidth, GB/s")
    ap.add_argument("--mode", choices=["merge", "search", "both"], default="merge")
    ap.add_argument("--budget", type=int, default=16, help="search mode: random trials per search")
    ap.add_argument("--score-tokens", type=int, default=2048, help="search mode: tokens in the scorer's forward")
    args = ap.parse_args()

    import ray
    import torch

    from bmmstream.api import merge
    from bmmstream.demo import make_llama_suite
    from bmmstream.pipeline import _merge_unit, prepare

    work = args.dir or Path(tempfile.mkdtemp(prefix="ray_scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    suite = make_llama_suite(work / "suite", num_experts=args.experts, hidden=args.hidden,
                             intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                             kv_heads=args.kv_heads, vocab=256)
    cfg = {"base_model": str(suite.base), "models": [{"model": str(e)} for e in suite.experts],
           "merge_method": "bmm", "parameters": {"anchor": "task_arithmetic", "rho": 0.01},
           "shard_size": "8MB"}
    torch.set_num_threads(args.threads)
    if args.mode == "search":
        search_bench(args, work, suite)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
        return
    print(f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()} (driver and each worker), torch {torch.__version__}, ray {ray.__version__}")
    print(f"suite: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"T = {args.experts} experts, float32 weights, float64 statistics")

    # 1. per-unit compute
    job = prepare(cfg, out=work / "units-out", run_dir=work / "units-run", device="cpu")
    shapes = linear_shapes(args.hidden, args.intermediate, args.heads, args.kv_heads)
    unit_s = []
    print("\nper-unit compute                 tensors   seconds   GFLOP   GFLOP/s")
    for i, names in enumerate(job.plan.units):
        t0 = time.perf_counter()
        _merge_unit(job, names, None)
        dt = time.perf_counter() - t0
        layer = any(".layers." in n for n in names)
        gf = layer_flops(shapes, args.experts) / 1e9 if layer else float("nan")
        unit_s.append((layer, dt))
        label = names[0].rsplit(".", 1)[0] if layer else ("embeddings" if i == 0 else "final")
        print(f"  unit {i:2d} {label[:22]:22s} {len(names):7d} {dt:9.2f} {gf:7.2f} {gf / dt:9.2f}")
    job.sources.close()
    layer_times = [t for is_layer, t in unit_s if is_layer]
    rest = sum(t for is_layer, t in unit_s if not is_layer)
    t_layer = sum(layer_times) / len(layer_times)
    rate = layer_flops(shapes, args.experts) / t_layer  # FLOP/s of one CPU thread on this work

    # 2. wall times
    walls = {}
    t0 = time.perf_counter()
    merge(cfg, out=work / "local", run_dir=work / "run-local", device="cpu", progress=False, threads=args.threads)
    walls["local"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_start = time.perf_counter() - t0
    for w in (1, 2):
        t0 = time.perf_counter()
        merge(cfg, out=work / f"ray{w}", run_dir=work / f"run-ray{w}", device="cpu", progress=False,
              threads=args.threads, executor="ray", workers=w)
        walls[f"ray {w} worker{'s' if w > 1 else ''}"] = time.perf_counter() - t0
    ray.shutdown()
    load = os.getloadavg()[0]
    same = all(same_files(work / "local", work / f"ray{w}") for w in (1, 2))
    print(f"\nwall time of the whole merge (Ray start-up {ray_start:.1f} s, not included; includes each run's "
          f"worker start-up; load average {load:.1f} on {os.cpu_count()} cpus):")
    for k, v in walls.items():
        print(f"  {k:16s} {v:7.1f} s")
    speedup = walls["ray 1 worker"] / walls["ray 2 workers"]
    print(f"  speedup 1 -> 2 workers: {speedup:.2f}x (ideal {min(2, args.layers):d}x); "
          f"outputs byte-identical to the local run: {same}")

    # 3. projection: 70B, 8 GPUs
    L, H, I, T = 80, 8192, 28672, args.experts
    shapes70 = linear_shapes(H, I, 64, 8)
    f70 = layer_flops(shapes70, T)
    g_layer = f70 / (args.gpu_tflops * 1e12)
    params_layer = sum(o * i for o, i in shapes70) + 2 * H
    read_layer = (T + 1) * params_layer * 2 / (args.read_gbps * 1e9)  # bf16 base + experts
    out_bytes = (L * params_layer + 2 * 128256 * H) * 2
    write_s = out_bytes / (args.write_gbps * 1e9)
    w8 = math.ceil(L / 8) * max(g_layer, read_layer)
    w1 = L * max(g_layer, read_layer)
    print(f"\nprojection, Llama-70B ({L} layers, hidden {H}, intermediate {I}, 8 KV heads), T = {T} experts:")
    print(f"  data-free BMM FLOP per layer {f70 / 1e12:.1f} TFLOP ({f70 / layer_flops(shapes, T):.0f}x this "
          f"bench's layer, measured {t_layer:.2f} s at {rate / 1e9:.1f} GFLOP/s per worker here)")
    print(f"  per layer on one GPU at {args.gpu_tflops:g} TFLOP/s float64: {g_layer:.1f} s compute; reading its "
          f"base + {T} experts (bf16) at {args.read_gbps:g} GB/s: {read_layer:.1f} s")
    print(f"  1 GPU : {L} x {max(g_layer, read_layer):.1f} s = {w1 / 60:.1f} min "
          f"(+ writing {out_bytes / 1e9:.0f} GB at {args.write_gbps:g} GB/s, overlapped: {write_s / 60:.1f} min)")
    print(f"  8 GPUs: ceil({L}/8) x {max(g_layer, read_layer):.1f} s = {w8 / 60:.1f} min, bounded below by the "
          f"driver's single writer ({write_s / 60:.1f} min): {max(w8, write_s) / 60:.1f} min, "
          f"{w1 / max(w8, write_s):.1f}x")
    print(f"  on this machine's workers instead: one layer {f70 / rate / 3600:.1f} h, {L} layers "
          f"{L * f70 / rate / 3600:.0f} h on 1 worker, {math.ceil(L / 8) * f70 / rate / 3600:.0f} h on 8")
    print("  assumptions: units are independent (data-free statistics; no prepass), round-robin layers over "
          "8 workers with equal layer cost, each worker reads only its own layers, the driver writes in unit "
          "order while workers compute (2 x workers units in flight), embeddings/final norm negligible, "
          "the 1 -> 2 scaling measured above carries over when workers do not share cores")
    if args.mode == "both":
        search_bench(args, work, suite)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


SCORER = """
import torch

def score(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, {tokens}), generator=g)
    return -float(model(input_ids=ids, labels=ids).loss)
"""


def search_bench(args, work: Path, suite) -> None:
    """Trials/s of `bmm search` in this process and on 1 and 2 Ray workers (see the docstring)."""
    import json
    import sys

    import ray
    import torch

    import nevergrad  # noqa: F401  (imported before the first timed search, not inside it)

    import bmmstream.search as search_pkg
    from bmmstream.api import search_merge

    (work / "bench_scorer").mkdir(exist_ok=True)
    (work / "bench_scorer" / "ray_bench_scorer.py").write_text(SCORER.format(tokens=args.score_tokens))
    sys.path.insert(0, str(work / "bench_scorer"))
    cfg = {"base_model": str(suite.base), "models": [{"model": str(e)} for e in suite.experts],
           "merge_method": "bmm", "parameters": {"anchor": "task_arithmetic", "rho": 0.01, "blocks": 2},
           "search": {"optimizer": "random", "budget": args.budget, "seed": 0, "rho_range": [1e-3, 1.0],
                      "scale_range": [0.8, 1.3], "scorer": {"callable": "ray_bench_scorer:score"},
                      "full_top_k": 0}}
    phase: dict[str, float] = {}
    real = search_pkg.run_search  # search_merge looks it up here at each call

    def timed(*a, **k):  # the trial phase only
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            phase["trials"] = time.perf_counter() - t0

    search_pkg.run_search = timed
    print(f"\nsearch: {args.budget} seeded random trials, scorer: LM loss over {args.score_tokens} tokens; "
          f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    print(f"  Ray start-up {time.perf_counter() - t0:.1f} s (not included)")
    results = {}
    for label, kw in (("local", {}), ("ray 1 worker", {"executor": "ray", "workers": 1}),
                      ("ray 2 workers", {"executor": "ray", "workers": 2})):
        run = work / f"search-{label.replace(' ', '-')}"
        t0 = time.perf_counter()
        res = search_merge(cfg, run_dir=run, device="cpu", progress=False, threads=args.threads, **kw)
        wall = time.perf_counter() - t0
        (h,) = list((run / "search").glob("*/history.jsonl"))
        trials = sorted(json.dumps([t["params"], t["score"]], sort_keys=True)
                        for t in map(json.loads, h.read_text().splitlines()))
        costs = json.loads((run / "search-report" / "trial_costs.json").read_text())["mean"]
        results[label] = (trials, res["best_params"])
        print(f"  {label:14s} trial phase {phase['trials']:7.1f} s = {args.budget / phase['trials']:6.2f} trials/s "
              f"(whole command {wall:6.1f} s); per evaluation: stream {costs['stream_s']:.3f} s, re-solve "
              f"{costs['resolve_s']:.3f} s, assemble {costs['assemble_s']:.3f} s, score {costs['score_s']:.3f} s")
    ray.shutdown()
    same = all(v == results["local"] for v in results.values())
    print(f"  trials (as sets) and best point equal across the three: {same}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
