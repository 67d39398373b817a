"""Does the outer search earn its trials? (issue 13) On the real suites built by tools/build_experts.py:

- every anchor alone (task arithmetic, TIES, TSV-M; each on a small grid picked on validation),
- BMM over the picked TSV-M anchor at its default damping (no search),
- `bmm search` over that BMM with each optimiser: the default staged design, the shared-rho `grid`
  baseline, seeded `random`, and the paper's GP-BO with expected improvement on the paper's
  search space (`paper_bo`, preset paper_llm), all at the same budget and over several seeds (the seed
  also draws the proxy subset of validation rows that most trials are scored on),

each scored once on the test split, with a 95% bootstrap CI of the mean test accuracy (rows resampled
within each task) and, for every search, the paired bootstrap CI of its difference to the grid
baseline of the same seed. At the point the staged search of the first seed chose, the paper's
posterior ensemble (App. B: S samples of the last MLP output matrix, beta chosen on validation by NLL)
is scored against the MAP model on the test split: accuracy, ECE (20 bins), NLL (a one-point search:
every range fixed at the point, `search.posterior` with `scorer:` the test split).

Everything is cached (results.json per suite, run directories per search), so a killed run resumes
and a rerun only prints.

    nice python bench/search_compare.py --suite encoder --seeds 0 1 2 --budget 20 --threads 1
    nice python bench/search_compare.py --suite decoder --seeds 0 1 2 --budget 12 --proxy 25 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANCHOR_GRIDS = {
    "task_arithmetic": [{"scale": s} for s in (0.3, 0.5, 0.7, 1.0)],
    "ties": [{"density": 0.2, "scale": s} for s in (0.7, 1.0, 1.3)],
    "tsv": [{"alpha": a} for a in (0.7, 1.0, 1.3)],
}
OPTIMIZERS = ["staged", "grid", "random", "paper_bo"]
# posterior precisions: on the encoder suite the ensemble's validation NLL moved by 1.6e-4 at beta 1e10 and less
# above (a first run over 1e10..1e14, all within noise of the MAP model); NLL shifts ~ 1/beta, so the
# informative range is 1e6..1e10
BETAS = [1e6, 1e7, 1e8, 1e9, 1e10]
BOOT = 2000


class Suite:
    """A suite folder of tools/build_experts.py: base, experts, per-task val/test JSONL.

    `val_extra` > 0 (decoder): validation is the suite's split plus that many rows per task the experts
    never saw (master training rows past the suite's training prefix), pooled under `extra_root`."""

    def __init__(self, cache: Path, name: str, val_extra: int = 0, extra_root: Path | None = None):
        self.name, self.dir = name, cache / name
        self.man = json.loads((self.dir / "manifest.json").read_text())
        self.tasks = list(self.man["experts"])
        self.base = self.dir / self.man["base"]
        self.experts = [self.dir / self.man["experts"][t] for t in self.tasks]
        self._tok = None
        self.tag, self.extra_dir = name, None
        if val_extra:
            if name != "decoder":
                raise SystemExit("--val-extra: only the decoder suite has unused training rows to add")
            self.tag, self.extra_dir = f"{name}_valx{val_extra}", extra_root / f"valx{val_extra}"
            self.extra_sizes = write_extra(self, cache, self.extra_dir, val_extra)

    def rows(self, task: str, split: str) -> str:
        if self.extra_dir is not None and split in ("val", "valx"):
            return str(self.extra_dir / task / f"{split}.jsonl")
        return self.suite_rows(task, split)

    def suite_rows(self, task: str, split: str) -> str:
        return str(self.dir / self.man["data"][task] / f"{split}.jsonl")

    def scorer_cfg(self, split: str, tasks: list[str] | None = None) -> dict:
        tasks = tasks or self.tasks
        if self.name == "encoder":
            data = {t: {"rows": self.rows(t, split), "expert": str(self.dir / self.man["experts"][t])} for t in tasks}
            return {"kind": "encoder_accuracy", "data": data}
        return {"kind": "label_likelihood", "data": {t: self.rows(t, split) for t in tasks}}

    def tokenizer(self):
        if self._tok is None:
            from bmmstream.statistics.calibration_data import load_tokenizer

            self._tok = load_tokenizer(self.base)
        return self._tok

    def load(self, folder: Path, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModel if self.name == "encoder" else AutoModelForCausalLM
        return cls.from_pretrained(folder, dtype=torch.float32).eval().to(device)

    def correct(self, folder: Path, split: str, device: str = "cpu") -> dict[str, list[int]]:
        """Per task, 0/1 correctness of every row of the split (what the bootstrap resamples)."""
        import torch

        from bmmstream.search.scorers import make_scorers

        model = self.load(folder, device)
        out = {}
        with torch.no_grad():
            for t in self.tasks:
                scorer = make_scorers(self.scorer_cfg(split, [t]), tokenizer=self.tokenizer())[0]
                _, rows = scorer.scored(model)  # one task: each row is its 0/1 correctness
                out[t] = [int(round(r)) for r in rows]
        return out


def write_extra(suite: Suite, cache: Path, out: Path, per_task: int) -> dict[str, int]:
    """Per task under `out`: valx.jsonl, master training rows past the suite's training prefix as
    prompts (disjoint from the suite's splits, checked), and val.jsonl, the suite's val + valx."""
    sys.path.insert(0, str(ROOT / "tools"))
    import build_experts as be

    tok = suite.tokenizer()
    sizes = {}
    for task in suite.tasks:
        own = {sp: be.read_jsonl(Path(suite.suite_rows(task, sp))) for sp in ("train", "val", "test")}
        rows = be.read_jsonl(cache / "data" / task / "train.jsonl")[len(own["train"]):len(own["train"]) + per_task]
        rows = be.prompt_rows(task, rows, tok, suite.man["tasks"][task]["max_text_tokens"])
        seen = {json.dumps(r, sort_keys=True) for split in own.values() for r in split}
        clash = sum(json.dumps(r, sort_keys=True) in seen for r in rows)
        if clash:
            raise SystemExit(f"{task}: {clash} extra validation rows are also in the suite's splits")
        (out / task).mkdir(parents=True, exist_ok=True)
        be.write_jsonl(out / task / "valx.jsonl", rows)
        be.write_jsonl(out / task / "val.jsonl", own["val"] + rows)
        sizes[task] = len(rows)
    return sizes


def safe(key: str) -> str:
    """A cache key as a folder name."""
    return re.sub(r"[^A-Za-z0-9=.,_-]+", "_", key).strip("_")


def mean_acc(correct: dict[str, list[int]]) -> float:
    return float(np.mean([np.mean(c) for c in correct.values()]))


def bootstrap(correct: dict[str, list[int]], other: dict[str, list[int]] | None = None, seed: int = 0
              ) -> tuple[float, float]:
    """95% percentile CI of the mean over tasks of test accuracy (rows resampled within each task);
    with `other`, of the paired difference correct - other on the same resampled rows."""
    rng = np.random.default_rng(seed)
    stats = np.zeros(BOOT)
    for t, c in correct.items():
        a = np.asarray(c, dtype=float) - (np.asarray(other[t], dtype=float) if other is not None else 0.0)
        idx = rng.integers(0, len(a), size=(BOOT, len(a)))
        stats += a[idx].mean(axis=1)
    stats /= len(correct)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def search_key(opt: str, seed: int, budget: int, proxy: int, blocks: int,
               stage1: tuple[int, int] | None = None, line: int | None = None) -> str:
    """The results cache's key of one search; a staged search with a stage-1 shape or line stage
    other than the default names them."""
    key = f"search:{opt}:seed{seed}:budget{budget}:proxy{proxy}:blocks{blocks}"
    if opt == "staged" and stage1 is not None:
        key += f":stage1={stage1[0]}x{stage1[1]}"
    if opt == "staged" and line is not None:
        key += f":line={line}"
    return key


class Bench:
    def __init__(self, suite: Suite, out: Path, device: str = "cpu", threads: int | None = None):
        """`threads`: the merges' and searches' CPU threads (bmmstream's `threads`; None: its default,
        every core). torch.set_num_threads in this process does not reach them: a run sets its own."""
        self.suite, self.out, self.device, self.threads = suite, out / suite.tag, device, threads
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "results.json"
        self.res = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:  # merged with the file: another bench process may have added entries
        if self.path.exists():
            self.res = {**json.loads(self.path.read_text()), **self.res}
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # two bench processes may save at once
        tmp.write_text(json.dumps(self.res, indent=1))
        tmp.replace(self.path)

    def cfg(self, method: str, params: dict) -> dict:
        s = self.suite
        return {"base_model": str(s.base), "models": [{"model": str(e)} for e in s.experts],
                "merge_method": method, "parameters": params, "dtype": "float32", "out_dtype": "float32"}

    def merge_scored(self, key: str, method: str, params: dict, splits=("val", "test")) -> dict:
        import bmmstream

        d = self.out / "merges" / safe(key)
        rec = self.res.get(key)
        if rec is not None and (all(sp in rec for sp in splits) or (d / "model" / "config.json").exists()):
            for sp in splits:  # a cached merge whose folder is still there only gains the missing splits
                if sp not in rec:
                    rec[sp] = self.suite.correct(d / "model", sp, self.device)
                    self.save()
            return rec
        t0 = time.perf_counter()
        path = bmmstream.merge(self.cfg(method, params), out=d / "model", run_dir=d / "run", device=self.device,
                               progress=False, threads=self.threads)
        rec = {"method": method, "params": params, "merge_s": time.perf_counter() - t0}
        for sp in splits:
            rec[sp] = self.suite.correct(path, sp, self.device)
        self.res[key] = rec
        self.save()
        return rec

    def anchors(self) -> dict[str, dict]:
        """Each anchor's grid point with the best mean validation accuracy, scored on test."""
        picked = {}
        for method, grid in ANCHOR_GRIDS.items():
            best = None
            for p in grid:
                key = f"{method}:" + ",".join(f"{k}={v}" for k, v in sorted(p.items()))
                rec = self.merge_scored(key, method, p, splits=("val",))
                if best is None or mean_acc(rec["val"]) > mean_acc(best[1]["val"]):
                    best = (key, rec)
            key, rec = best
            picked[method] = self.merge_scored(key, method, rec["params"], splits=("val", "test"))
        return picked

    def search(self, opt: str, seed: int, anchor: dict, budget: int, proxy: int, blocks: int,
               stage1: tuple[int, int] | None = None, line: int | None = None) -> dict:
        import bmmstream

        key = search_key(opt, seed, budget, proxy, blocks, stage1, line)
        if key in self.res:
            return self.res[key]
        s = self.suite
        scorer = {**s.scorer_cfg("val"), "proxy_size": proxy, "seed": seed}
        search = {"optimizer": opt, "budget": budget, "seed": seed, "full_top_k": 3, "scorer": scorer}
        if opt == "paper_bo":
            search["preset"] = "paper_llm"  # absolute lam log-uniform in [1e-3, 100], s in [1.0, 1.3]
        else:
            search.update(rho_range=[1e-4, 10.0], scale_range=[1.0, 1.3])
        if opt == "staged" and (stage1 is not None or line is not None):
            search["design"] = ({"stage1": list(stage1)} if stage1 is not None else {}) | (
                {"line": line} if line is not None else {})
        params = {"anchor": "tsv", "anchor_parameters": anchor["params"], "statistics": "data_free", "blocks": blocks}
        cfg = self.cfg("bmm", params) | {"search": search}
        d = self.out / "searches" / safe(key)
        t0 = time.perf_counter()
        r = bmmstream.search_merge(cfg, out=d / "model", run_dir=d / "run", device=self.device, progress=False,
                                   threads=self.threads)
        rec = {"optimizer": opt, "seed": seed, "anchor": anchor["params"], "val": r["best_score"], "best": r["best_params"],
               "evaluations": r["evaluations"], "search_s": time.perf_counter() - t0,
               "test": s.correct(Path(r["output"]), "test", self.device)}
        post = d / "run" / "search-report" / "posterior.json"
        if post.exists():  # runs made while the posterior rode along with the search
            rec["posterior"] = json.loads(post.read_text())
        self.res[key] = rec
        self.save()
        return rec


    def posterior_at(self, run: dict, anchor: dict, betas: list[float], samples: int,
                     cached_only: bool = False) -> dict | None:
        """The paper's posterior ensemble at a search's chosen point: a one-point search (every range
        fixed at the point, so nothing is searched) whose posterior report is on the test split. Its
        MAP model is the search's written model (checked: same test accuracy)."""
        import bmmstream

        (block,) = run["best"]["blocks"]
        rhos = {v for g, v in block["rho"].items() if g != "other"}
        if len(rhos) != 1:
            print(f"[{self.suite.name}] posterior: the chosen point has per-group rho {block['rho']}; "
                  "a one-point search cannot hold it, skipped", flush=True)
            return None
        rho, scale = rhos.pop(), block["scale"]
        key = f"posterior:{run['optimizer']}:seed{run['seed']}:rho{rho}:scale{scale}:S{samples}:betas{betas}"
        if key in self.res:
            return self.res[key]
        if cached_only:
            return None
        s = self.suite
        search = {"optimizer": "random", "budget": 1, "seed": 0, "full_top_k": 1, "rho_range": [rho, rho],
                  "scale_range": [scale, scale], "scorer": s.scorer_cfg("val"),
                  "posterior": {"samples": samples, "beta": betas, "seed": 0, "scorer": s.scorer_cfg("test")}}
        params = {"anchor": "tsv", "anchor_parameters": anchor["params"], "statistics": "data_free", "blocks": 1}
        d = self.out / "searches" / safe(key)
        t0 = time.perf_counter()
        r = bmmstream.search_merge(self.cfg("bmm", params) | {"search": search}, out=d / "model", run_dir=d / "run",
                                   device=self.device, progress=False, threads=self.threads)
        rec = json.loads((d / "run" / "search-report" / "posterior.json").read_text())
        rec["seconds"] = time.perf_counter() - t0
        rec["written_test"] = mean_acc(s.correct(Path(r["output"]), "test", self.device))
        self.res[key] = rec
        self.save()
        return rec


def fmt(correct: dict, ref: dict | None = None) -> str:
    lo, hi = bootstrap(correct)
    s = f"{100 * mean_acc(correct):5.1f} [{100 * lo:4.1f}, {100 * hi:4.1f}]"
    if ref is not None:
        dlo, dhi = bootstrap(correct, ref)
        s += f"  {100 * (mean_acc(correct) - mean_acc(ref)):+5.1f} [{100 * dlo:+4.1f}, {100 * dhi:+4.1f}]"
    return s


def report(bench: Bench, anchors: dict, bmm_default: dict, runs: dict, seeds: list[int], posts: list[dict],
           stage1: tuple[int, int] | None = None, line: int | None = None) -> str:
    s = bench.suite
    staged = "staged" + (f", stage1 {stage1[0]}x{stage1[1]}" if stage1 else "") + (f", line {line}" if line is not None else "")
    name_of = {o: o for o in OPTIMIZERS} | {"staged": staged}
    lines = [f"### {s.name} suite: {', '.join(s.tasks)}; test rows per task "
             + ", ".join(str(len(c)) for c in next(iter(anchors.values()))["test"].values())
             + (f"; the searches' validation split adds {s.extra_sizes} unseen rows per task (the anchors' and "
                "the default damping's val column is the suite's own split)" if s.tag != s.name else ""),
             "", "| model | val | test mean [95% CI] | per task | vs grid, same seed [95% CI] |", "|---|---|---|---|---|"]

    def row(name: str, val, test: dict, ref: dict | None = None) -> str:
        full = fmt(test, ref)
        main, diff = (full.split("  ", 1) + [""])[:2] if ref is not None else (full, "")
        tasks = " ".join(f"{t} {100 * np.mean(c):.1f}" for t, c in test.items())
        return f"| {name} | {val if isinstance(val, str) else f'{100 * val:.1f}'} | {main} | {tasks} | {diff} |"

    for m, rec in anchors.items():
        lines.append(row(f"{m} alone ({', '.join(f'{k}={v}' for k, v in rec['params'].items())})",
                         mean_acc(rec["val"]), rec["test"]))
    lines.append(row("BMM over TSV-M, default damping", mean_acc(bmm_default["val"]), bmm_default["test"]))
    for opt in OPTIMIZERS:
        for seed in seeds:
            r = runs.get((opt, seed))
            if r is None:
                continue
            g = runs.get(("grid", seed))
            lines.append(row(f"search {name_of[opt]} seed {seed}", r["val"] if r["val"] is not None else "-", r["test"],
                             g["test"] if g is not None and opt != "grid" else None))
    lines.append("")
    lines.append("| optimizer | mean test over seeds | min | max | seeds >= grid | seeds >= best anchor alone |")
    lines.append("|---|---|---|---|---|---|")
    best_anchor = max(mean_acc(a["test"]) for a in anchors.values())
    for opt in OPTIMIZERS:
        vals = [(seed, mean_acc(runs[(opt, seed)]["test"])) for seed in seeds if (opt, seed) in runs]
        if not vals:
            continue
        with_grid = [(seed, v) for seed, v in vals if ("grid", seed) in runs]  # seeds without a grid run: not counted
        ge_grid = sum(1 for seed, v in with_grid if v >= mean_acc(runs[("grid", seed)]["test"]))
        ge_anchor = sum(1 for _, v in vals if v >= best_anchor)
        ts = [v for _, v in vals]
        lines.append(f"| {name_of[opt]} | {100 * np.mean(ts):.1f} | {100 * min(ts):.1f} | {100 * max(ts):.1f} | "
                     f"{f'{ge_grid}/{len(with_grid)}' if with_grid else '-'} | {ge_anchor}/{len(vals)} |")
    for post in posts:
        cands = [c["beta"] for c in post.get("beta_candidates", [])]
        lines += ["", f"Posterior ensemble at the {post['at']} search's point (S={post['samples']}, beta={post['beta']:g} "
                  f"chosen on validation NLL from {cands}; modules {', '.join(post['modules'])}), test split"
                  + (f"; the one-point search's written model scores {100 * post['written_test']:.1f} on test"
                     if "written_test" in post else "") + ":", "",
                  "| model | accuracy | ECE (20 bins) | NLL |", "|---|---|---|---|",
                  f"| MAP (the written model) | {100 * post['map_accuracy']:.1f} | {post['map_ece']:.4f} | {post['map_nll']:.4f} |",
                  f"| posterior ensemble | {100 * post['accuracy']:.1f} | {post['ece']:.4f} | {post['nll']:.4f} |"]
        if "beta_candidates" in post:
            lines += ["", "beta candidates on validation: " + "; ".join(
                f"beta {c['beta']:g}: acc {100 * c['accuracy']:.1f}, ECE {c['ece']:.4f}, NLL {c['nll']:.4f}"
                for c in post["beta_candidates"])]
            from bmmstream.search.posterior import beta_choice_note

            chosen = next(c for c in post["beta_candidates"] if c["beta"] == post["beta"])
            note = post.get("beta_note") or beta_choice_note(chosen, tuple(cands))
            lines += [f"(validation: MAP model NLL {chosen['map_nll']:.4f})"] + ([f"Note: {note}."] if note else [])
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "tools" / "cache")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "search_compare")
    ap.add_argument("--suite", nargs="+", default=["decoder", "encoder"])
    ap.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--proxy", type=int, default=50, help="validation rows per task of the proxy scorer")
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage1", nargs=2, type=int, metavar=("N_RHO", "N_SCALE"),
                    help="the staged design's stage-1 lattice (default: the design's own by budget)")
    ap.add_argument("--line", type=int, help="the staged design's line-stage trials (default: the design's own)")
    ap.add_argument("--val-extra", type=int, default=0,
                    help="decoder: add this many unseen rows per task to the validation split the searches use "
                         "(results under <out>/decoder_valx<N>; anchors stay as picked on the suite's own split)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: merges, searches and test scoring")
    ap.add_argument("--no-posterior", action="store_true")
    ap.add_argument("--cached-only", action="store_true",
                    help="report the searches (and the posterior for --posterior-betas) already in results.json; run none")
    ap.add_argument("--posterior-betas", nargs="+", type=float, default=BETAS)
    ap.add_argument("--posterior-samples", type=int, default=10)
    args = ap.parse_args(argv)

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    for name in args.suite:
        suite = Suite(args.cache, name, args.val_extra, args.out / name)
        bench = Bench(suite, args.out, args.device, args.threads)
        # anchors and the default damping as picked and scored on the suite's own split (and cached there)
        own = bench if suite.tag == name else Bench(Suite(args.cache, name), args.out, args.device, args.threads)
        anchors = own.anchors()
        tsv = anchors["tsv"]
        bmm_default = own.merge_scored(f"bmm:tsv:{tsv['params']}", "bmm",
                                         {"anchor": "tsv", "anchor_parameters": tsv["params"], "statistics": "data_free"})
        runs = {}
        for seed in args.seeds:  # seed-major: a run cut short still has every optimiser at the first seeds
            for opt in args.optimizers:
                if args.cached_only and search_key(opt, seed, args.budget, args.proxy, args.blocks,
                                                   args.stage1, args.line) not in bench.res:
                    continue
                r = bench.search(opt, seed, tsv, args.budget, args.proxy, args.blocks, args.stage1, args.line)
                runs[(opt, seed)] = r
                print(f"[{name}] {opt:9s} seed {seed}: val {r['val'] if r['val'] is not None else float('nan'):.4f} "
                      f"test {fmt(r['test'])}  {r['search_s']:.0f} s", flush=True)
        posts = [dict(r["posterior"], at=f"{o} seed {sd} (in-search)") for (o, sd), r in sorted(runs.items())
                 if "posterior" in r]
        first = runs.get(("staged", args.seeds[0]))
        if first is not None and not args.no_posterior:
            p = bench.posterior_at(first, tsv, args.posterior_betas, args.posterior_samples, args.cached_only)
            if p is not None:
                posts.append(dict(p, at=f"staged seed {args.seeds[0]}"))
        text = report(bench, anchors, bmm_default, runs, args.seeds, posts, args.stage1, args.line)
        (bench.out / "report.md").write_text(text + "\n")
        print(text, flush=True)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} torch threads, python "
          f"{platform.python_version()}, torch {torch.__version__}; budget {args.budget}, proxy {args.proxy} "
          f"rows/task, blocks {args.blocks}; {time.perf_counter() - t_all:.0f} s", flush=True)


if __name__ == "__main__":
    main()
