"""Issue 17: bmmstream's merges against mergekit and a plain read of the inputs, side by side.

Builds base + 4 Llama-shaped bf16 experts per suite (bench/out/perf/<size>, reused when present),
then runs, alternating within each group (A B A B, medians of --reps): a warm read of every input
file (`cat` to /dev/null after a first read; `--cold` evicts them first with posix_fadvise), bmm
(`python -m bmmstream merge` in a subprocess, default threads and `--threads 1` when the CLI has it)
and mergekit (`mergekit-yaml` from its own venv, bench/out/mergekit-venv, default and `-j 1`) for
task arithmetic and TIES, and data-free BMM; task arithmetic also in process (the second `api.merge` call of one process: a pipeline's cost once imports and numba's kernels are loaded); `--only plan` runs the methods whose `bmm plan` memory is modelled from code (per-tensor TIES, DARE, Breadcrumbs, DELLA, TSV) once each. Each run's wall time and private peak memory (RssAnon
of the process tree sampled every 50 ms: mapped input pages are page cache, not private) are
measured; outputs of matching methods are compared within bf16 rounding (one bf16 ulp of the
larger magnitude plus float32 noise of the summands, see compare) with a negative control that must
fail; the table prints the ratios the issue's acceptance asks for. Every wall includes process
start-up (imports), as a user's CLI run does; the table also prints it.

mergekit is never a bmmstream dependency: its venv is created by bench/crosscheck_mergekit.py's
ensure_mergekit (pip install torch==<this torch> mergekit) on first use.

    nice -n 5 python bench/perf_vs_mergekit.py --sizes tiny --reps 1          # smoke run, ~20M params
    nice -n 5 python bench/perf_vs_mergekit.py --sizes 0.35B --reps 3 --json bench/out/perf/035.json
    nice -n 5 python bench/perf_vs_mergekit.py --sizes 0.35B,1.26B --only ta,ties --cold
    python bench/perf_vs_mergekit.py --sizes 0.35B --only plan --reps 1   # `bmm plan` vs measured, more methods
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from crosscheck_mergekit import VENV, ensure_mergekit, mergekit_version  # noqa: E402

OUT = ROOT / "bench" / "out" / "perf"
EXPERTS = 4
# Llama-shaped (MHA, intermediate 2.75 x hidden, vocab 32000, untied lm_head); counts checked by n_params
SIZES = {
    "tiny": dict(hidden=256, intermediate=704, layers=4, heads=4, kv_heads=4, vocab=32000),
    "0.35B": dict(hidden=1024, intermediate=2816, layers=22, heads=16, kv_heads=16, vocab=32000),
    "1.26B": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=32, vocab=32000),
}
# experts = base + rank-8 random deltas (entry RMS 0.005 against init std 0.02) + dense noise half that
DELTA = dict(rank=8, noise=0.5, delta_scale=0.005, seed=17)
SCALE, DENSITY, RHO = 0.3, 0.2, 0.01
GROUPS = ("ta", "ties", "bmm", "plan")
SAMPLE_S = 0.05
CHUNK = 1 << 22  # entries per float64 temporary in the output check


def n_params(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    kv = kv_heads * (hidden // heads)
    layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * layer + hidden


# ---------------------------------------------------------------- suites

def build_suite(size: str) -> tuple[Path, list[Path]]:
    """base + EXPERTS experts in bf16, one tensor at a time (bmmstream.demo); reused if complete."""
    from bmmstream.demo import make_llama_suite

    d = OUT / size
    spec = dict(SIZES[size], **DELTA, experts=EXPERTS, dtype="bfloat16")
    marker = d / "suite.json"
    folders = [d / "base"] + [d / f"expert_{t}" for t in range(EXPERTS)]
    if marker.exists() and json.loads(marker.read_text()) == spec and all(
            any(f.glob("*.safetensors")) for f in folders):
        return folders[0], folders[1:]
    if marker.exists():  # built with other shapes or deltas; without a marker, make_llama_suite resumes
        shutil.rmtree(d)
    t0 = time.perf_counter()
    print(f"building suite {size}: {n_params(**SIZES[size]) / 1e9:.3f}B parameters per model, "
          f"{EXPERTS} experts, bf16 -> {d}", flush=True)
    kw = {k: v for k, v in spec.items() if k not in ("experts",)}
    make_llama_suite(d, num_experts=EXPERTS, shard_bytes=5 * 10**9, **kw)
    marker.write_text(json.dumps(spec))
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    return folders[0], folders[1:]


def input_files(base: Path, experts: list[Path]) -> list[Path]:
    return [f for d in [base, *experts] for f in sorted(d.glob("*.safetensors"))]


# ---------------------------------------------------------------- measurement

def _tree(pid: int) -> list[int]:
    """pid and its descendants, through /proc/<pid>/task/<tid>/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def _rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Run:
    job: str
    wall_s: float
    peak_anon_mib: float
    maxrss_mib: float  # kernel high-water RSS (file pages included) of the largest process in the tree
    cpu_s: float
    rc: int
    load_before: float
    log: str = ""
    cached: float | None = None  # reads: page-cache share of the inputs just before
    execute_s: float | None = None  # bmm: the run's own execute wall (manifest.json), without start-up and imports


