"""Peak RSS of a data-free BMM merge of T experts at two depths of the same layer shape.

Each merge runs in a fresh subprocess (so imports and allocator state are equal) and reports its
own peak RSS (ru_maxrss). The claim checked: peak memory does not grow with the number of layers,
i.e. deep/shallow <= 1.15.

    python bench/rss_depth.py [--hidden 512 --intermediate 1536 --layers 4 --factor 4 --experts 4]

`--llama8b-layer` instead merges one Llama-3.1-8B-shaped layer (hidden 4096, intermediate 14336,
32/8 heads, bf16 inputs, vocab --vocab) of T = --experts experts with data-free BMM and compares the
peak PRIVATE memory (RssAnon, sampled every 10 ms: the mapped input pages are page cache, not the
merge's memory) and the wall time with `bmm plan`'s estimates (acceptance: RAM within 20%, time
within 2x, peak <= 8 GiB). `--root` runs another source tree (e.g. a worktree of an older commit):

    python bench/rss_depth.py --llama8b-layer --experts 5 --vocab 32000 [--root /tmp/oldhead]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, resource, sys, time
import bmmstream, bmmstream.pipeline, bmmstream.methods, torch, safetensors, zarr
bmmstream.methods.method_names()
base_kib = int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1])
cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
bmmstream.merge(cfg, out=sys.argv[2], run_dir=sys.argv[3], device="cpu", progress=False)
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_kib": base_kib,
                  "seconds": time.perf_counter() - t0}))
"""

# the peak private (anonymous) memory, sampled: ru_maxrss also counts the mapped inputs' page cache
ANON_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[4])
import bmmstream, bmmstream.pipeline, bmmstream.methods, torch, safetensors, zarr
bmmstream.methods.method_names()
try:  # the allocator setting `bmm` makes for its own process (cli.py), so this measures what the command holds
    from bmmstream.cli import return_freed_memory
    return_freed_memory()
except ImportError:  # an older tree (--root)
    pass
def anon():
    for l in open("/proc/self/status"):
        if l.startswith("RssAnon"):
            return int(l.split()[1]) * 1024
