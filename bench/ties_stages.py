"""TIES stage timings and private peak memory on a local suite (issue 17, the TIES part).

    python tools/make_checkpoints.py --out /tmp/suite_d --layers 4 --hidden 1024 --intermediate 2816 \
        --heads 16 --kv-heads 4 --vocab 16000 -T 4 --dtype bfloat16
    python bench/ties_stages.py --suite /tmp/suite_d --threads 1 [--threshold global] [--weights]

Prints the wall of the prepass (global threshold histograms) and of the merge pass, the peak of
RssAnon (private memory: mapped input pages are cache, not counted) sampled every 10 ms, and a
sha256 of the output shards, so runs of two code versions (PYTHONPATH=<other tree>) can be compared
byte for byte.
"""
from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--threshold", default="global")
    p.add_argument("--method", default="ties")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--weights", action="store_true", help="per-model weights 0.5, 1, 1.5, ...")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    try:
        import numba

        numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    import bmmstream
    from bmmstream import pipeline
    from bmmstream.api import merge

    experts = sorted(x for x in a.suite.iterdir() if x.name.startswith("expert_"))
    models = [{"model": str(e)} for e in experts]
    if a.weights:
        for i, m in enumerate(models):
            m["parameters"] = {"weight": 0.5 * (i + 1)}
    params = {"density": a.density}
    if a.method == "ties":
        params["threshold"] = a.threshold
    cfg = {"base_model": str(a.suite / "base"), "models": models, "merge_method": a.method, "parameters": params}

    peak = [rss_anon_kib()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon_kib())
            time.sleep(0.01)

    times: dict[str, float] = {"prepass": 0.0, "prepass_cpu": 0.0}
    orig_prepass = pipeline._prepass

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def timed_prepass(job, progress):
        t, c = time.perf_counter(), cpu()
        orig_prepass(job, progress)
        times["prepass"] += time.perf_counter() - t
        times["prepass_cpu"] += cpu() - c

    pipeline._prepass = timed_prepass
    start_rss = rss_anon_kib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tmp = Path(tempfile.mkdtemp(prefix="ties_stages_"))
    try:
        t0, c0 = time.perf_counter(), cpu()
        out = merge(cfg, out=tmp / "out", run_dir=tmp / "run", device="cpu", progress=False)
        total, total_cpu = time.perf_counter() - t0, cpu() - c0
        stop.set()
        sampler.join()
        h = hashlib.sha256()
        for f in sorted(out.glob("*.safetensors")):
            h.update(f.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"code: {Path(bmmstream.__file__).parent}")
    print(f"method {a.method} threshold {a.threshold} threads {a.threads} weights {a.weights}")
    print(f"wall: prepass {times['prepass']:.2f} s  merge {total - times['prepass']:.2f} s  total {total:.2f} s")
    print(f"cpu (user+sys): prepass {times['prepass_cpu']:.2f} s  merge {total_cpu - times['prepass_cpu']:.2f} s  "
          f"total {total_cpu:.2f} s")
    print(f"RssAnon start {start_rss / 2**20:.3f} GiB  peak {peak[0] / 2**20:.3f} GiB  "
          f"growth {(peak[0] - start_rss) / 2**20:.3f} GiB")
    print(f"output sha256 {h.hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
