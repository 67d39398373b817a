"""Out-of-core `bmm search` (issue 12): memory, equality with the in-core search, factor storage
options, and `bmm plan`'s search estimates against measurements.

  depth    peak RSS of a search at 4 vs 16 layers (generated Llama suites, hidden 512, intermediate
           1536, T = 3, a trivial callable scorer), out of core and in core; growth vs one model copy
           (acceptance: <= 1.5x); the plan's store size, peak memory and time per trial vs measured
  equal    out-of-core vs in-core search (float64, same seed): chosen parameters, scores, written model
  storage  factor storage options (float32 / bfloat16 Q and A; rank-k by an energy target) vs the exact
           float64 re-solve, on the suites' low-rank + noise task vectors, over rho
  big      a 1B-class suite (16 layers, hidden 2048): the search's peak RSS and time per trial vs the plan
  est8b    the plan's search estimates at Llama-3.1-8B shapes (store size, device memory, time per trial)

Each search runs in a fresh subprocess that reports its own peak RSS (ru_maxrss).

    nice -n 10 python bench/search_memory.py depth equal storage
    nice -n 10 python bench/search_memory.py big --no-write
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "out" / "search_memory"
MiB = 2**20

SCORER = "def score(model):\n    return -float(next(iter(model.parameters())).double().norm())\n"

CHILD = r"""
import json, resource, sys, time
import bmmstream, bmmstream.pipeline, bmmstream.methods, torch, safetensors, zarr, nevergrad, transformers
import bmmstream.search.run as run
from bmmstream.statistics.store import factor_key
bmmstream.methods.method_names()
base_kib = int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1])
cfg, out, run_dir, write = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
sys.path.insert(0, sys.argv[5])
seen = {}
orig = run.StreamedTrials.apply
def apply(self, point):
    if "store" not in seen:  # the store holds G, C and every factor before the first trial
        p = self.store.path
        seen["store"] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        seen["factor_bytes"] = sum(self.store.nbytes(factor_key(m.name)) for u in self.units for m in u)
        seen["stats_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return orig(self, point)
run.StreamedTrials.apply = apply
if not write:  # stop after the trials: the final streamed write is the ordinary merge
    import bmmstream.pipeline as pl
    pl.execute = lambda job, progress=True: job.out
t0 = time.perf_counter()
res = run.search_merge(cfg, out=out, run_dir=run_dir, device="cpu", progress=False)
costs = json.loads((res["report_dir"] / "trial_costs.json").read_text())
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_kib": base_kib,
                  "seconds": time.perf_counter() - t0, "best_params": res["best_params"],
                  "best_score": res["best_score"], "costs": {k: v for k, v in costs.items() if k != "trials"},
                  **seen}))