def measure(job: str, cmd: list[str], env: dict, log: Path, discard_stdout: bool = False) -> Run:
    """Run cmd, sampling the private (anonymous) memory of its process tree every SAMPLE_S."""
    load = os.getloadavg()[0]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        out = subprocess.DEVNULL if discard_stdout else fh
        p = subprocess.Popen(cmd, stdout=out, stderr=fh if discard_stdout else subprocess.STDOUT, env=env, cwd=ROOT)
        peak = 0
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, sum(_rss_anon_kib(q) for q in _tree(p.pid)))
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return Run(job, wall, peak / 1024, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime, p.returncode, load,
               str(log))


def read_all(files: list[Path], log: Path) -> Run:
    """`cat` every file to /dev/null: the floor of any tool that must read all inputs."""
    return measure("read", ["cat", *map(str, files)], dict(os.environ), log, discard_stdout=True)


def cached_fraction(files: list[Path]) -> float | None:
    """Share of the files' bytes in the page cache (fincore), to show a 'warm' read really was."""
    if not shutil.which("fincore"):
        return None
    r = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *map(str, files)], capture_output=True, text=True)
    return sum(int(x) for x in r.stdout.split() if x.isdigit()) / sum(f.stat().st_size for f in files)


def evict(files: list[Path]) -> str:
    """Drop the files' clean pages from this (guest) page cache; no root needed. Returns fincore's view."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if shutil.which("fincore"):
        r = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *map(str, files)], capture_output=True, text=True)
        return f"{sum(int(x) for x in r.stdout.split() if x.isdigit()) / 2**20:.1f} MiB still cached"
    return "fincore missing: eviction not verified"


def matmul_gflops(threads: int, n: int = 2048, seconds: float = 1.0) -> float:
    """Sustained float32 square matmul rate at `threads` torch threads (the acceptance's peak)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------- jobs

@dataclass
class Job:
    name: str
    label: str
    tool: str  # bmm | mergekit | read
    cfg: dict = field(default_factory=dict)
    args: list[str] = field(default_factory=list)


def bmm_cfg(base: Path, experts: list[Path], method: str, params: dict) -> dict:
    return {"base_model": str(base), "models": [{"model": str(e)} for e in experts], "merge_method": method,
            "parameters": params, "dtype": "float32", "out_dtype": "bfloat16", "shard_size": "5GB"}


def mk_cfg(base: Path, experts: list[Path], method: str, per_model: dict, shared: dict) -> dict:
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "parameters": dict(per_model)} for e in experts],
            "parameters": shared, "dtype": "float32", "out_dtype": "bfloat16"}