peak, stop = [anon()], threading.Event()
base = peak[0]
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.01)
th = threading.Thread(target=sample, daemon=True)
th.start()
cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
bmmstream.merge(cfg, out=sys.argv[2], run_dir=sys.argv[3], device="cpu", progress=False)
wall = time.perf_counter() - t0
stop.set(); th.join()
print(json.dumps({"peak_anon": max(peak[0], anon()), "base_anon": base, "seconds": wall,
                  "bmmstream": bmmstream.__file__, "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def llama8b_layer(args) -> None:
    """One Llama-3.1-8B layer, data-free BMM: measured private peak and wall vs `bmm plan`."""
    import shutil

    sys.path.insert(0, str(ROOT))
    from bmmstream.demo import make_llama_suite

    root = Path(args.root).resolve() if args.root else ROOT
    d = args.work / f"llama8b_L1_T{args.experts}_V{args.vocab}"
    t0 = time.perf_counter()
    folders = [d / "suite" / "base"] + [d / "suite" / f"expert_{t}" for t in range(args.experts)]
    if not all((f / "config.json").is_file() for f in folders):  # written last: a finished suite is reused
        make_llama_suite(d / "suite", num_experts=args.experts, hidden=4096, intermediate=14336, layers=1,
                         heads=32, kv_heads=8, vocab=args.vocab, rank=8, dtype="bfloat16")
    print(f"suite {d / 'suite'} ready in {time.perf_counter() - t0:.0f} s")
    cfg = {"base_model": str(folders[0]), "models": [{"model": str(e)} for e in folders[1:]],
           "merge_method": "bmm", "parameters": {**METHOD_PARAMS["bmm"], **json.loads(args.parameters)},
           "dtype": "float32", "out_dtype": "bfloat16"}
    rep = bmmstream_plan(cfg)
    est = rep["estimate"]
    w = d / "merge"
    shutil.rmtree(w, ignore_errors=True)
    r = subprocess.run([sys.executable, "-c", ANON_CHILD, json.dumps(cfg), str(w / "out"), str(w / "run"), str(root)],
                       cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"merge failed ({r.returncode}): {r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(w, ignore_errors=True)
    gib = 2**30
    ram, sec = res["peak_anon"], res["seconds"]
    print(f"source tree {root} ({res['bmmstream']}), torch {res['torch']}, {res['threads']} threads")
    print(f"config parameters {cfg['parameters']}, T={args.experts}, vocab {args.vocab}, compute float32")
    print(f"measured: peak private {ram / gib:.2f} GiB (after imports {res['base_anon'] / gib:.2f} GiB), "
          f"wall {sec:.0f} s  [{'PASS' if ram <= 8 * gib else 'FAIL'} <= 8 GiB]")
    print(f"bmm plan: peak RAM {est['peak_ram_bytes'] / gib:.2f} GiB ({est['peak_ram_bytes'] / ram:.2f}x measured, "
          f"{'PASS' if abs(est['peak_ram_bytes'] / ram - 1) <= 0.2 else 'FAIL'} within 20%), "
          f"time {est['seconds']:.0f} s ({est['seconds'] / sec:.2f}x measured, "
          f"{'PASS' if 0.5 <= est['seconds'] / sec <= 2 else 'FAIL'} within 2x; "
          f"{est['measured_flops_per_s'] / 1e9:.1f} GFLOP/s measured by the plan)")


def bmmstream_plan(cfg: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    from bmmstream.pipeline import plan_report

    return plan_report(cfg, device="cpu")


METHOD_PARAMS = {
    "bmm": {"anchor": "task_arithmetic", "statistics": "data_free", "rho": 0.01},
    "ties": {"density": 0.2},
    "dare": {"density": 0.5},
    "wudi": {"steps": 30},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--methods", default="bmm", help="comma-separated merge methods to measure")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "rss_depth")
    ap.add_argument("--llama8b-layer", action="store_true", help="one Llama-3.1-8B-shaped layer, data-free BMM vs `bmm plan`")
    ap.add_argument("--parameters", default="{}", help="JSON BMM parameters added in --llama8b-layer mode")
    ap.add_argument("--root", default=None, help="source tree to merge with in --llama8b-layer mode (default: this one)")
    args = ap.parse_args()
    if args.llama8b_layer:
        return llama8b_layer(args)
    sys.path.insert(0, str(ROOT))
    from bmmstream.demo import make_llama_suite

    suites = {}
    for layers in (args.layers, args.layers * args.factor):
        d = args.work / f"L{layers}"
        t0 = time.perf_counter()
        suite = make_llama_suite(d / "suite", num_experts=args.experts, hidden=args.hidden,
                                 intermediate=args.intermediate, layers=layers, heads=8, kv_heads=4,
                                 vocab=args.vocab, rank=8)
        suites[layers] = suite
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    print(f"T={args.experts} hidden={args.hidden} intermediate={args.intermediate} vocab={args.vocab}")
    import shutil

    for method in args.methods.split(","):
        params = METHOD_PARAMS.get(method, {})
        rows = []
        for layers, suite in suites.items():
            d = args.work / f"L{layers}" / method
            cfg = {
                "base_model": str(suite.base),
                "models": [{"model": str(e)} for e in suite.experts],
                "merge_method": method,
                "parameters": params,
                "dtype": "float32",
                "out_dtype": "bfloat16",
                "shard_size": "200MB",
            }
            shutil.rmtree(d, ignore_errors=True)
            r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(d / "out"), str(d / "run")],
                               cwd=ROOT, capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res.update(layers=layers)
            rows.append(res)
            shutil.rmtree(d, ignore_errors=True)
            print(f"{method:16s} layers={layers:3d}  peak RSS {res['peak_rss_kib'] / 1024:8.1f} MiB "
                  f"(after imports {res['base_kib'] / 1024:6.1f} MiB, merge working set "
                  f"{(res['peak_rss_kib'] - res['base_kib']) / 1024:7.1f} MiB)  merge {res['seconds']:6.1f} s", flush=True)
        ratio = rows[1]["peak_rss_kib"] / rows[0]["peak_rss_kib"]
        ws = [r["peak_rss_kib"] - r["base_kib"] for r in rows]
        print(f"{method:16s} peak RSS ratio deep/shallow ({rows[1]['layers']}/{rows[0]['layers']} layers): {ratio:.3f} "
              f"({'PASS' if ratio <= 1.15 else 'FAIL'} <= 1.15); working-set ratio {ws[1] / ws[0]:.3f}", flush=True)


if __name__ == "__main__":
    main()