"""


def suite(layers: int, hidden: int, intermediate: int, experts: int, dtype: str = "float32"):
    from bmmstream.demo import make_llama_suite

    heads = max(8, hidden // 128)
    return make_llama_suite(WORK / f"L{layers}_h{hidden}" / "suite", num_experts=experts, hidden=hidden,
                            intermediate=intermediate, layers=layers, heads=heads, kv_heads=max(4, heads // 4),
                            vocab=2048, rank=8, dtype=dtype)


def config(s, dtype: str = "float32", budget: int = 6, **search) -> dict:
    sc = {"optimizer": "random", "budget": budget, "seed": 0, "rho_range": [1e-3, 1.0], "scale_range": [0.8, 1.2],
          "scorer": {"callable": "bm_scorer:score"}, "full_top_k": 0, "keep_base": "false"}
    sc.update(search)
    return {"base_model": str(s.base), "models": [{"model": str(e)} for e in s.experts], "merge_method": "bmm",
            "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "rho": 0.01, "blocks": 2},
            "dtype": dtype, "out_dtype": "bfloat16", "shard_size": "2GB", "search": sc}


def run_child(cfg: dict, tag: str, write: bool = True) -> dict:
    d = WORK / "runs" / tag
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "bm_scorer.py").write_text(SCORER)
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(d / "out"), str(d / "run"),
                        "1" if write else "0", str(d)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{tag}: child failed\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["dir"] = str(d)
    return res


def model_bytes(s, nbytes: int) -> int:
    from bmmstream.sources.local import LocalSource

    src = LocalSource(s.base)
    try:
        return sum(i.numel for i in src.tensor_infos().values()) * nbytes
    finally:
        src.close()


def plan(cfg: dict) -> dict:
    from bmmstream.search.run import plan_search

    return plan_search(cfg, device="cpu")["search"]


def per_trial(res: dict) -> float:
    return sum(res["costs"]["mean"].values())


def check_plan(tag: str, est: dict, res: dict) -> None:
    peak = res["peak_rss_kib"] * 1024
    print(f"  plan vs measured ({tag}): store {est['stats_disk_bytes'] / MiB:8.1f} / {res['store'] / MiB:8.1f} MiB"
          f" ({est['stats_disk_bytes'] / res['store']:.2f}x); peak host {est['peak_host_bytes'] / MiB:8.1f} / "
          f"{peak / MiB:8.1f} MiB ({est['peak_host_bytes'] / peak:.2f}x); per trial "
          f"{est['trial_seconds_total']:.3f} / {per_trial(res):.3f} s ({est['trial_seconds_total'] / per_trial(res):.2f}x)")
    split = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in res["costs"]["mean"].items())
    est_split = ", ".join(f"{k} {v:.3f}" for k, v in est["trial_seconds"].items())
    print(f"  per-trial split measured (s): {split};  plan: {est_split}")


def depth(args) -> None:
    rows = {}
    for layers in (4, 16):
        s = suite(layers, 512, 1536, 3)
        cfg = config(s)
        mb = model_bytes(s, 4)
        est = plan(cfg)
        ooc = run_child(cfg, f"depth-L{layers}-ooc", write=False)
        inc = None if args.no_in_core else run_child(config(s, in_core=True), f"depth-L{layers}-inc", write=False)
        rows[layers] = (mb, ooc, inc)
        for name, r in (("out of core", ooc), ("in core", inc)):
            if r is None:
                continue
            print(f"layers={layers:2d} {name:11s} peak RSS {r['peak_rss_kib'] / 1024:7.1f} MiB (after imports "
                  f"{r['base_kib'] / 1024:6.1f}); model copy {mb / MiB:6.1f} MiB; per trial {per_trial(r):.3f} s"
                  + (f"; statistics pass peak {r['stats_rss_kib'] / 1024:.1f} MiB; peak factors held "
                     f"{r['costs']['peak_factor_bytes'] / MiB:.1f} MiB of {r['factor_bytes'] / MiB:.1f} MiB stored"
                     if "peak_factor_bytes" in r["costs"] else ""),
                  flush=True)
        check_plan(f"L{layers}", est, ooc)
    (m4, o4, i4), (m16, o16, i16) = rows[4], rows[16]
    growth = (m16 - m4) / 1024
    for name, a, b in (("out of core", o4, o16), ("in core", i4, i16)):
        if a is None:
            continue
        g = (b["peak_rss_kib"] - a["peak_rss_kib"]) / growth
        verdict = f"({'PASS' if g <= 1.5 else 'FAIL'} <= 1.5)" if name == "out of core" else ""
        print(f"{name:11s}: peak RSS growth 4 -> 16 layers = {g:.2f} x one model copy's growth "
              f"({(b['peak_rss_kib'] - a['peak_rss_kib']) / 1024:.1f} MiB vs {growth / 1024:.1f} MiB) {verdict}", flush=True)


def equal(args) -> None:
    import torch
    from safetensors.torch import load_file

    s = suite(4, 512, 1536, 3)
    cfg = config(s, dtype="float64", budget=6, optimizer="NGOpt")
    cfg["out_dtype"] = "float64"
    a = run_child(cfg, "equal-ooc")
    b = run_child(config(s, dtype="float64", budget=6, optimizer="NGOpt", in_core=True) | {"out_dtype": "float64"},
                  "equal-inc")
    diff = 0.0
    for f in sorted(Path(a["dir"], "out").glob("*.safetensors")):
        x, y = load_file(f), load_file(Path(b["dir"], "out", f.name))
        assert x.keys() == y.keys()
        diff = max([diff] + [float((x[k] - y[k]).abs().max()) for k in x])
    same = a["best_params"] == b["best_params"]
    print(f"equal (float64, NGOpt, seed 0, 6 trials): same chosen parameters: {same}; best score "
          f"{a['best_score']:.12g} vs {b['best_score']:.12g}; written model max |diff| {diff:.3g} "
          f"({'PASS' if same and diff <= 1e-6 else 'FAIL'} <= 1e-6)", flush=True)


def storage(args) -> None:
    """Error of each storage option vs the exact float64 re-solve, per module of layer 0 and 3."""
    import torch

    from bmmstream.search.run import FactorOptions, module_factors
    from bmmstream.solve.spectral import solve_eigen_truncated
    from bmmstream.sources.local import LocalSource

    s = suite(4, 512, 1536, 3)
    base, experts = LocalSource(s.base), [LocalSource(e) for e in s.experts]
    options = [("float64 (exact)", FactorOptions(dtype="compute")), ("float32", FactorOptions(dtype="float32")),
               ("bfloat16", FactorOptions(dtype="bfloat16"))] + \
              [(f"energy {x}", FactorOptions(dtype="float32", energy=x)) for x in (0.9999, 0.999, 0.99)]
    rhos = (1e-3, 1e-2, 1e-1, 1.0)
    worst = {n: 0.0 for n, _ in options}
    sizes = {n: 0 for n, _ in options}
    exact_bytes = 0
    names = [n for n in base.tensor_infos() if n.endswith("proj.weight") and (".0." in n or ".3." in n)]
    for n in sorted(names):
        W = base.get(n).double()
        U = torch.stack([e.get(n).double() - W for e in experts])
        G = torch.einsum("toi,toj->ij", U, U)
        C = sum(u @ (u.T @ u) for u in U)
        U0 = 0.3 * U.sum(0)
        tr = float(G.diagonal().mean())
        ref = {}
        for rho in rhos:
            L = torch.linalg.cholesky(G + rho * tr * torch.eye(G.shape[0], dtype=G.dtype))
            ref[rho] = torch.cholesky_solve((C + rho * tr * U0).T, L).T
        cells = []
        for name, opt in options:
            f, attrs = module_factors(G, C, U0, opt)
            nb = sum(t.numel() * t.element_size() for t in f.values())
            sizes[name] += nb
            errs = []
            for rho in rhos:
                Uk = solve_eigen_truncated(U0, f["A"].double(), f["e"], f["Q"].double(), rho * tr)
                errs.append(float((Uk - ref[rho]).norm() / ref[rho].norm()))
            worst[name] = max(worst[name], max(errs))
            cells.append(f"{name}: k={attrs['k']} err<={max(errs):.1e}")
        print(f"{n.replace('model.layers.', 'L'):28s} " + "; ".join(cells[1:]), flush=True)
    exact_bytes = sizes["float64 (exact)"]
    print("storage option summary (max relative error of U over modules and rho in "
          f"{list(rhos)}; stored bytes vs float64 exact):")
    for name, _ in options:
        print(f"  {name:16s} max err {worst[name]:.2e}  size {sizes[name] / exact_bytes:.3f}x", flush=True)


def big(args) -> None:
    s = suite(16, 2048, 5632, 2)
    cfg = config(s, budget=args.budget)
    cfg["parameters"]["statistics_dtype"] = "compute"
    est = plan(cfg)
    print(f"1B-class suite (16 layers, hidden 2048, intermediate 5632, T=2, float32, statistics_dtype compute): "
          f"model copy {model_bytes(s, 4) / MiB:.0f} MiB; plan: store {est['stats_disk_bytes'] / MiB:.0f} MiB, "
          f"peak host {est['peak_host_bytes'] / MiB:.0f} MiB, per trial {est['trial_seconds_total']:.2f} s", flush=True)
    t0 = time.perf_counter()
    res = run_child(cfg, "big", write=not args.no_write)
    print(f"measured: peak RSS {res['peak_rss_kib'] / 1024:.0f} MiB (statistics pass {res['stats_rss_kib'] / 1024:.0f}); "
          f"search {time.perf_counter() - t0:.0f} s", flush=True)
    check_plan("1B", est, res)
    peak = res["peak_rss_kib"] * 1024
    print(f"memory within 20%: {'PASS' if abs(est['peak_host_bytes'] / peak - 1) <= 0.2 else 'FAIL'}; per-trial time "
          f"within 2x: {'PASS' if 0.5 <= est['trial_seconds_total'] / per_trial(res) <= 2 else 'FAIL'}", flush=True)


def est8b(args) -> None:
    """`bmm plan`'s search estimates at Llama-3.1-8B shapes (headers only: no checkpoint needed)."""
    import torch

    from bmmstream.plan.estimate import search_estimate
    from bmmstream.plan.layout import build_plan
    from bmmstream.sources.base import TensorInfo

    h, inter, L, heads, kv, vocab = 4096, 14336, 32, 32, 8, 128256
    hd = h // heads
    infos = {"model.embed_tokens.weight": TensorInfo((vocab, h), "BF16"), "model.norm.weight": TensorInfo((h,), "BF16"),
             "lm_head.weight": TensorInfo((vocab, h), "BF16")}
    for i in range(L):
        p = f"model.layers.{i}."
        for n, shp in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv * hd, h)), ("self_attn.v_proj", (kv * hd, h)),
                       ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                       ("mlp.down_proj", (h, inter))):
            infos[p + n + ".weight"] = TensorInfo(shp, "BF16")
        infos[p + "input_layernorm.weight"] = TensorInfo((h,), "BF16")
        infos[p + "post_attention_layernorm.weight"] = TensorInfo((h,), "BF16")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter,
              "num_hidden_layers": L, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab}
    plan = build_plan(config, infos, blocks=4)
    print("Llama-3.1-8B shapes, T = 3, compute bfloat16, statistics float32, W_pre streamed; GPU assumed 100 TFLOP/s "
          "(bf16 matmul), factors read at the store's assumed 1.5 GB/s:")
    for label, fb, frac in (("exact, float32 factors", 4, 1.0), ("exact, bfloat16 factors", 2, 1.0),
                            ("rank k = d_in/8, bfloat16", 2, 0.125)):
        e = search_estimate(plan, infos, experts=3, compute_bytes=2, statistics_bytes=4, factor_bytes=fb,
                            keep_base=False, device=torch.device("cuda"), flops_per_s=100e12, rank_fraction=frac)
        s = e["trial_seconds"]
        print(f"  {label:26s} store {e['stats_disk_bytes'] / 2**30:7.1f} GiB (factors {e['factor_disk_bytes'] / 2**30:6.1f});"
              f" peak device {e['peak_device_bytes'] / 2**30:5.1f} GiB, host {e['peak_host_bytes'] / 2**30:4.1f} GiB; "
              f"per trial {e['trial_seconds_total']:6.1f} s (stream {s['stream']:.1f}, resolve {s['resolve']:.2f}, "
              f"assemble {s['assemble']:.2f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="+", choices=["depth", "equal", "storage", "big", "est8b"])
    ap.add_argument("--budget", type=int, default=3, help="trials of the 1B-class search")
    ap.add_argument("--no-write", action="store_true", help="1B: stop after the trials (skip the final merge)")
    ap.add_argument("--no-in-core", action="store_true", help="depth: skip the in-core reference runs")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}", flush=True)
    for w in args.what:
        {"depth": depth, "equal": equal, "storage": storage, "big": big, "est8b": est8b}[w](args)


if __name__ == "__main__":
    main()