def jobs_for(group: str, base: Path, experts: list[Path], bmm_threads: bool, mk_j: bool) -> list[Job]:
    """Alternation order inside a group: bmm, mergekit, bmm 1 thread, mergekit -j 1, ..."""
    t1 = ["--threads", "1"]
    if group == "ta":
        b = bmm_cfg(base, experts, "task_arithmetic", {"scale": SCALE})
        m = mk_cfg(base, experts, "task_arithmetic", {"weight": SCALE}, {"normalize": False, "lambda": 1.0})
        jobs = [Job("bmm_ta", "bmm task_arithmetic, default threads", "bmm", b),
                Job("mk_ta", "mergekit task_arithmetic, default", "mergekit", m)]
        if bmm_threads:
            jobs.append(Job("bmm_ta_t1", "bmm task_arithmetic, --threads 1", "bmm", b, t1))
        if mk_j:
            jobs.append(Job("mk_ta_j1", "mergekit task_arithmetic, -j 1", "mergekit", m, ["-j", "1"]))
        jobs.append(Job("bmm_ta_inproc", "bmm task_arithmetic, in process: 2nd api.merge call", "bmm_inproc", b))
        return jobs
    if group == "ties":
        tp = {"density": DENSITY, "scale": 1.0}
        g = bmm_cfg(base, experts, "ties", dict(tp, threshold="global"))
        pt = bmm_cfg(base, experts, "ties", dict(tp, threshold="per_tensor"))
        m = mk_cfg(base, experts, "ties", {"weight": 1.0, "density": DENSITY}, {"normalize": True, "lambda": 1.0})
        jobs = [Job("bmm_ties", "bmm ties global threshold, default threads", "bmm", g),
                Job("mk_ties", "mergekit ties (per-tensor), default", "mergekit", m),
                Job("bmm_ties_pt", "bmm ties per_tensor threshold, default threads", "bmm", pt)]
        if bmm_threads:
            jobs.append(Job("bmm_ties_t1", "bmm ties global threshold, --threads 1", "bmm", g, t1))
        if mk_j:
            jobs.append(Job("mk_ties_j1", "mergekit ties (per-tensor), -j 1", "mergekit", m, ["-j", "1"]))
        return jobs
    if group == "bmm":
        p = {"anchor": "task_arithmetic", "anchor_parameters": {"scale": SCALE}, "statistics": "data_free",
             "rho": RHO}
        return [Job("bmm_bmm_c", "bmm data-free BMM, statistics_dtype compute (float32)", "bmm",
                    bmm_cfg(base, experts, "bmm", dict(p, statistics_dtype="compute"))),
                Job("bmm_bmm_f64", "bmm data-free BMM, statistics_dtype float64", "bmm",
                    bmm_cfg(base, experts, "bmm", dict(p, statistics_dtype="float64")))]
    if group == "plan":  # one run of each method whose memory `bmm plan` models from code, not measurement
        tp = {"density": DENSITY, "scale": 1.0}
        return [Job("plan_ties_pt", "bmm ties per_tensor threshold", "bmm",
                    bmm_cfg(base, experts, "ties", dict(tp, threshold="per_tensor"))),
                Job("plan_dare_ties", "bmm dare_ties", "bmm", bmm_cfg(base, experts, "dare_ties", dict(tp))),
                Job("plan_breadcrumbs_ties", "bmm breadcrumbs_ties", "bmm",
                    bmm_cfg(base, experts, "breadcrumbs_ties", dict(tp, gamma=0.01))),
                Job("plan_della", "bmm della", "bmm", bmm_cfg(base, experts, "della", dict(tp, epsilon=0.1))),
                Job("plan_tsv", "bmm tsv", "bmm", bmm_cfg(base, experts, "tsv", {"alpha": 1.0}))]
    raise SystemExit(f"--only: unknown group {group!r}; choose from {GROUPS}")


