"""Outer search on the real encoder suite: Nevergrad optimisers vs the shared-rho grid vs random
search, same budget, hyperparameters chosen on validation, test accuracy reported (issue 6).

For each optimiser, `bmm search` runs on the four MiniLM experts built by tools/build_experts.py
(BMM, task-arithmetic anchor, data-free statistics, B blocks), scoring every trial by the mean
validation accuracy over tasks with each task's own head (a fixed subset of `--proxy` rows per task
for most trials, the full validation split for the best few); the written best model is then scored
on the test split. Everything is cached in the run directories, so a rerun costs no evaluations.

    nice python bench/search_compare.py --budget 20 --optimizers NGOpt CMA grid random
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=ROOT / "tools" / "cache" / "encoder")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "search_compare")
    ap.add_argument("--optimizers", nargs="+", default=["NGOpt", "CMA", "grid", "random"])
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--proxy", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModel

    import bmmstream
    from bmmstream.statistics.calibration_data import load_tokenizer
    from bmmstream.search.scorers import make_scorers

    torch.set_num_threads(2)
    man = json.loads((args.cache / "manifest.json").read_text())
    tasks = list(man["experts"])
    base = args.cache / man["base"]
    data = {t: {"rows": str(args.cache / man["data"][t] / "val.jsonl"), "expert": str(args.cache / man["experts"][t])}
            for t in tasks}
    test = {t: {"rows": str(args.cache / man["data"][t] / "test.jsonl"), "expert": str(args.cache / man["experts"][t])}
            for t in tasks}
    tok = load_tokenizer(base)
    test_scorers = {t: make_scorers({"kind": "encoder_accuracy", "data": {t: test[t]}}, tokenizer=tok)[0] for t in tasks}

    def test_acc(folder: Path) -> dict[str, float]:
        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return {t: s(model) for t, s in test_scorers.items()}

    rows = []
    for opt in args.optimizers:
        cfg = {
            "base_model": str(base),
            "models": [{"model": str(args.cache / man["experts"][t])} for t in tasks],
            "merge_method": "bmm",
            "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3},
                           "statistics": "data_free", "blocks": args.blocks},
            "dtype": "float32",
            "out_dtype": "float32",
            "search": {"optimizer": opt, "budget": args.budget, "seed": args.seed, "rho_range": [1e-4, 10.0],
                       "scale_range": [1.0, 1.3], "full_top_k": 3,
                       "scorer": {"kind": "encoder_accuracy", "data": data, "proxy_size": args.proxy}},
        }
        t0 = time.perf_counter()
        res = bmmstream.search_merge(cfg, run_dir=args.out / opt, device="cpu", progress=False)
        wall = time.perf_counter() - t0
        acc = test_acc(res["output"])
        rows.append({"optimizer": opt, "val": res["best_score"], "test": acc, "evaluations": res["evaluations"],
                     "seconds": wall, "best": res["best_params"]})
        print(f"{opt:8s} val {res['best_score'] if res['best_score'] is not None else float('nan'):.4f}  "
              f"test mean {sum(acc.values()) / len(acc):.4f}  "
              + "  ".join(f"{t} {a:.3f}" for t, a in acc.items())
              + f"  evaluations {res['evaluations']}  {wall:.0f} s", flush=True)
    # references: the anchor alone (TA 0.3) and BMM at the default rho, no search
    for name, method, params in (("TA 0.3 (anchor)", "task_arithmetic", {"scale": 0.3}),
                                 ("BMM rho=0.01", "bmm", {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "rho": 0.01})):
        out = args.out / "refs" / method
        cfg = {"base_model": str(base), "models": [{"model": str(args.cache / man["experts"][t])} for t in tasks],
               "merge_method": method, "parameters": params, "dtype": "float32", "out_dtype": "float32"}
        path = bmmstream.merge(cfg, out=out / "model", run_dir=out / "run", device="cpu", progress=False)
        acc = test_acc(path)
        print(f"{name:16s} test mean {sum(acc.values()) / len(acc):.4f}  " + "  ".join(f"{t} {a:.3f}" for t, a in acc.items()))
    print(f"machine: {platform.machine()} python {platform.python_version()} torch {torch.__version__}, "
          f"budget {args.budget}, blocks {args.blocks}, proxy {args.proxy} rows/task")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
