"""BMM over one fixed anchor across rho, with val AND test for every point (issue 7's investigation on
either suite: is BMM below its anchor because of rho, because validation picks the wrong rho, or
because of the Gram weighting?).

The anchor is a merged checkpoint (method `external`), e.g. the one bench/accuracy.py keeps while it
runs BMM over that anchor, or any folder `bmm merge` wrote. "moved" is ||W_bmm - W_anchor|| /
||W_anchor - W_pre|| per module group (how far BMM goes from the anchor, relative to the anchor's
own update).

    nice python bench/rho_sweep.py --suite decoder --anchor-path A --label wudi --rho 0.01 0.1 1 10 [--normalize]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import Suite, mean  # noqa: E402

import bmmstream  # noqa: E402
from bmmstream.plan.layout import build_plan  # noqa: E402
from bmmstream.sources.local import LocalSource  # noqa: E402


def moved(base: LocalSource, anchor: Path, merged: Path, groups: dict[str, str]) -> dict[str, float]:
    a, b = LocalSource(anchor), LocalSource(merged)
    acc = defaultdict(lambda: [0.0, 0.0])
    for n, g in groups.items():
        w0, wa, wb = base.get(n).double(), a.get(n).double(), b.get(n).double()
        acc[g][0] += float((wb - wa).norm() ** 2)
        acc[g][1] += float((wa - w0).norm() ** 2)
    return {g: (v[0] / v[1]) ** 0.5 for g, v in sorted(acc.items()) if v[1] > 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "tools" / "cache")
    ap.add_argument("--suite", choices=["encoder", "decoder"], default="decoder")
    ap.add_argument("--anchor-path", type=Path, required=True)
    ap.add_argument("--label", default="anchor")
    ap.add_argument("--rho", nargs="+", type=float, default=[0.01, 0.1, 1.0, 10.0])
    ap.add_argument("--normalize", action="store_true", help="also sweep with normalize_tasks: true")
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "rho_sweep")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sdir = args.cache / args.suite
    manifest = json.loads((sdir / "manifest.json").read_text())
    suite = Suite(args.suite, sdir, list(manifest["tasks"]), args.val_limit or (100 if args.suite == "encoder" else 40))
    base = LocalSource(suite.base)
    plan = build_plan(base.config(), base.tensor_infos())
    groups = {m.name: m.group for m in plan.modules if m.kind == "linear"}

    def line(name: str, val: dict, test: dict, extra: str = "") -> None:
        print(f"   {name:28s} val {mean(val):.4f}  test {mean(test):.4f}  "
              + " ".join(f"{t} {v:.3f}" for t, v in test.items()) + extra, flush=True)

    line(args.label, suite.evaluate(args.anchor_path, "val"), suite.evaluate(args.anchor_path, "test"))
    for norm in ([False, True] if args.normalize else [False]):
        for rho in args.rho:
            out = args.out / f"{args.label}-rho{rho}-{int(norm)}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = {"base_model": str(suite.base), "models": [{"model": str(suite.expert(t))} for t in suite.tasks],
                   "merge_method": "bmm", "dtype": "float32", "out_dtype": "float32",
                   "parameters": {"anchor": "external", "anchor_parameters": {"path": str(args.anchor_path)},
                                  "rho": rho, "normalize_tasks": norm}}
            folder = bmmstream.merge(cfg, out=out / "model", run_dir=out / "run", device="cpu", progress=False)
            mv = moved(base, args.anchor_path, Path(folder), groups)
            line(f"+ BMM rho={rho:g}{' norm' if norm else ''}", suite.evaluate(Path(folder), "val"),
                 suite.evaluate(Path(folder), "test"), "   moved: " + "  ".join(f"{g} {v:.2f}" for g, v in mv.items()))
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