def child_env(tool: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if tool == "bmm":  # the editable install may point elsewhere; run this tree's bmmstream
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_job(job: Job, work: Path, rep: int, keep: bool) -> Run:
    d = work / job.name
    shutil.rmtree(d, ignore_errors=True)  # a fresh run: bmm would resume an existing run directory
    d.mkdir(parents=True)
    (d / "config.yml").write_text(yaml.safe_dump(job.cfg, sort_keys=False))
    if job.tool == "bmm_inproc":
        cmd = [sys.executable, "-c", INPROC, str(d / "config.yml"), str(d)]
    elif job.tool == "bmm":
        cmd = [sys.executable, "-m", "bmmstream", "merge", str(d / "config.yml"), "--out", str(d / "out"),
               "--run-dir", str(d / "run"), "--device", "cpu", "--no-progress", *job.args]
    else:
        cmd = [str(VENV / "bin" / "mergekit-yaml"), str(d / "config.yml"), str(d / "out"), "--quiet", *job.args]
    r = measure(job.name, cmd, child_env("bmm" if job.tool == "bmm_inproc" else job.tool),
                work / "logs" / f"{job.name}.rep{rep}.log")
    if r.rc != 0:
        tail = Path(r.log).read_text(errors="replace")[-2000:]
        raise SystemExit(f"{job.name} failed (rc {r.rc}): {shlex.join(cmd)}\n{tail}")
    if job.tool == "bmm":
        r.execute_s = json.loads((d / "run" / "manifest.json").read_text()).get("execute_seconds")
    elif job.tool == "bmm_inproc":
        r.execute_s = json.loads((d / "inproc.json").read_text())["second_s"]
    for run in ("run", "run1", "run2"):
        shutil.rmtree(d / run, ignore_errors=True)  # BMM statistics stores: disk
    shutil.rmtree(d / "out1", ignore_errors=True)
    if not keep:
        shutil.rmtree(d / "out", ignore_errors=True)
    return r


# A library user's merge (a pipeline or a search that merges more than once): the first api.merge call
# pays the one-time costs (numba loading its cached kernels, first touches); the second is timed.
INPROC = """
import json, sys, time
from pathlib import Path
from bmmstream import api
cfg, d = sys.argv[1], Path(sys.argv[2])
t = []
for k in (1, 2):
    t0 = time.perf_counter()
    api.merge(cfg, out=d / f"out{k}", run_dir=d / f"run{k}", device="cpu", progress=False)
    t.append(time.perf_counter() - t0)
(d / "inproc.json").write_text(json.dumps({"first_s": t[0], "second_s": t[1]}))
"""


def cli_has(cmd: list[str], flag: str, env: dict) -> bool:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    return flag in (r.stdout + r.stderr)


def bmm_plan(cfg: dict, path: Path) -> dict | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "bmmstream", "plan", str(path), "--json", "--device", "cpu"],
                       capture_output=True, text=True, env=child_env("bmm"), cwd=ROOT)
    try:
        return json.loads(r.stdout)["estimate"]
    except (ValueError, KeyError):
        return None


# ---------------------------------------------------------------- output check

def _tensors(folder: Path):
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                yield k, f


