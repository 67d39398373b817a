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
import bmmstream
cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
bmmstream.merge(cfg, out=sys.argv[2], run_dir=sys.argv[3], device="cpu", progress=False)
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": time.perf_counter() - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "rss_depth")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bmmstream.synthetic import make_llama_suite

    rows = []
    for layers in (args.layers, args.layers * args.factor):
        d = args.work / f"L{layers}"
        t0 = time.perf_counter()
        suite = make_llama_suite(d / "suite", num_experts=args.experts, hidden=args.hidden,
                                 intermediate=args.intermediate, layers=layers, heads=8, kv_heads=4,
                                 vocab=args.vocab, rank=8)
        gen_s = time.perf_counter() - t0
        cfg = {
            "base_model": str(suite.base),
            "models": [{"model": str(e)} for e in suite.experts],
            "merge_method": "bmm",
            "parameters": {"anchor": "task_arithmetic", "statistics": "data_free", "rho": 0.01},
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "shard_size": "200MB",
        }
        import shutil

        for p in (d / "out", d / "run"):
            shutil.rmtree(p, ignore_errors=True)
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(d / "out"), str(d / "run")],
                           cwd=ROOT, capture_output=True, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res.update(layers=layers, gen_seconds=gen_s)
        rows.append(res)
        print(f"layers={layers:3d}  peak RSS {res['peak_rss_kib'] / 1024:8.1f} MiB  merge {res['seconds']:6.1f} s")
    ratio = rows[1]["peak_rss_kib"] / rows[0]["peak_rss_kib"]
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    print(f"T={args.experts} hidden={args.hidden} intermediate={args.intermediate} vocab={args.vocab}")
    print(f"peak RSS ratio deep/shallow ({rows[1]['layers']}/{rows[0]['layers']} layers): {ratio:.3f} "
          f"({'PASS' if ratio <= 1.15 else 'FAIL'} <= 1.15)")


if __name__ == "__main__":
    main()
