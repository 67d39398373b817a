"""GPU check (issue 12): every GPU path once, timed, and compared with the CPU result.

    python bench/gpu_check.py                       # on a machine with CUDA: < 8 min on one H100/H200
    python bench/gpu_check.py --device cpu --hidden 64 --intermediate 176 --heads 4 --kv-heads 2   # smoke

Two suites (synthetic Llama, bf16, base + T experts):
- "full": Llama-3.1-8B layer shapes (hidden 4096, intermediate 14336, 32/8 heads), few layers, small
  vocab; every job runs on the device and is timed (the figures for bench/RESULTS.md);
- "compare": the same shapes divided by --shrink, where every job runs on the device AND on the CPU,
  and the outputs are compared tensor by tensor (max relative Frobenius difference; outputs float32).
Jobs: BMM data-free over TA, TSV-M, ISO-C, ISO-CTS (the SVD anchors), BMM data-assisted (calibration
on pre-tokenised rows: the layer-by-layer capture on the device), and a 5-trial search (random
optimiser, seeded; the chosen point and the written model are compared).
Prints one table; exit 1 if a comparison is over tolerance.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bmmstream  # noqa: E402
from bmmstream.demo import make_llama_suite  # noqa: E402

SCORER = textwrap.dedent('''
    import torch
    def score(model):
        """Cheap deterministic score: how close layer 0's MLP output matrix is to a target norm."""
        w = model.model.layers[0].mlp.down_proj.weight.double()
        return -float((w.norm() - 0.9 * w.numel() ** 0.5 * 0.02) ** 2)
''')


def _jobs(suite, calib: Path) -> dict[str, dict]:
    base = {"base_model": str(suite.base), "dtype": "float32", "out_dtype": "float32", "seed": 0}
    models = [{"model": str(e)} for e in suite.experts]
    da_models = [{"model": str(e), "calibration": {"path": str(calib), "samples": 8, "max_len": 64}} for e in suite.experts]
    return {
        "bmm_data_free": {**base, "models": models, "merge_method": "bmm",
                          "parameters": {"anchor": "task_arithmetic", "rho": 0.01}},
        "tsv": {**base, "models": models, "merge_method": "tsv"},
        "iso_c": {**base, "models": models, "merge_method": "iso_c"},
        "iso_cts": {**base, "models": models, "merge_method": "iso_cts"},
        "bmm_data_assisted": {**base, "models": da_models, "merge_method": "bmm",
                              "parameters": {"anchor": "task_arithmetic", "statistics": "data_assisted", "rho": 0.01}},
        "search_5": {**base, "models": models, "merge_method": "bmm",
                     "parameters": {"anchor": "task_arithmetic", "rho": 0.01},
                     "search": {"optimizer": "random", "budget": 5, "seed": 0, "full_top_k": 1,
                                "scorer": {"callable": "gpu_check_scorer:score"}}},
    }


def _run(name: str, cfg: dict, out: Path, device: str) -> tuple[float, dict | None]:
    shutil.rmtree(out, ignore_errors=True)
    run_dir = out.with_name(out.name + "-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = None
    if "search" in cfg:
        res = bmmstream.search_merge(cfg, out=out, run_dir=run_dir, device=device, progress=False)
    else:
        bmmstream.merge(cfg, out=out, run_dir=run_dir, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, res


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).double()
    return out


def _max_rel_diff(a: Path, b: Path) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys():
        return float("inf")
    worst = 0.0
    for k in ta:
        if ta[k].shape != tb[k].shape:
            return float("inf")
        den = max(float(tb[k].norm()), 1e-30)
        worst = max(worst, float((ta[k] - tb[k]).norm()) / den)
    return worst


def _calibration(path: Path, vocab: int) -> None:
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, vocab, (64,), generator=g).tolist()} for _ in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path("bench/out/gpu_check"))
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--shrink", type=int, default=4, help="the CPU-compared suite has shapes / shrink")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative difference device vs CPU")
    ap.add_argument("--jobs", nargs="*", default=None, help="subset of jobs to run")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a smoke run")
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "gpu_check_scorer.py").write_text(SCORER)
    sys.path.insert(0, str(args.work))
    info = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(info))

    rows, failed = [], False
    for label, div in (("compare", args.shrink), ("full", 1)):
        kv = max(1, args.kv_heads // (div if args.kv_heads % div == 0 and args.kv_heads >= div else 1))
        heads = max(kv, args.heads // div)
        hidden = args.hidden // div
        t0 = time.perf_counter()
        suite = make_llama_suite(args.work / f"suite-{label}", num_experts=args.experts, hidden=hidden,
                                 intermediate=args.intermediate // div, layers=args.layers, heads=heads,
                                 kv_heads=kv, vocab=args.vocab, dtype="bfloat16", seed=0)
        print(f"[{label}] suite hidden {hidden}, {args.layers} layers, T={args.experts}: "
              f"built in {time.perf_counter() - t0:.1f} s", flush=True)
        calib = args.work / "calib.jsonl"
        _calibration(calib, args.vocab)
        for name, cfg in _jobs(suite, calib).items():
            if args.jobs and name not in args.jobs:
                continue
            out_dev = args.work / f"{label}-{name}-dev"
            t_dev, res_dev = _run(name, cfg, out_dev, args.device)
            row = {"suite": label, "job": name, "device_s": round(t_dev, 2)}
            if label == "compare" and args.device != "cpu":
                out_cpu = args.work / f"{label}-{name}-cpu"
                t_cpu, res_cpu = _run(name, cfg, out_cpu, "cpu")
                row["cpu_s"] = round(t_cpu, 2)
                row["speedup"] = round(t_cpu / t_dev, 1)
                row["max_rel_diff"] = _max_rel_diff(out_dev, out_cpu)
                if res_dev is not None:
                    row["same_best_point"] = res_dev["best_params"] == res_cpu["best_params"]
                failed |= not row["max_rel_diff"] <= args.tol
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| suite | job | device s | cpu s | speedup | max rel diff |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['suite']} | {r['job']} | {r['device_s']} | {r.get('cpu_s', '-')} | {r.get('speedup', '-')} | "
              f"{r.get('max_rel_diff', '-') if 'max_rel_diff' not in r else format(r['max_rel_diff'], '.2e')} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
