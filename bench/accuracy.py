"""Accuracy benchmark on real experts: every merge method, and BMM over every anchor (Table 1 in miniature).

For each suite built by tools/build_experts.py (encoder: all-MiniLM-L6-v2 + task heads; decoder:
SmolLM2-135M-Instruct with label-likelihood scoring) this reports the test accuracy of
- the pretrained base and each individual expert on its own task,
- every method of the registry (hyperparameters picked by a small grid on the validation split),
- BMM with each of those methods as anchor (anchor at its picked hyperparameters; rho and scale
  picked on validation), data-free and, with --data-assisted, with calibration Grams from each
  task's unlabeled training texts.
Selection maximises the mean validation accuracy over tasks; only the picked configuration is
scored on test. Results are cached per configuration (results.json), so a killed run resumes.

    nice -n 10 python bench/accuracy.py --data-assisted --jobs 2   # both suites, writes bench/RESULTS.md
    python bench/accuracy.py --smoke                               # tiny CI run on tools/cache/smoke
With --jobs N the methods are split over N worker processes (one torch thread each by default) that
share each suite's result cache; the tables are then assembled from the cache.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bmmstream  # noqa: E402
from bmmstream.search import metrics as ev  # noqa: E402
from bmmstream.methods import method_names  # noqa: E402

# grids on the validation split; a method not listed runs at its defaults
GRIDS: dict[str, list[dict]] = {
    "task_arithmetic": [{"scale": s} for s in (0.3, 0.6, 1.0)],
    "ties": [{"density": 0.2, "scale": s} for s in (0.7, 1.2)],
    "dare": [{"p": 0.5, "combine": "task_arithmetic", "scale": s} for s in (0.3, 0.6)],
    "tsv": [{"alpha": a} for a in (0.7, 1.2)],
    "iso_c": [{"alpha": a} for a in (0.7, 1.2)],
    "iso_cts": [{"alpha": a} for a in (0.7, 1.2)],
}
# cheap methods first, so a run cut short still fills most of the table
ORDER = ["pretrained", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "dare", "poe_cauchy", "regmean", "wudi"]
SKIP = {"bmm", "external", "dare_linear"}  # bmm runs over every anchor; external needs a merged checkpoint;
# dare_linear is the "dare" row (combine=task_arithmetic) under another name
NEEDS_DATA = {"regmean"}
BMM_RHO = (0.01, 0.1, 1.0)
BMM_SCALE = (1.0,)
PRETTY = {
    "pretrained": "Pretrained", "task_arithmetic": "Task Arithmetic", "ties": "TIES", "dare": "DARE",
    "tsv": "TSV-M", "iso_c": "ISO-C", "iso_cts": "ISO-CTS", "wudi": "WUDI", "poe_cauchy": "Cauchy PoE",
    "regmean": "RegMean", "dare_ties": "DARE-TIES",
}


@dataclass
class Suite:
    name: str
    dir: Path
    tasks: list[str]
    val_limit: int
    _tok: object = None
    _batches: dict = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.dir / "base"

    def expert(self, task: str) -> Path:
        return self.dir / "experts" / task

    def rows(self, task: str, split: str) -> list[dict]:
        with open(self.dir / "data" / task / f"{split}.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return rows[: self.val_limit] if split == "val" else rows

    def tokenizer(self):
        from transformers import AutoTokenizer

        if self._tok is None:
            self._tok = AutoTokenizer.from_pretrained(str(self.base))
        return self._tok

    def load(self, folder: Path):
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModel if self.name == "encoder" else AutoModelForCausalLM
        return cls.from_pretrained(str(folder), dtype=torch.float32).eval()

    def score(self, model, task: str, split: str) -> float:
        if self.name == "decoder":
            return ev.label_likelihood_accuracy(model, self.tokenizer(), self.rows(task, split))
        from safetensors.torch import load_file

        info = json.loads((self.expert(task) / "task.json").read_text())
        key = (task, split)
        if key not in self._batches:
            self._batches[key] = ev.encoder_batches(self.tokenizer(), self.rows(task, split), info["labels"],
                                                    max_len=info["max_len"], batch_size=64)
        h = load_file(str(self.expert(task) / "head.safetensors"))
        return ev.encoder_accuracy(model, ev.linear_head(h["weight"], h["bias"]), self._batches[key])

    def evaluate(self, folder: Path, split: str, tasks: list[str] | None = None) -> dict[str, float]:
        model = self.load(folder)
        return {t: self.score(model, t, split) for t in (tasks or self.tasks)}


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def cache_key(method: str, params: dict, data: bool) -> str:
    return json.dumps([method, params, data], sort_keys=True)


class Bench:
    """Merges, scores and caches; one instance per suite."""

    def __init__(self, suite: Suite, out: Path, data_samples: int):
        self.suite = suite
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.cache_path = out / "results.json"
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        self.data_samples = data_samples

    def save(self) -> None:
        """Merge our entries into the file under a lock, so several processes can share one cache
        (e.g. two single-thread runs over disjoint --methods on the two cores)."""
        import fcntl

        with open(self.cache_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
            for k, v in disk.items():
                mine = self.cache.get(k)
                if mine is None or ("test" in v and "test" not in mine):
                    self.cache[k] = v
            tmp = self.cache_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.cache, indent=1, sort_keys=True))
            tmp.replace(self.cache_path)

    def config(self, method: str, params: dict, data: bool) -> dict:
        models = []
        for t in self.suite.tasks:
            m: dict = {"model": str(self.suite.expert(t))}
            if data:
                m["calibration"] = {"path": str(self.suite.dir / "data" / t / "train.jsonl"),
                                    "field": "text" if self.suite.name == "encoder" else "prompt",
                                    "samples": self.data_samples, "max_len": 128}
            models.append(m)
        return {"base_model": str(self.suite.base), "models": models, "merge_method": method,
                "parameters": params, "dtype": "float32", "out_dtype": "float32"}

    def merged(self, key: str, cfg: dict) -> tuple[Path, float]:
        folder = self.out / "models" / hashlib.sha1(key.encode()).hexdigest()[:12]
        run_dir = self.out / "runs" / folder.name
        for p in (folder, run_dir):
            if p.exists():
                shutil.rmtree(p)
        t0 = time.time()
        bmmstream.merge(cfg, out=folder, run_dir=run_dir, device="cpu", progress=False)
        shutil.rmtree(run_dir, ignore_errors=True)
        return folder, time.time() - t0

    def select(self, label: str, method: str, grid: list[dict], data: bool = False,
               realise=None, keep: Path | None = None) -> dict:
        """Score each grid point on val and the best on test; cached per configuration.

        The best-so-far merged folder is kept until the grid is done, so the winner is not merged twice.
        `realise` maps a grid point to the parameters actually merged (the cache key stays the grid
        point); `keep` moves the winner's folder there instead of deleting it.
        """
        realise = realise or (lambda p: p)
        best_key, best_folder = None, None
        for params in grid:
            key = cache_key(method, params, data)
            rec = self.cache.get(key)
            folder = None
            if rec is None or "val" not in rec:
                folder, secs = self.merged(key, self.config(method, realise(params), data))
                rec = {"label": label, "method": method, "params": params, "data": data,
                       "merge_seconds": secs, "val": self.suite.evaluate(folder, "val")}
                self.cache[key] = rec
                self.save()
                print(f"  [{self.suite.name}] {label} {fmt_params(params)}: val {mean(rec['val']):.4f} "
                      f"(merge {secs:.0f} s)", flush=True)
            if best_key is None or mean(rec["val"]) > mean(self.cache[best_key]["val"]):
                if best_folder is not None:
                    shutil.rmtree(best_folder)
                best_key, best_folder = key, folder
            elif folder is not None:
                shutil.rmtree(folder)
        rec = self.cache[best_key]
        if "test" not in rec or (keep is not None and not keep.exists()):
            if best_folder is None:
                best_folder, _ = self.merged(best_key, self.config(rec["method"], realise(rec["params"]), rec["data"]))
            if "test" not in rec:
                rec["test"] = self.suite.evaluate(best_folder, "test")
                self.save()
        if best_folder is not None:
            if keep is not None and not keep.exists():
                keep.parent.mkdir(parents=True, exist_ok=True)
                best_folder.rename(keep)
            else:
                shutil.rmtree(best_folder)
        return rec

    def pending(self, method: str, grid: list[dict], data: bool) -> bool:
        """Whether select() would merge anything (a point without val, or the winner without test)."""
        recs = [self.cache.get(cache_key(method, p, data)) for p in grid]
        if any(r is None or "val" not in r for r in recs):
            return True
        return "test" not in max(recs, key=lambda r: mean(r["val"]))

    def reference_rows(self) -> dict:
        """Pretrained base on every task and each expert on its own task (test and val)."""
        key = "__reference__"
        if key not in self.cache:
            s = self.suite
            base = {split: s.evaluate(s.base, split) for split in ("val", "test")}
            experts = {split: {t: s.evaluate(s.expert(t), split, [t])[t] for t in s.tasks}
                       for split in ("val", "test")}
            self.cache[key] = {"base": base, "experts": experts}
            self.save()
        return self.cache[key]


def run_suite(suite: Suite, out: Path, methods: list[str], rho: tuple, scales: tuple,
              data_assisted: bool, data_samples: int, smoke: bool, budget_s: float = float("inf"),
              cached_only: bool = False) -> dict:
    """cached_only: report what the cache holds, merge nothing (assembling after --jobs workers)."""
    t0 = time.time()
    bench = Bench(suite, out, data_samples)
    ref = bench.reference_rows()
    anchors: dict[str, dict] = {}
    bmm: dict[str, dict] = {}
    bmm_da: dict[str, dict] = {}
    skipped = []
    for m in methods:
        needs_data = m in NEEDS_DATA
        if needs_data and not data_assisted:
            continue
        if time.time() - t0 > budget_s:
            skipped.append(m)
            continue
        grid = GRIDS.get(m, [{}])
        if smoke:
            grid = grid[:1]
        kept = out / "anchors" / m
        anchor_pending = bench.pending(m, grid, needs_data)
        if cached_only and anchor_pending:
            skipped.append(m)
            continue
        best = bench.select(PRETTY.get(m, m), m, grid, data=needs_data, keep=kept if anchor_pending else None)
        bmm_grid = [{"anchor": m, "anchor_parameters": best["params"], "statistics": "data_free",
                     "rho": r, "scale": s} for r in rho for s in scales]
        da_grid = [dict(g, statistics="data_assisted") for g in bmm_grid] if data_assisted else []
        # BMM reads the anchor's merged checkpoint (method 'external') instead of recomputing it per
        # grid point: the same U up to float32 rounding of W_pre + U, and WUDI/PoE/TSV run once.
        if cached_only and (bench.pending("bmm", bmm_grid, needs_data) or bench.pending("bmm", da_grid, True)):
            anchors[m] = best
            skipped.append(f"BMM over {m}")
            continue
        if not kept.exists() and (bench.pending("bmm", bmm_grid, needs_data) or bench.pending("bmm", da_grid, True)):
            best = bench.select(PRETTY.get(m, m), m, grid, data=needs_data, keep=kept)
        anchors[m] = best

        def realise(params: dict, kept: Path = kept) -> dict:
            return dict(params, anchor="external", anchor_parameters={"path": str(kept)})

        bmm[m] = bench.select(f"BMM/{m}", "bmm", bmm_grid, data=needs_data, realise=realise)
        if data_assisted:
            bmm_da[m] = bench.select(f"BMM-DA/{m}", "bmm", da_grid, data=True, realise=realise)
        shutil.rmtree(kept, ignore_errors=True)
    return {"suite": suite.name, "tasks": suite.tasks, "reference": ref, "anchors": anchors,
            "bmm": bmm, "bmm_da": bmm_da, "not_run": skipped}


# -- report ----------------------------------------------------------------------------------------
def fmt_params(p: dict) -> str:
    keep = {k: v for k, v in p.items() if k not in ("anchor", "anchor_parameters", "statistics")}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


def table(res: dict) -> str:
    tasks = res["tasks"]
    head = "| Method | " + " | ".join(tasks) + " | Avg. | gain of BMM over anchor |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]

    def row(name: str, acc: dict, gain: str = "") -> str:
        cells = " | ".join(f"{100 * acc[t]:.1f}" for t in tasks)
        return f"| {name} | {cells} | {100 * mean(acc):.1f} | {gain} |"

    lines.append(row("Pretrained base", res["reference"]["base"]["test"]))
    lines.append(row("Individual experts", res["reference"]["experts"]["test"]))
    for m, a in res["anchors"].items():
        lines.append(row(f"{PRETTY.get(m, m)} ({fmt_params(a['params'])})", a["test"]))
        for tag, group in (("BMM data-free", res["bmm"]), ("BMM data-assisted", res["bmm_da"])):
            if m in group:
                b = group[m]
                gain = 100 * (mean(b["test"]) - mean(a["test"])) / mean(a["test"])
                lines.append(row(f"&nbsp;&nbsp;+ {tag} ({fmt_params(b['params'])})", b["test"], f"{gain:+.1f}%"))
    return "\n".join(lines)


def build_table(manifest: dict) -> str:
    """Per task: training size, base and expert test accuracy at build time, build seconds."""
    lines = ["| task | train / val / test | base test acc | expert test acc | build s |", "|---|---|---|---|---|"]
    for t, r in manifest["tasks"].items():
        lines.append(f"| {t} | {r['n_train']} / {r['n_val']} / {r['n_test']} | {100 * r['base_test_acc']:.1f} | "
                     f"{100 * r['expert_test_acc']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def chart(res: dict, path: Path) -> None:
    """Per task: each anchor, BMM data-free and (where run) data-assisted over it; expert and base lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = res["tasks"]
    names = list(res["anchors"])
    series = [("anchor", res["anchors"]), ("BMM data-free", res["bmm"])]
    if res.get("bmm_da"):
        series.append(("BMM data-assisted", res["bmm_da"]))
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.9), sharey=False)
    for ax, t in zip(axes, tasks):
        xs = range(len(names))
        vals = []
        for k, (label, group) in enumerate(series):
            ys = [100 * group[m]["test"][t] if m in group else 0 for m in names]
            vals += [y for y in ys if y > 0]
            ax.bar([x + (k - (len(series) - 1) / 2) * width for x in xs], ys, width, label=label)
        expert, base = 100 * res["reference"]["experts"]["test"][t], 100 * res["reference"]["base"]["test"][t]
        ax.axhline(expert, color="k", ls="--", lw=1, label="expert")
        ax.axhline(base, color="gray", ls=":", lw=1, label="base")
        vals += [expert, base]
        ax.set_ylim(max(0.0, min(vals) - 10), min(100.0, max(vals) + 5))
        ax.set_xticks(list(xs), [PRETTY.get(m, m) for m in names], rotation=60, ha="right", fontsize=7)
        ax.set_title(t)
        ax.set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"{res['suite']} suite: each anchor vs BMM over it")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_results_md(path: Path, section: str) -> None:
    """Replace (or append) the '## accuracy' section, leaving the rest of the file alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == "## accuracy"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section.rstrip("\n") + "\n\n" + "".join(lines[end:])
    path.write_text(text.rstrip("\n") + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=ROOT / "tools" / "cache")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "accuracy")
    p.add_argument("--suite", choices=["encoder", "decoder", "all"], default="all")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registry method")
    p.add_argument("--rho", nargs="+", type=float, default=list(BMM_RHO))
    p.add_argument("--scale", nargs="+", type=float, default=list(BMM_SCALE))
    p.add_argument("--val-limit", type=int, default=None, help="validation rows per task used for selection")
    p.add_argument("--data-assisted", action="store_true", help="add RegMean and data-assisted BMM")
    p.add_argument("--data-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-min", type=float, default=None,
                   help="per suite: start no new method after this many minutes (the table says which were not run)")
    p.add_argument("--smoke", action="store_true", help="tiny run on <cache>/smoke, no RESULTS.md update")
    p.add_argument("--results-md", type=Path, default=ROOT / "bench" / "RESULTS.md")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the RESULTS.md section and charts from the saved suite summaries")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the methods in this many worker processes (--threads each) sharing the result "
                        "cache, then assemble the tables here")
    p.add_argument("--no-report", action="store_true", help="leave RESULTS.md, summaries and charts alone (workers)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    given = {"cache": args.cache, "out": args.out}  # what workers get: they redo the smoke redirection
    if args.smoke:
        args.cache, args.out = args.cache / "smoke", args.out.with_name(args.out.name + "-smoke")
        args.methods = args.methods or ["task_arithmetic", "ties"]
        args.rho = args.rho[:1] if args.rho != list(BMM_RHO) else [0.01]
    methods = args.methods or sorted((m for m in method_names() if m not in SKIP),
                                     key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    suites = ["encoder", "decoder"] if args.suite == "all" else [args.suite]

    def make_suite(name: str) -> Suite:
        sdir = args.cache / name
        manifest = json.loads((sdir / "manifest.json").read_text())
        return Suite(name, sdir, list(manifest["tasks"]), args.val_limit or (8 if args.smoke else (100 if name == "encoder" else 40)))

    t_start = time.time()
    if args.report_only:
        suites = []
    elif args.jobs > 1:
        for name in suites:  # once here, not once per worker
            Bench(make_suite(name), args.out / name, args.data_samples).reference_rows()
        run_workers(args, methods, given)
    for name in suites:
        suite = make_suite(name)
        limit = suite.val_limit
        t0 = t_start if args.jobs > 1 else time.time()  # with workers: the whole command's wall time
        res = run_suite(suite, args.out / name, methods, tuple(args.rho), tuple(args.scale),
                        args.data_assisted, args.data_samples, args.smoke,
                        60 * args.budget_min if args.budget_min else float("inf"), cached_only=args.jobs > 1)
        if args.no_report:
            continue
        res.update(seconds=time.time() - t0, val_limit=limit, command=" ".join(sys.argv[1:]), jobs=args.jobs)
        (args.out / name / "summary.json").write_text(json.dumps(res, indent=1))
        png = (args.out / name / f"accuracy_{name}.png") if args.smoke else (ROOT / "bench" / f"accuracy_{name}.png")
        chart(res, png)
        print(table(res), flush=True)
    if args.report_only:
        for name in ("encoder", "decoder"):
            path = args.out / name / "summary.json"
            if path.exists():
                chart(json.loads(path.read_text()), ROOT / "bench" / f"accuracy_{name}.png")
    if not (args.smoke or args.no_report):
        update_results_md(args.results_md, results_section(args.cache, args.out))


# rough relative cost of a method's row (anchor grid + BMM grids) on the decoder suite, for balancing
COST = {"poe_cauchy": 4.0, "wudi": 2.5, "regmean": 1.5}


def run_workers(args, methods: list[str], given: dict[str, Path]) -> None:
    """Split the methods over args.jobs worker processes (longest first onto the least loaded) and
    wait for them; they share the per-suite result caches, so the tables are assembled afterwards
    from cached entries only. A worker that fails makes the whole command fail."""
    import subprocess

    slices: list[list[str]] = [[] for _ in range(args.jobs)]
    load = [0.0] * args.jobs
    for m in sorted(methods, key=lambda m: -COST.get(m, 1.0)):
        j = load.index(min(load))
        slices[j].append(m)
        load[j] += COST.get(m, 1.0)
    common = ["--cache", str(given["cache"]), "--out", str(given["out"]), "--suite", args.suite, "--threads", str(args.threads),
              "--data-samples", str(args.data_samples), "--rho", *map(str, args.rho), "--scale", *map(str, args.scale),
              "--no-report"]
    common += ["--data-assisted"] * args.data_assisted + ["--smoke"] * args.smoke
    if args.val_limit:
        common += ["--val-limit", str(args.val_limit)]
    if args.budget_min:
        common += ["--budget-min", str(args.budget_min)]
    procs = [subprocess.Popen([sys.executable, __file__, *common, "--methods", *sl]) for sl in slices if sl]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"accuracy: a worker failed (exit codes {codes})")


def results_section(cache: Path, out: Path) -> str:
    """The '## accuracy' section from every suite summary present (a suite run alone keeps the other's)."""
    body = ["## accuracy", "",
            "Real experts (`tools/build_experts.py`), every registry method and BMM over each as anchor; "
            "hyperparameters picked on the validation split (mean accuracy over tasks), test accuracy "
            "reported in %. Gain = relative change of the mean test accuracy of BMM over its anchor. "
            "Command: `nice -n 10 python tools/build_experts.py && nice -n 10 python bench/accuracy.py --data-assisted --jobs 2` "
            "(CPU only, 2 cores shared with other jobs). BMM reads its anchor from the anchor's merged checkpoint "
            "(method `external`), so an anchor is computed once per suite.", ""]
    for name in ("encoder", "decoder"):
        path = out / name / "summary.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        manifest = json.loads((cache / name / "manifest.json").read_text())
        body += [f"### {name} suite", "",
                 f"Experts built in {manifest['build_seconds'] / 60:.1f} min ({manifest['threads']} torch thread(s) on a shared 2-core CPU); "
                 "base = the pretrained model" + (" with each expert's own head" if name == "encoder" else "") + ":", "", build_table(manifest), "",
                 f"Benchmark: `bench/accuracy.py {res.get('command', '')}`, {res['seconds'] / 60:.1f} min"
                 + (f" for the whole command ({res['jobs']} worker processes)" if res.get("jobs", 1) > 1 else "")
                 + "; selection on "
                 f"{res.get('val_limit')} validation rows per task."
                 + (f" Not run (time budget, or needs data without --data-assisted): {', '.join(res['not_run'])}." if res["not_run"] else ""), "",
                 table(res), "", f"![{name}](accuracy_{name}.png)", ""]
    return "\n".join(body)

if __name__ == "__main__":
    main()
