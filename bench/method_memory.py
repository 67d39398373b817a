"""Issue 17: the memory a method's `merge` takes for one tensor, against what it declares to `bmm plan`.

`bmm plan` counts, per tensor on the general path, base + T task vectors + the method's
`working_copies(T)` copies of the tensor in the compute dtype (+ `extra_bytes`). This bench measures
the copies: one subprocess per (method, T) holds a float32 base and T task vectors of one tensor,
loads the method's kernels on a small tensor (numba's compiled code, ~60 MiB, is loaded once per
process and counted in the plan's runtime, not per tensor), resets the kernel's peak-RSS mark, runs
`method.merge` and reports (peak - before) / one copy.
glibc's mmap threshold is fixed at 1 MiB in the child, as the `bmm` command does for itself, so freed
temporaries leave the RSS and the peak is the live set.

    python bench/method_memory.py                       # every general-path sparsifying method, T = 2, 4, 8
    python bench/method_memory.py --methods dare_ties --tasks 8 16 --shape 2048 4096

Printed per row: measured copies beyond base + T task vectors, declared, and the ratio of the whole
tensor's footprint (T + 1 + declared) / (T + 1 + measured), PASS within 20% as the plan's RAM target.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # name -> (method, params)
    "ties_per_tensor": ("ties", {"threshold": "per_tensor"}),
    "ties_global_general": ("ties", {}),  # the general path where the fused kernel declines
    "dare_ties": ("dare_ties", {}),
    "dare_linear": ("dare_linear", {}),
    "breadcrumbs": ("breadcrumbs", {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}),
    "della": ("della", {}),
    "della_linear": ("della_linear", {}),
}  # task arithmetic and linear: the fused stream (raw_scratch_bytes), not working copies

CHILD = r"""
import json, sys, torch
from bmmstream.methods.registry import ModuleInput, get_method
from bmmstream.plan.layout import ModuleSpec
method, params, T, shape, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
shape = tuple(shape)
copy = 4 * shape[0] * shape[1]
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
spec = ModuleSpec("model.layers.0.mlp.down_proj.weight", shape, "linear", "mlp_out", 0, 0, 1)
g = torch.Generator().manual_seed(0)
base = torch.randn(shape, generator=g)
deltas = torch.randn((T,) + shape, generator=g) * 0.01
m = get_method(method, params)
if method == "ties" and params.get("threshold", "global") == "global":
    m._thresholds, m._numel = [0.01] * T, 1  # as a prepass would leave them
small = ModuleSpec("w", (64, 64), "linear", "other", 0, 0, 1)
m.merge(ModuleInput(small, base[:64, :64].clone(), deltas[:, :64, :64].clone()))  # load the kernels first
if method == "ties" and params.get("threshold", "global") == "global":
    m._thresholds, m._numel = [0.01] * T, 1
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = hwm()
out = m.merge(ModuleInput(spec, base, deltas))
print(json.dumps({"measured": (hwm() - before) / copy, "declared": m.working_copies(T),
                  "extra": m.extra_bytes(shape, "linear", T) / copy}))
"""


def measure(method: str, params: dict, tasks: int, shape: list[int], threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps([method, params, tasks, shape, threads])],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{method} T={tasks}: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--shape", nargs=2, type=int, default=[4096, 8192], help="one tensor (128 MiB float32)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(f"one tensor {args.shape[0]} x {args.shape[1]} float32, {args.threads} torch thread(s); copies of it:")
    print(f"{'method':22s} {'T':>3s} {'measured':>9s} {'declared':>9s}   plan/measured (whole tensor)")
    failed = 0
    for name in args.methods:
        method, params = CASES[name]
        for t in args.tasks:
            r = measure(method, params, t, args.shape, args.threads)
            declared = r["declared"] + r["extra"]
            ratio = (t + 1 + declared) / (t + 1 + r["measured"])
            ok = abs(ratio - 1.0) <= 0.2
            failed += not ok
            print(f"{name:22s} {t:3d} {r['measured']:9.2f} {declared:9.2f}   {ratio:.2f}x {'PASS' if ok else 'FAIL'}")
    print(f"{failed} outside 20%")


if __name__ == "__main__":
    main()
