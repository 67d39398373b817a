"""Issue 17: a whole merge with its buffers on huge pages (bmmstream.methods.hugepages) against 4 KiB pages.

Each run is a fresh process that calls `bmmstream.api.merge` twice on the same config and times the second
call (imports and numba's kernels loaded, as a pipeline that merges more than once pays them once); "off"
raises hugepages.MIN_BYTES so that no buffer is mapped. Runs alternate off / on (A B A B); the outputs'
sha256 must be equal. The suite is bench/perf_vs_mergekit.py's (built there when missing).

    python bench/hugepages_ab.py --size 1.26B --threads 1 2 --reps 3
    python bench/hugepages_ab.py --size 0.35B --method ties --threads 1
    python bench/hugepages_ab.py --size 1.26B --threads 2 --reps 1 --profile   # where the rest of the time goes
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

CHILD = """
import hashlib, json, shutil, sys, time
from pathlib import Path
from bmmstream.cli import return_freed_memory
return_freed_memory()  # as the `bmm` command does
from bmmstream import api
from bmmstream.methods import hugepages
cfg, work, mode, threads = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
profile = len(sys.argv) > 5 and sys.argv[5] == "profile"
if mode == "off":
    hugepages.MIN_BYTES = 1 << 62
t = []
for k in (1, 2):
    shutil.rmtree(work, ignore_errors=True)
    if profile and k == 2:
        import cProfile, pstats
        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    out = api.merge(cfg, run_dir=work, device="cpu", progress=False, threads=threads)
    t.append(time.perf_counter() - t0)
if profile:
    prof.disable()
    pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(8)
h = hashlib.sha256()
for f in sorted(out.glob("*.safetensors")):
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
shutil.rmtree(work, ignore_errors=True)
print(json.dumps({"second_s": t[1], "sha256": h.hexdigest()}))
"""

VMSTAT = ("compact_stall", "thp_fault_alloc", "thp_fault_fallback")


def vmstat() -> dict[str, int]:
    """The kernel's THP and compaction counters (direct compaction stalls are what huge pages can cost)."""
    try:
        pairs = (line.split() for line in Path("/proc/vmstat").read_text().splitlines())
        return {k: int(v) for k, v in pairs if k in VMSTAT}
    except OSError:
        return {}


PARAMS = {"task_arithmetic": {"scale": 0.3}, "ties": {"density": 0.2}, "dare_linear": {"density": 0.5}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1.26B", help="a suite of bench/perf_vs_mergekit.py")
    ap.add_argument("--method", default="task_arithmetic", choices=sorted(PARAMS))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="also profile one huge-page run's second call (cProfile, by own time) and print it")
    a = ap.parse_args()
    from perf_vs_mergekit import build_suite

    base, experts = build_suite(a.size)
    cfg = {"base_model": str(base), "models": [{"model": str(e)} for e in experts], "merge_method": a.method,
           "parameters": PARAMS[a.method], "dtype": "float32"}
    work = ROOT / "bench" / "out" / "hugepages_ab"
    print(f"suite {a.size}, {a.method}, {len(experts)} experts; second api.merge call per process, "
          f"median of {a.reps} (off/on alternated)")
    for th in a.threads:
        times: dict[str, list[float]] = {"off": [], "on": []}
        stalls: dict[str, list[int]] = {"off": [], "on": []}
        shas = set()
        for _ in range(a.reps):
            for mode in ("off", "on"):
                v0 = vmstat()
                r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(work), mode, str(th)],
                                   capture_output=True, text=True, cwd=ROOT)
                if r.returncode != 0:
                    raise SystemExit(r.stderr[-2000:])
                v1 = vmstat()
                stalls[mode].append(v1.get("compact_stall", 0) - v0.get("compact_stall", 0))
                got = json.loads(r.stdout.strip().splitlines()[-1])
                times[mode].append(got["second_s"])
                shas.add(got["sha256"])
        if a.profile:
            r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(work), "on", str(th), "profile"],
                               capture_output=True, text=True, cwd=ROOT)
            print(f"threads {th}, huge pages on, second call by own time:\n{r.stderr[-3000:]}")
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        print(f"threads {th}: 4 KiB pages {off:.2f} s ({' '.join(f'{x:.2f}' for x in times['off'])}), "
              f"huge pages {on:.2f} s ({' '.join(f'{x:.2f}' for x in times['on'])}), on/off {on / off:.2f}x, "
              f"outputs {'identical' if len(shas) == 1 else 'DIFFER'}; direct compaction stalls per run "
              f"off {stalls['off']} on {stalls['on']}", flush=True)


if __name__ == "__main__":
    main()
