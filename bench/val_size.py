"""Would a larger validation split let the search choose as test does? (issue 13, the decoder suite)

On the real decoder suite the searches' choices scored below BMM at its default damping on test, and
validation (100/100/67 rows) ranked 14 models almost unlike test (Spearman 0.09). This scores the
grid's own damping line (BMM over the picked TSV-M anchor, one damping for every group, scale 1.0,
the 9 log-spaced points of `grid` over [1e-4, 10]) plus the default damping on three splits: the
suite's validation split, an extra validation split of rows the experts never saw (the master
training rows past the decoder's 128-row training prefix: 300 per task, party has 44), and test.
It prints which point each validation split would choose and how each ranks the line against test.

    nice python bench/val_size.py --threads 2            # cached in the decoder's results.json
    python bench/val_size.py --cached-only               # the points scored so far

The line's points are the same merges a search makes (rho for attn_in/attn_out/mlp_in/mlp_out, the
rest at the default 0.01), so the staged seed-0 choice (rho 0.0316) must score its cached test figure.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from search_compare import Bench, Suite, bootstrap, mean_acc, write_extra  # noqa: E402

GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
LINE = [float(f"{v:.6g}") for v in np.logspace(-4, 1, 9)]


class ExtraSuite(Suite):
    """The decoder suite with one more split, `valx`, kept outside the suite's own folder."""

    def __init__(self, cache: Path, extra_dir: Path):
        super().__init__(cache, "decoder")
        self.extra_dir = extra_dir

    def rows(self, task: str, split: str) -> str:
        if split == "valx":
            return str(self.extra_dir / task / "valx.jsonl")
        return self.suite_rows(task, split)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def pooled(*splits: dict) -> dict:
    return {t: sum((s[t] for s in splits), []) for t in splits[0]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "tools" / "cache")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "search_compare")
    ap.add_argument("--extra", type=int, default=300, help="extra validation rows per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cached-only", action="store_true", help="report the points already scored on every split")
    args = ap.parse_args(argv)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    suite = ExtraSuite(args.cache, args.out / "decoder" / f"valx{args.extra}")
    sizes = write_extra(suite, args.cache, suite.extra_dir, args.extra)
    bench = Bench(suite, args.out, threads=args.threads)
    tsv = bench.anchors()["tsv"]["params"]
    splits = ("val", "valx", "test")
    points = [(f"rho {r:g}", f"line:tsv{tsv}:rho={r:g}:scale=1.0",
               {"anchor": "tsv", "anchor_parameters": tsv, "statistics": "data_free",
                "rho": {g: r for g in GROUPS}, "scale": 1.0}) for r in LINE]
    points.append(("default damping (rho 0.01 everywhere)", f"bmm:tsv:{tsv}",
                   {"anchor": "tsv", "anchor_parameters": tsv, "statistics": "data_free"}))
    recs = []
    for name, key, params in points:
        if args.cached_only and not all(sp in bench.res.get(key, {}) for sp in splits):
            print(f"{name:40s} not scored on every split yet, left out")
            continue
        rec = bench.merge_scored(key, "bmm", params, splits)
        recs.append((name, rec))
        print(f"{name:40s} val {100 * mean_acc(rec['val']):5.1f}  valx {100 * mean_acc(rec['valx']):5.1f}  "
              f"test {100 * mean_acc(rec['test']):5.1f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    if not recs:
        raise SystemExit("no point is scored on every split yet: run without --cached-only")
    rows_of = {sp: sum(len(c) for c in recs[0][1][sp].values()) for sp in splits}
    print(f"\nextra validation rows per task: {sizes}; rows: val {rows_of['val']}, valx {rows_of['valx']}, "
          f"test {rows_of['test']}")
    print("\n| point | val | valx | val+valx | test [95% CI] |\n|---|---|---|---|---|")
    for name, r in recs:
        lo, hi = bootstrap(r["test"])
        print(f"| {name} | {100 * mean_acc(r['val']):.1f} | {100 * mean_acc(r['valx']):.1f} | "
              f"{100 * mean_acc(pooled(r['val'], r['valx'])):.1f} | {100 * mean_acc(r['test']):.1f} "
              f"[{100 * lo:.1f}, {100 * hi:.1f}] |")
    line = [(n, r) for n, r in recs if n.startswith("rho ")]
    test = [mean_acc(r["test"]) for _, r in line]
    print(f"\nover {len(line)} of the line's {len(LINE)} points (scale 1.0):")
    for label, score in (("val", lambda r: mean_acc(r["val"])), ("valx", lambda r: mean_acc(r["valx"])),
                         ("val+valx", lambda r: mean_acc(pooled(r["val"], r["valx"])))):
        s = [score(r) for _, r in line]
        i = int(np.argmax(s))
        print(f"  {label:9s} chooses {line[i][0]:12s} (test {100 * test[i]:.1f}; best test on the line "
              f"{100 * max(test):.1f} at {line[int(np.argmax(test))][0]}); Spearman with test {spearman(s, test):+.2f}")
    print(f"\n{time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
