"""Peak RSS of a data-free BMM merge of T experts at two depths of the same layer shape.

Each merge runs in a fresh subprocess (so imports and allocator state are equal) and reports its
own peak RSS (ru_maxrss). The claim checked: peak memory does not grow with the number of layers,
i.e. deep/shallow <= 1.15.

    python bench/rss_depth.py [--hidden 512 --intermediate 1536 --layers 4 --factor 4 --experts 4]
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
    args = ap.parse_args()
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
