"""Task-arithmetic wall time and private peak of this tree's pipeline against another checkout (the code
before the streaming-pipeline work), run alternately A B A B on the same suite; checks the outputs are
byte-identical.

    python tools/make_checkpoints.py --out /tmp/s --layers 8 --hidden 1024 --intermediate 2816 \
        --heads 16 --kv-heads 4 --vocab 16000 -T 4 --dtype bfloat16
    git worktree add --detach /tmp/oldhead HEAD      # (before the change)
    python bench/pipeline_speed.py --suite /tmp/s --old /tmp/oldhead --rounds 3

Private peak = the largest RssAnon seen (sampled every 20 ms): anonymous memory only, since the mapped
input pages are page cache.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(code: Path, cfg: Path, work: Path, extra: list[str], env_extra: dict) -> tuple[float, int, Path]:
    out, run_dir = work / "out", work / "run"
    for p in (out, run_dir):
        shutil.rmtree(p, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(code), **env_extra)
    cmd = [sys.executable, "-m", "bmmstream.cli", "merge", str(cfg), "--out", str(out), "--run-dir", str(run_dir),
           "--device", "cpu", "--no-progress", *extra]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def poll():
        while p.poll() is None:
            peak[0] = max(peak[0], _rss_anon(p.pid))
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    so, se = p.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{code}: failed ({p.returncode}): {se[-2000:]}")
    return wall, peak[0], out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name.endswith("index.json")}


def warm_read(suite: Path) -> float:
    """Seconds to read every input byte once through the page cache (after a first warming pass)."""
    files = sorted(suite.glob("*/*.safetensors"))
    buf = bytearray(1 << 24)
    for _ in range(2):
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        t = time.perf_counter() - t0
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", type=Path, required=True)
    ap.add_argument("--old", type=Path, required=True, help="checkout of the code to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="task_arithmetic")
    a = ap.parse_args()
    experts = sorted(p for p in a.suite.iterdir() if p.name.startswith("expert_"))
    cfg = {"base_model": str(a.suite / "base"), "models": [{"model": str(e)} for e in experts],
           "merge_method": a.method, "parameters": {"scale": 0.3} if a.method == "task_arithmetic" else {},
           "dtype": "float32"}
    work = Path(tempfile.mkdtemp(prefix="bmm-pipe-"))
    (work / "c.yaml").write_text(json.dumps(cfg))
    size = sum(f.stat().st_size for f in a.suite.glob("*/*.safetensors"))
    read = warm_read(a.suite)
    print(f"inputs: {len(experts)} experts + base, {size / 2**30:.2f} GiB; warm read {read:.2f} s")
    variants = [
        ("old, default threads", a.old, [], {}),
        ("old, OMP_NUM_THREADS=1", a.old, [], {"OMP_NUM_THREADS": "1"}),
        ("new, --threads 1", ROOT, ["--threads", "1"], {}),
        ("new, --threads auto", ROOT, ["--threads", "auto"], {}),
    ]
    results: dict[str, list[tuple[float, int]]] = {v[0]: [] for v in variants}
    digests = {}
    for r in range(a.rounds):
        for name, code, extra, env in variants:
            wall, peak, out = run(code, work / "c.yaml", work, extra, env)
            results[name].append((wall, peak))
            digests.setdefault(name, digest(out))
            print(f"round {r + 1}: {name:24s} {wall:7.2f} s  private peak {peak / 2**30:.2f} GiB", flush=True)
    ref = digests[variants[0][0]]
    same = all(d == ref for d in digests.values())
    print(f"outputs byte-identical across variants: {same}")
    print(f"{'variant':26s} {'median wall':>12s} {'x warm read':>12s} {'private peak':>13s}")
    for name, rs in results.items():
        w = statistics.median(x for x, _ in rs)
        m = max(y for _, y in rs)
        print(f"{name:26s} {w:10.2f} s {w / read:11.1f}x {m / 2**30:10.2f} GiB")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