def compare(ours: Path, theirs: Path, inputs: list[Path]) -> dict:
    """Every tensor within bf16 rounding of float32 arithmetic: |a - b| <= ulp + 2^-16 S, where ulp is one
    bf16 ulp of max(|a|, |b|) (float32 results a few float32 ulps apart may round to neighbouring bf16
    values, e.g. at an exact bf16 midpoint) and S = |base| + sum_t |expert_t| (float32 summation noise is
    relative to the summands, not to a result that cancels to ~0; 2^-16 S is ~100x that noise and 128x
    below the inputs' own bf16 quantum). Float32 outputs use ulp = 2^-8 max(|a|, |b|) as
    crosscheck_mergekit. Tensor by tensor, so memory stays a few tensors."""
    a_files, b_files = dict(_tensors(ours)), dict(_tensors(theirs))
    in_files = [dict(_tensors(d)) for d in inputs]  # inputs[0] is the base
    if set(a_files) != set(b_files):
        return {"ok": False, "error": f"tensor names differ: only bmm {sorted(set(a_files) - set(b_files))[:5]}, "
                                      f"only mergekit {sorted(set(b_files) - set(a_files))[:5]}"}

    def get(files: dict, name: str) -> torch.Tensor:
        with safe_open(str(files[name]), "pt") as h:
            return h.get_tensor(name)

    worst, worst_name, failing, differing, entries, moved = 0.0, "", 0, 0, 0, 0.0
    for name in sorted(a_files):
        a, b = get(a_files, name), get(b_files, name)
        if a.shape != b.shape:
            return {"ok": False, "error": f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"}
        ins = [get(f, name).reshape(-1) for f in in_files]
        bad = False
        for i in range(0, a.numel(), CHUNK):  # float64 temporaries of 4M entries at a time
            x, y = a.reshape(-1)[i:i + CHUNK].double(), b.reshape(-1)[i:i + CHUNK].double()
            w = ins[0][i:i + CHUNK].double()
            summands = sum((t[i:i + CHUNK].double().abs() for t in ins[1:]), w.abs())
            diff = (x - y).abs()
            m = torch.maximum(x.abs(), y.abs())
            if torch.bfloat16 in (a.dtype, b.dtype):
                _, e = torch.frexp(m)  # m = f 2^e, f in [0.5, 1): bf16 ulp = 2^(e - 1 - 7)
                ulp = torch.ldexp(torch.ones_like(m), e - 8)
            else:
                ulp = 2.0**-8 * m
            tol = ulp + 2.0**-16 * summands
            ratio = float((diff / (tol + 1e-300)).max())
            if ratio > worst:
                worst, worst_name = ratio, name
            bad |= not bool((diff <= tol).all())
            differing += int((diff > 0).sum())
            moved = max(moved, float((x - w).abs().max()))
        failing += int(bad)
        entries += a.numel()
    return {"ok": failing == 0 and moved > 0, "tensors": len(a_files), "tensors_failing": failing,
            "worst_ratio_to_tol": worst, "worst_tensor": worst_name, "entries_differing": differing,
            "entries": entries, "max_abs_change_from_base": moved}


# ---------------------------------------------------------------- main

def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_size(size: str, args, bmm_threads: bool, mk_j: bool) -> dict:
    base, experts = build_suite(size)
    files = input_files(base, experts)
    work = OUT / size / "runs"
    in_bytes = sum(f.stat().st_size for f in files)
    print(f"\n=== suite {size}: {n_params(**SIZES[size]) / 1e9:.3f}B parameters x {1 + len(experts)} models, "
          f"{in_bytes / 1e9:.2f} GB of input ({len(files)} files)", flush=True)
    res: dict = {"size": size, "shape": SIZES[size], "params_per_model": n_params(**SIZES[size]),
                 "input_bytes": in_bytes, "reps": args.reps, "runs": {}, "checks": {}}
    cold = None
    if args.cold:
        cached = evict(files)
        r = read_all(files, work / "logs" / "read_cold.log")
        cold = {"wall_s": r.wall_s, "after_evict": cached}
        print(f"cold read: {r.wall_s:.2f} s ({cached} after posix_fadvise DONTNEED; guest page cache only: "
              f"the host may still cache the virtual disk)", flush=True)
    res["read_cold"] = cold
    read_all(files, work / "logs" / "read_first.log")  # warm the cache
    # what a bmm process holds before merging anything: the floor under every bmm row's private peak
    imports = measure("imports", [sys.executable, "-c", "import bmmstream.api, bmmstream.pipeline, "
                      "bmmstream.methods as m, torch, zarr; m.method_names(); import time; time.sleep(0.3)"],
                      child_env("bmm"), work / "logs" / "imports.log")
    res["bmm_imports_anon_mib"], res["bmm_imports_s"] = imports.peak_anon_mib, imports.wall_s
    runs: dict[str, list[Run]] = {"read": []}
    jobs_by_group = {g: jobs_for(g, base, experts, bmm_threads, mk_j) for g in args.only}
    keep = {"bmm_ta", "mk_ta", "bmm_ties", "bmm_ties_pt", "mk_ties"}
    for g, jobs in jobs_by_group.items():
        for rep in range(args.reps):
            cached = cached_fraction(files)
            runs["read"].append(read_all(files, work / "logs" / "read.log"))
            runs["read"][-1].cached = cached
            for job in jobs:
                os.sync()  # the run before (mergekit does not fsync) may leave GBs to write back: not ours to pay
                cached = cached_fraction(files)  # a run after a big one may find inputs evicted: not warm
                r = run_job(job, work, rep, keep=(args.keep or job.name in keep) and rep == args.reps - 1)
                r.cached = cached
                runs.setdefault(job.name, []).append(r)
                print(f"  [{g} rep {rep + 1}/{args.reps}] {job.label:55s} {r.wall_s:8.2f} s  "
                      f"private peak {r.peak_anon_mib:8.1f} MiB  cpu {r.cpu_s:7.1f} s  load {r.load_before:.1f}"
                      + (f"  inputs cached {cached:.0%}" if cached is not None else ""), flush=True)
    fr = [r.cached for r in runs["read"] if r.cached is not None]
    warm = f"read all inputs, warm ({min(fr):.0%}-{max(fr):.0%} cached)" if fr else "read all inputs, warm"
    labels = {j.name: j.label for jobs in jobs_by_group.values() for j in jobs} | {"read": warm}
    for name, rs in runs.items():
        res["runs"][name] = {"label": labels[name], "wall_s": median([r.wall_s for r in rs]),
                             "peak_anon_mib": median([r.peak_anon_mib for r in rs]),
                             "maxrss_mib": median([r.maxrss_mib for r in rs]),
                             "cpu_s": median([r.cpu_s for r in rs]),
                             "execute_s": (median([r.execute_s for r in rs if r.execute_s is not None])
                                           if any(r.execute_s is not None for r in rs) else None),
                             "reps": [vars(r) for r in rs]}
    for name, ours, theirs in (("ta: bmm vs mergekit", "bmm_ta", "mk_ta"),
                               ("ties per_tensor: bmm vs mergekit", "bmm_ties_pt", "mk_ties"),
                               ("control (must differ): bmm ties global vs mergekit ties", "bmm_ties", "mk_ties")):
        if ours in runs and theirs in runs:
            res["checks"][name] = compare(work / ours / "out", work / theirs / "out", [base, *experts])
    for job in (j for js in jobs_by_group.values() for j in js):
        if job.tool == "bmm" and job.name in runs:
            res["runs"][job.name]["plan"] = bmm_plan(job.cfg, work / "plan" / f"{job.name}.yml")
    for d in keep if not args.keep else ():
        shutil.rmtree(work / d / "out", ignore_errors=True)
    return res


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def report(res: dict, peak: dict) -> list[str]:
    R = res["runs"]
    w = lambda n: R[n]["wall_s"] if n in R else None  # noqa: E731
    p = lambda n: R[n]["peak_anon_mib"] if n in R else None  # noqa: E731
    best = lambda *ns: min((w(n) for n in ns if n in R), default=None)  # noqa: E731
    lines = [f"\n## {res['size']}: {res['params_per_model'] / 1e9:.3f}B parameters per model, "
             f"{res['input_bytes'] / 1e9:.2f} GB input; medians of {res['reps']} reps (reads: one per group and rep)",
             f"{'job':58s} {'wall s':>9s} {'private MiB':>12s} {'maxRSS MiB':>11s} {'cpu s':>8s} {'merge s':>8s}"]
    if res.get("read_cold"):
        lines.append(f"{'read all inputs, cold (posix_fadvise; guest cache only)':58s} "
                     f"{res['read_cold']['wall_s']:9.2f}")
    for n, r in R.items():
        merge = f"{r['execute_s']:8.2f}" if r.get("execute_s") is not None else f"{'-':>8s}"
        lines.append(f"{r['label']:58s} {r['wall_s']:9.2f} {r['peak_anon_mib']:12.1f} {r['maxrss_mib']:11.1f} "
                     f"{r['cpu_s']:8.1f} {merge}")
    lines.append("(wall: the whole process, start-up included; merge s: bmm's own execute wall from its manifest, or for\n"
                 " the in-process row the second api.merge call, the first having paid imports and kernel loading)")
    lines.append("\nratios (acceptance):")

    def line(text: str, val: float | None, limit: float | None) -> None:
        if val is None:
            lines.append(f"  {text:62s}      n/a")
            return
        verdict = "" if limit is None else ("  PASS" if val <= limit else "  FAIL") + f" (<= {limit})"
        lines.append(f"  {text:62s} {val:8.3f}{verdict}")

    mk_ta, mk_ties = best("mk_ta", "mk_ta_j1"), best("mk_ties", "mk_ties_j1")
    line("TA wall (bmm default) / warm read", ratio(w("bmm_ta"), w("read")), 3)
    line("TA wall (bmm --threads 1) / warm read", ratio(w("bmm_ta_t1"), w("read")), 3)
    c = lambda n: R[n]["cpu_s"] if n in R else None  # noqa: E731
    line("  (TA wall (bmm default) - python/bmmstream import start-up) / warm read",
         ratio(w("bmm_ta") - res["bmm_imports_s"], w("read")) if "bmm_ta" in R else None, None)
    x = lambda n: R[n].get("execute_s") if n in R else None  # noqa: E731
    line("  bmm's own execute wall (manifest; no start-up/imports), default / warm read", ratio(x("bmm_ta"), w("read")), 3)
    line("  bmm's own execute wall (manifest; no start-up/imports), --threads 1 / warm read",
         ratio(x("bmm_ta_t1"), w("read")), 3)
    line("  bmm in process, 2nd api.merge call (imports and numba kernels loaded) / warm read",
         ratio(x("bmm_ta_inproc"), w("read")), 3)
    line("  (contention check: TA cpu time (bmm default) / read cpu time)", ratio(c("bmm_ta"), c("read")), None)
    line("TA wall (bmm default) / mergekit best TA", ratio(w("bmm_ta"), mk_ta), 0.5)
    line("TA wall (bmm --threads 1) / mergekit best TA", ratio(w("bmm_ta_t1"), mk_ta), 0.5)
    line("TIES global wall (bmm default) / mergekit best TIES", ratio(w("bmm_ties"), mk_ties), 0.2)
    line("TIES global wall (bmm --threads 1) / mergekit best TIES", ratio(w("bmm_ties_t1"), mk_ties), 0.2)
    mk_ties_peak = min((p(n) for n in ("mk_ties", "mk_ties_j1") if n in R), default=None)
    line("TIES global private peak (bmm default) / mergekit TIES (lower)", ratio(p("bmm_ties"), mk_ties_peak), 1.0)
    line("TA private peak (bmm default) / mergekit TA (lower)",
         ratio(p("bmm_ta"), min((p(n) for n in ("mk_ta", "mk_ta_j1") if n in R), default=None)), None)
    for n in ("bmm_bmm_c", "bmm_bmm_f64"):
        plan = R.get(n, {}).get("plan")
        if plan:
            gfs = plan["flops"] / R[n]["wall_s"] / 1e9
            lines.append(f"  {R[n]['label']}: plan counts {plan['flops'] / 1e9:.0f} GFLOP; / whole merge wall "
                         f"= {gfs:.1f} GFLOP/s = {gfs / peak['default']:.0%} of the measured float32 matmul peak "
                         f"({peak['default']:.0f} GFLOP/s, default threads, before the runs; acceptance >= 60% of the statistics + "
                         f"solve stages, whose own wall bmm does not report yet: this is a lower bound)")
    lines.append(f"  (a python process with bmmstream and torch imported holds {res['bmm_imports_anon_mib']:.0f} MiB "
                 f"private before merging, after {res['bmm_imports_s']:.1f} s of start-up included in every bmm wall)")
    for n in R:
        plan = R[n].get("plan")
        if plan:
            ram, t = plan["peak_ram_bytes"] / 2**20 / R[n]["peak_anon_mib"], plan["seconds"] / R[n]["wall_s"]
            ok = ("PASS" if abs(ram - 1) <= 0.2 else "FAIL") + " (RAM within 20%), " + (
                "PASS" if 0.5 <= t <= 2 else "FAIL") + " (time within 2x)"
            lines.append(f"  bmm plan vs measured, {n}: RAM {plan['peak_ram_bytes'] / 2**20:.0f} MiB predicted / "
                         f"{R[n]['peak_anon_mib']:.0f} MiB private = {ram:.2f}x ({R[n]['maxrss_mib']:.0f} MiB max "
                         f"RSS); time {plan['seconds']:.1f} s predicted / {R[n]['wall_s']:.1f} s = {t:.2f}x  {ok}")
    lines.append("\noutput checks (|a - b| <= one bf16 ulp of max(|a|, |b|) + 2^-16 (|base| + sum |expert|)):")
    for name, c in res["checks"].items():
        control = name.startswith("control")
        if "error" in c:
            verdict = "PASS" if control else "FAIL"
            lines.append(f"  {verdict}  {name}: {c['error']}")
            continue
        verdict = ("PASS" if not c["ok"] else "FAIL") if control else ("PASS" if c["ok"] else "FAIL")
        lines.append(f"  {verdict}  {name}: {c['tensors_failing']}/{c['tensors']} tensors outside, worst "
                     f"{c['worst_ratio_to_tol']:.3g} x tol ({c['worst_tensor']}), {c['entries_differing']} of "
                     f"{c['entries']} entries differ at all; max |merged - base| {c['max_abs_change_from_base']:.3g}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.35B,1.26B", help=f"comma-separated, of {list(SIZES)}")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups, of {list(GROUPS)}")
    ap.add_argument("--reps", type=int, default=3, help="runs per job; medians are reported")
    ap.add_argument("--cold", action="store_true", help="also time a cold read (posix_fadvise DONTNEED first)")
    ap.add_argument("--no-install", action="store_true", help="do not create mergekit's venv if missing")
    ap.add_argument("--keep", action="store_true", help="keep the last rep's outputs (bench/out/perf/<size>/runs)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"--sizes: unknown size {s!r}; choose from {list(SIZES)}")
    args.only = [g for g in args.only.split(",") if g]
    for g in args.only:
        if g not in GROUPS:
            raise SystemExit(f"--only: unknown group {g!r}; choose from {list(GROUPS)}")
    if args.reps < 1:
        raise SystemExit("--reps must be >= 1")

    exe = ensure_mergekit(not args.no_install)
    bmm_threads = cli_has([sys.executable, "-m", "bmmstream", "merge", "--help"], "--threads", child_env("bmm"))
    mk_j = cli_has([str(exe), "--help"], "--num-threads", child_env("mergekit"))
    peak = {"default": matmul_gflops(torch.get_num_threads()), "1": matmul_gflops(1)}
    machine = {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "machine": platform.machine(),
               "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "mergekit": mergekit_version(), "load_before": os.getloadavg(),
               "mem_total_gib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30,
               "niceness": os.nice(0), "matmul_f32_gflops": peak,
               "command": shlex.join([sys.executable, *sys.argv]),
               "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    print(f"machine: {machine['nproc']} cores ({machine['affinity']} usable), {machine['mem_total_gib']:.1f} GiB, "
          f"load {' '.join(f'{x:.2f}' for x in machine['load_before'])}, nice {machine['niceness']}; "
          f"torch {machine['torch']} ({machine['torch_threads']} threads), mergekit {machine['mergekit']}; "
          f"float32 matmul {peak['default']:.0f} GFLOP/s default threads, {peak['1']:.0f} at 1", flush=True)
    print(f"bmm merge --threads: {'yes' if bmm_threads else 'not in the CLI yet: --threads 1 rows skipped'}; "
          f"mergekit -j/--num-threads: {'yes' if mk_j else 'no: -j 1 rows skipped'}", flush=True)
    results = {"machine": machine, "bmm_has_threads": bmm_threads, "mergekit_has_j": mk_j,
               "params": {"scale": SCALE, "density": DENSITY, "rho": RHO, "experts": EXPERTS, "deltas": DELTA},
               "sizes": []}
    for s in sizes:
        results["sizes"].append(run_size(s, args, bmm_threads, mk_j))
    machine["load_after"] = os.getloadavg()
    peak["default_after"], peak["1_after"] = matmul_gflops(torch.get_num_threads()), matmul_gflops(1)
    machine["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    lines = [f"$ {machine['command']}",
             f"machine: {machine['nproc']} cores, load before {' '.join(f'{x:.2f}' for x in machine['load_before'])}"
             f" / after {' '.join(f'{x:.2f}' for x in machine['load_after'])}; torch {machine['torch']}, "
             f"mergekit {machine['mergekit']}; float32 matmul {peak['default']:.0f} GFLOP/s "
             f"({machine['torch_threads']} threads), {peak['1']:.0f} (1 thread) before, "
             f"{peak['default_after']:.0f} / {peak['1_after']:.0f} after; "
             f"bmm --threads {'present' if bmm_threads else 'absent (rows skipped)'}"]
    for res in results["sizes"]:
        lines += report(res, peak)
    print("\n".join(lines))
    results["report"] = lines
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    checks = [(n, c) for res in results["sizes"] for n, c in res["checks"].items()]
    ok = all((not c.get("ok")) if n.startswith("control") else c.get("ok") for n, c in checks)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
