"""Why BMM does or does not beat its anchor on the real encoder suite (issue 7's investigation).

Measures, on the four MiniLM experts: (1) each expert's task-vector norm per module group (the raw
data-free Gram weighs task t by ||U_t||^2); (2) for chosen anchors, BMM at several rho with the raw
(paper) Gram sum and with per-task normalised Grams (`normalize_tasks: true`), validation and test
accuracy per task, rho picked on validation; (3) how far BMM moves each group from the anchor,
||W_bmm - W_anchor|| / ||W_anchor - W_pre||.

    nice python bench/investigate_bmm.py [--anchors tsv ties wudi] [--rho 0.01 0.1 1.0] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ANCHORS = {"tsv": {"alpha": 1.2}, "ties": {"density": 0.2, "scale": 0.7}, "task_arithmetic": {"scale": 1.0},
           "iso_c": {"alpha": 0.7}, "dare": {"p": 0.5, "combine": "task_arithmetic", "scale": 0.3}, "wudi": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=ROOT / "tools" / "cache" / "encoder")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "investigate")
    ap.add_argument("--anchors", nargs="+", default=["tsv", "ties"])
    ap.add_argument("--rho", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoModel

    import bmmstream
    from rho_sweep import moved
    from bmmstream.statistics.calibration_data import load_tokenizer
    from bmmstream.plan.layout import build_plan
    from bmmstream.search.scorers import make_scorers
    from bmmstream.sources.local import LocalSource

    torch.set_num_threads(args.threads)
    man = json.loads((args.cache / "manifest.json").read_text())
    tasks = list(man["experts"])
    base_dir = args.cache / man["base"]
    experts = [args.cache / man["experts"][t] for t in tasks]
    tok = load_tokenizer(base_dir)
    scorers = {split: {t: make_scorers({"kind": "encoder_accuracy", "data": {t: {
        "rows": str(args.cache / man["data"][t] / f"{split}.jsonl"), "expert": str(args.cache / man["experts"][t])}}},
        tokenizer=tok)[0] for t in tasks} for split in ("val", "test")}
    base = LocalSource(base_dir)
    plan = build_plan(base.config(), base.tensor_infos())
    groups = {m.name: m.group for m in plan.modules if m.kind == "linear"}

    print("1) task-vector norms ||U_t||_F per group (raw data-free G weighs task t by ||U_t||^2)")
    for t, e in zip(tasks, experts):
        src, acc = LocalSource(e), defaultdict(float)
        for n, g in groups.items():
            acc[g] += float((src.get(n).double() - base.get(n).double()).norm() ** 2)
        print(f"   {t:13s} " + "  ".join(f"{g} {v ** 0.5:.3f}" for g, v in sorted(acc.items()) if v > 0)
              + f"  total {sum(acc.values()) ** 0.5:.3f}")

    def merged(method, params, name):
        out = args.out / name
        cfg = {"base_model": str(base_dir), "models": [{"model": str(e)} for e in experts], "merge_method": method,
               "parameters": params, "dtype": "float32", "out_dtype": "float32"}
        return bmmstream.merge(cfg, out=out / "model", run_dir=out / "run", device="cpu", progress=False)

    def score(folder):
        m = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return {s: {t: sc(m) for t, sc in d.items()} for s, d in scorers.items()}

    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    print("\n2) BMM over each anchor: mean val / mean test, per-task test; rho picked on validation")
    rows = []
    for a in args.anchors:
        pa = ANCHORS[a]
        fa = merged(a, pa, a)
        sa = score(fa)
        print(f"   {a:24s} val {mean(sa['val']):.4f}  test {mean(sa['test']):.4f}  "
              + " ".join(f"{t} {v:.3f}" for t, v in sa["test"].items()))
        for norm in (False, True):
            best = None
            for rho in args.rho:
                name = f"{a}-bmm-rho{rho}-{'norm' if norm else 'raw'}"
                # the anchor is read from its merged checkpoint: WUDI/TSV are not recomputed per point
                f = merged("bmm", {"anchor": "external", "anchor_parameters": {"path": str(fa)}, "rho": rho,
                                   "normalize_tasks": norm}, name)
                s = score(f)
                mv = "  ".join(f"{g} {v:.2f}" for g, v in moved(base, Path(fa), Path(f), groups).items())
                print(f"   + BMM rho={rho:<6g} {'norm' if norm else 'raw ':4s} val {mean(s['val']):.4f}  test {mean(s['test']):.4f}  "
                      + " ".join(f"{t} {v:.3f}" for t, v in s["test"].items()) + f"   moved from anchor: {mv}", flush=True)
                if best is None or mean(s["val"]) > best[0]:
                    best = (mean(s["val"]), rho, s)
            rows.append((a, norm, best[1], mean(best[2]["test"]), mean(sa["test"])))
    print("\n3) picked on validation:")
    for a, norm, rho, test, anchor_test in rows:
        print(f"   {a:16s} {'normalize_tasks' if norm else 'raw Gram sum   '} rho={rho:<6g} test {test:.4f} "
              f"vs anchor {anchor_test:.4f} ({100 * (test / anchor_test - 1):+.1f}%)")


if __name__ == "__main__":
    main()
