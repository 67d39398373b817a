"""The outer search loop: ask a point, score it (or take its cached score), tell, record; resumable.

`run_search` knows nothing about models: `evaluate(params) -> float` (higher is better) is given by
the caller, who applies the point to a resident merged model and scores it; it may also return
`(score, rows)` or `{"score": ..., "rows": [...]}` with per-row scores, which the staged design uses
to estimate validation noise (they are kept in the history and the score cache). The loop:

1. asks up to `num_workers` points from the optimiser (`staged`, the default, see design.py;
   nevergrad; `paper_bo`, GP-based BO with expected improvement; the `grid` / `random` baselines),
2. for each: replays it from the history (resume), or takes its score from the score cache, or
   evaluates it (`proxy_evaluate` if given, else `evaluate`), stores the score in the cache at once,
3. appends the batch to the history in trial order, then tells the optimiser (nevergrad minimises,
   so it is told -score),
4. after `budget` trials, when a proxy was used, re-scores the `full_top_k` best distinct points
   with `evaluate` (phase "final"); the final choice is the best full-fidelity score.

Resume is a deterministic replay: the optimiser is rebuilt with the same seed, asked the same
sequence and told the recorded scores, so its state after the replay equals the state of an
uninterrupted run. Each re-asked point is compared with the recorded one; a difference stops the
search with an error instead of silently diverging.

With `submit` (evaluations run elsewhere: Ray actors, search/run.py) the search phase keeps
`num_workers` trials in flight and tells each as its result arrives (`_search_async`); the history
is then in arrival order and records each trial's ask index, which is what a resume replays.
"""
from __future__ import annotations

import concurrent.futures
import difflib
import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bmmstream.errors import BmmError
from bmmstream.output.writer import write_json_atomic
from bmmstream.search.design import DesignOptions, StagedAsker, line_trials, stage1_shape
from bmmstream.search.history import History, ScoreCache, Trial, cache_key
from bmmstream.search.space import SearchSpace

log = logging.getLogger("bmmstream.search")

BASELINES = ("grid", "random")
# evaluation elsewhere (Ray workers): submit(fidelity, point) -> a future of (evaluate's answer, seconds)
Submit = Callable[[str, dict], concurrent.futures.Future]
DESIGNS = ("staged", "paper_bo")  # our own names beside nevergrad's


@dataclass
class SearchResult:
    best_params: dict  # the final choice, canonical plain point
    best_score: float  # its score at `best_fidelity`
    best_fidelity: str  # "full" (always, when evaluate is the full scorer)
    best_trial: int  # index of the trial that holds the final choice
    trials: list[Trial]  # every trial, search phase then final phase
    search_dir: Path  # <run_dir>/search/<search id>: history.jsonl, meta.json, report files
    evaluations: int  # evaluations this call actually ran (not replayed, not cached)
    optimizer: str


# -- optimisers with one tiny interface ------------------------------------------------------------
class _Asker:
    def ask(self) -> tuple[Any, dict]:
        raise NotImplementedError

    def ask_batch(self, n: int) -> list[tuple[Any, dict]]:
        return [self.ask() for _ in range(n)]

    def tell(self, handle: Any, score: float, rows: list[float] | None = None, params: dict | None = None) -> None:
        pass

    def eligible(self, params: dict) -> bool:
        """Whether a point may be the search's choice (the staged design's noise guard)."""
        return True

    def close(self) -> None:
        pass


class _GridAsker(_Asker):
    def __init__(self, space: SearchSpace, budget: int):
        self.points, self.i = space.grid(budget), 0

    def ask(self):
        p = self.points[self.i]
        self.i += 1
        return None, p


class _RandomAsker(_Asker):
    def __init__(self, space: SearchSpace, seed: int):
        self.space, self.rng = space, np.random.default_rng(seed)

    def ask(self):
        return None, self.space.random_point(self.rng)


def optimizer_names() -> list[str]:
    import nevergrad as ng

    return sorted(ng.optimizers.registry)


def check_optimizer(name: str) -> None:
    """BmmError naming close matches when `name` is neither a baseline nor a nevergrad optimiser."""
    if name in BASELINES or name in DESIGNS:
        return
    names = optimizer_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BmmError(
        f"search.optimizer: unknown optimizer '{name}'{hint}; use staged, paper_bo, grid, random, or a "
        f"nevergrad optimizer name such as NGOpt, CMA, BO, TwoPointsDE, RandomSearch"
    )


class _NevergradAsker(_Asker):
    def __init__(self, space: SearchSpace, name: str, budget: int, seed: int, num_workers: int):
        import nevergrad as ng

        self.space = space
        # paper_bo: the paper's outer optimiser, a GP with expected improvement (bayes_opt backend)
        family = (ng.optimizers.ParametrizedBO(utility_kind="ei") if name == "paper_bo"
                  else ng.optimizers.registry[name])
        self.opt = family(parametrization=space.parametrization(seed), budget=budget, num_workers=num_workers)

    def ask(self):
        cand = self.opt.ask()
        return cand, self.space.to_params(cand.value)

    def tell(self, handle, score, rows=None, params=None):
        self.opt.tell(handle, -score if math.isfinite(score) else math.inf)

    def close(self):
        _stop_threads(self.opt, set())


def _stop_threads(obj: Any, seen: set[int]) -> None:
    """Stop the background threads of recast (scipy-backed) nevergrad optimisers, which would
    otherwise block the interpreter's exit while waiting for a tell."""
    import nevergrad as ng

    if id(obj) in seen:
        return
    seen.add(id(obj))
    thread = getattr(obj, "_messaging_thread", None)
    if thread is not None:
        thread.stop()
    for v in vars(obj).values():
        for x in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(x, ng.optimizers.base.Optimizer):
                _stop_threads(x, seen)


def _nevergrad_version() -> str:
    import nevergrad as ng

    return str(getattr(ng, "__version__", "unknown"))


def _make_asker(space, optimizer, budget, seed, num_workers, design: DesignOptions | None = None):
    if optimizer == "staged":
        return StagedAsker(space, budget, seed, design)
    if optimizer == "grid":
        return _GridAsker(space, budget)
    if optimizer == "random" or space.dimension == 0:  # nothing to search: every ask is the one point
        return _RandomAsker(space, seed)
    return _NevergradAsker(space, optimizer, budget, seed, num_workers)


# -- the loop ----------------------------------------------------------------------------------------
def _search_id(meta: dict) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
    return f"{meta['optimizer']}-seed{meta['seed']}-budget{meta['budget']}-{h}"


class _Scorer:
    """Cache-aware evaluation at one fidelity; counts the evaluations it runs."""

    def __init__(self, fn: Callable[[dict], float], fidelity: str, scorer_id: str, data_hash: str,
                 context: str, cache: ScoreCache):
        self.fn, self.fidelity, self.scorer_id = fn, fidelity, scorer_id
        self.data_hash, self.context, self.cache = data_hash, context, cache
        self.evaluations = 0
        self._lock = threading.Lock()  # pool threads share the counter and the cache file

    def key(self, params: dict) -> str:
        return cache_key(params, self.scorer_id, self.data_hash, self.context)

    def run(self, params: dict) -> tuple[float, float, list[float] | None]:
        """Evaluate for real (no cache lookup); store the score (and rows) in the cache at once."""
        t0 = time.perf_counter()
        raw = self.fn(params)
        return self.record(params, raw, time.perf_counter() - t0)

    def record(self, params: dict, raw: Any, seconds: float) -> tuple[float, float, list[float] | None]:
        """An evaluation's answer (run here or by a remote worker) into the cache, at once."""
        score, rows = split_score(raw, self.fidelity)
        with self._lock:
            self.evaluations += 1
            self.cache.put(self.key(params), score, rows, fidelity=self.fidelity, scorer=self.scorer_id,
                           seconds=seconds)
        return score, seconds, rows


def split_score(raw: Any, fidelity: str = "full") -> tuple[float, list[float] | None]:
    """A scorer's answer -> (score, per-row scores or None): a number, (score, rows) or
    {"score": score, "rows": rows}."""
    rows = None
    if isinstance(raw, dict) and "score" in raw:
        raw, rows = raw["score"], raw.get("rows")
    elif isinstance(raw, (tuple, list)) and len(raw) == 2:
        raw, rows = raw
    try:
        score = float(raw)
    except (TypeError, ValueError):
        raise BmmError(f"search: the {fidelity} scorer returned {raw!r}, expected a number") from None
    try:
        rows = None if rows is None else [float(r) for r in rows]
    except (TypeError, ValueError):
        raise BmmError(f"search: the {fidelity} scorer's per-row scores are not a list of numbers") from None
    return score, rows


def _score_batch(
    points: list[tuple[int, str, dict]], scorer: _Scorer, history: History, pool, submit: Submit | None = None
) -> list[Trial]:
    """Trials for (index, phase, params): replayed from history, cached, or evaluated (in parallel
    when a pool or `submit` is given). History records are appended in index order."""
    out: dict[int, Trial] = {}
    todo: dict[str, list[tuple[int, str, dict]]] = {}
    for idx, phase, params in points:
        if idx < len(history):
            rec = history.trials[idx]
            if rec.params != params or rec.phase != phase or rec.fidelity != scorer.fidelity:
                raise BmmError(
                    f"search resume: trial {idx} re-asked {phase} point {params} at {scorer.fidelity} fidelity, "
                    f"but the history in {history.log.path} recorded {rec.phase} point {rec.params} at "
                    f"{rec.fidelity} fidelity; the optimiser did not replay deterministically "
                    f"(different nevergrad version?) - start a new run directory"
                )
            out[idx] = rec
            continue
        key = scorer.key(params)
        score = scorer.cache.get(key)
        if score is not None:
            rows = scorer.cache.rows(key)
            out[idx] = Trial(idx, phase, params, scorer.fidelity, score, 0.0, cached=True, key=key,
                             extra={"rows": rows} if rows is not None else {})
        else:
            todo.setdefault(key, []).append((idx, phase, params))
    groups = list(todo.items())
    if submit is not None:
        futures = [submit(scorer.fidelity, g[1][0][2]) for g in groups]
        results = [scorer.record(g[1][0][2], *f.result()) for g, f in zip(groups, futures)]
    elif pool is not None and len(groups) > 1:
        results = list(pool.map(lambda g: scorer.run(g[1][0][2]), groups))
    else:
        results = [scorer.run(g[1][0][2]) for g in groups]
    for (key, members), (score, seconds, rows) in zip(groups, results):
        for n, (idx, phase, params) in enumerate(members):  # duplicates in one batch: evaluated once
            out[idx] = Trial(idx, phase, params, scorer.fidelity, score, seconds if n == 0 else 0.0,
                             cached=n > 0, key=key, extra={"rows": rows} if rows is not None else {})
    trials = [out[idx] for idx, _, _ in points]
    for t in trials:
        if t.trial == len(history):
            history.append(t)
    return trials


def _search_async(asker: _Asker, scorer: _Scorer, history: History, submit: Submit, budget: int,
                  num_workers: int) -> list[Trial]:
    """The search phase with `num_workers` trials in flight: a trial is told as soon as its result
    arrives and the freed slot is asked at once (the staged design, which decides between batches,
    is asked a new batch only when every point it was given has been told).

    History records are appended in the order the results were told; each keeps the index of its
    ask (extra["ask"], when num_workers > 1). A resumed search replays that order: the optimiser is
    asked and told in the recorded interleaving, so its state equals the uninterrupted run's. Among
    results ready together, the earliest ask is told first (so evaluations done in this process,
    one at a time, give one fixed order)."""
    batched = isinstance(asker, StagedAsker)
    pending: dict[int, tuple[Any, dict]] = {}  # ask index -> (handle, params), not told yet
    running: dict[str, tuple[concurrent.futures.Future, dict]] = {}  # cache key -> (evaluation in flight, point)
    fresh: dict[str, float] = {}  # keys evaluated by this call and not told yet -> seconds
    trials: list[Trial] = []
    asked = 0
    while len(trials) < budget:
        room = min(num_workers - len(pending), budget - asked)
        if room > 0 and (not batched or not pending):
            for handle, params in asker.ask_batch(room) if batched else [asker.ask() for _ in range(room)]:
                pending[asked] = (handle, params)
                asked += 1
        n = len(trials)
        if n < len(history):  # replay: the recorded trial, told in its recorded place
            rec = history.trials[n]
            a = int(rec.extra.get("ask", n))
            if a not in pending or rec.params != pending[a][1] or rec.phase != "search" \
                    or rec.fidelity != scorer.fidelity:
                got = pending[a][1] if a in pending else None
                raise BmmError(
                    f"search resume: trial {n} (ask {a}) re-asked search point {got} at {scorer.fidelity} "
                    f"fidelity, but the history in {history.log.path} recorded {rec.phase} point {rec.params} at "
                    f"{rec.fidelity} fidelity; the optimiser did not replay deterministically "
                    f"(different nevergrad version?) - start a new run directory")
            t = rec
        else:
            for handle, params in pending.values():
                key = scorer.key(params)
                if key not in running and key not in fresh and scorer.cache.get(key) is None:
                    running[key] = (submit(scorer.fidelity, params), params)
            for key in [k for k, (f, _) in running.items() if f.done()]:
                f, params = running.pop(key)
                raw, seconds = f.result()  # a worker's error is raised here
                scorer.record(params, raw, seconds)
                fresh[key] = seconds
            ready = [a for a, (_, p) in pending.items() if scorer.cache.get(scorer.key(p)) is not None]
            if not ready:
                concurrent.futures.wait([f for f, _ in running.values()],
                                        return_when=concurrent.futures.FIRST_COMPLETED)
                continue
            a = min(ready)
            params = pending[a][1]
            key = scorer.key(params)
            rows = scorer.cache.rows(key)
            extra = {"ask": a} if num_workers > 1 else {}
            if rows is not None:
                extra["rows"] = rows
            seconds = fresh.pop(key, None)
            t = Trial(n, "search", params, scorer.fidelity, scorer.cache.get(key), seconds or 0.0,
                      cached=seconds is None, key=key, extra=extra)
            history.append(t)
        handle, _ = pending.pop(a)
        asker.tell(handle, t.score, t.extra.get("rows"), t.params)
        log.info("trial %d/%d %s score %.6g%s", t.trial + 1, budget, t.fidelity, t.score,
                 " (cached)" if t.cached else "")
        trials.append(t)
    return trials


def _rank_key(t: Trial) -> tuple:
    return (-(t.score if math.isfinite(t.score) else -math.inf), t.trial)


def run_search(
    space: SearchSpace,
    evaluate: Callable[[dict], float],
    *,
    optimizer: str = "staged",
    budget: int,
    seed: int = 0,
    run_dir: str | Path,
    proxy_evaluate: Callable[[dict], float] | None = None,
    full_top_k: int = 3,
    num_workers: int = 1,
    scorer_id: str = "full",
    proxy_scorer_id: str = "proxy",
    data_hash: str = "",
    context: str = "",
    write_report: bool = True,
    design: dict | DesignOptions | None = None,
    submit: Submit | None = None,
) -> SearchResult:
    """Maximise `evaluate(point)` over `space` with `budget` trials; resumable from `run_dir`.

    - optimizer: "staged" (shared lattice, then noise-guarded per-group refinement; `design` holds
      its options, see `DesignOptions`), "paper_bo" (GP BO with expected improvement), "grid" (one
      shared damping on a log grid of `budget` points, scale 1.0), "random" (seeded uniform /
      log-uniform sampling) or any key of `nevergrad.optimizers.registry`.
    - proxy_evaluate: a cheap scorer used for every search trial; then the `full_top_k` best distinct
      points are re-scored with `evaluate` and the final choice is the best full score.
    - scorer_id / proxy_scorer_id / data_hash / context: identify what a score means; they key the
      score cache (`<run_dir>/search/scores.jsonl`) and the search's directory, so change them when
      the scorer, its data, or the models being merged change.
    - num_workers > 1 evaluates batches in a thread pool: only for thread-safe evaluate functions
      (not for one resident model updated in place).
    - submit(fidelity, point) -> a future of (evaluate's answer, seconds): evaluations run elsewhere
      (Ray workers, search/run.py); `num_workers` trials are then in flight and each is told as its
      result arrives (`_search_async`); evaluate / proxy_evaluate are not called, proxy_evaluate
      only says that there is a proxy fidelity. The cache and history stay here.
    """
    if not isinstance(budget, int) or budget < 1:
        raise BmmError(f"search.budget must be an integer >= 1, got {budget!r}")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise BmmError(f"search.num_workers must be an integer >= 1, got {num_workers!r}")
    if full_top_k < 0:
        raise BmmError(f"search.full_top_k must be >= 0, got {full_top_k}")
    check_optimizer(optimizer)
    if design is not None and optimizer != "staged":
        raise BmmError(f"search.design: options of the staged design given, but the optimizer is {optimizer!r}")
    opts = design if isinstance(design, DesignOptions) else DesignOptions.from_config(design)
    use_proxy = proxy_evaluate is not None
    meta = {
        "optimizer": optimizer, "budget": budget, "seed": seed, "num_workers": num_workers,
        "space": space.signature(), "scorer_id": scorer_id, "data_hash": data_hash, "context": context,
        "proxy_scorer_id": proxy_scorer_id if use_proxy else None,
        "full_top_k": full_top_k if use_proxy else 0,
    }
    if optimizer == "staged":  # only here, so the ids of other optimisers' searches stay as they were
        # the resolved stage-1 shape too: a changed default must not replay an old history
        meta["design"] = opts.signature() | {"stage1_shape": list(stage1_shape(space, budget, opts)),
                                             "line_trials": line_trials(space, budget, opts)}
    if submit is not None and num_workers > 1:  # told as results arrive: another search than batches
        meta["dispatch"] = "async"
    root = Path(run_dir) / "search"
    search_dir = root / _search_id(meta)
    search_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(search_dir / "meta.json", {**meta, "nevergrad_version": _nevergrad_version()})
    cache = ScoreCache(root / "scores.jsonl")
    history = History(search_dir / "history.jsonl")
    full = _Scorer(evaluate, "full", scorer_id, data_hash, context, cache)
    proxy = _Scorer(proxy_evaluate, "proxy", proxy_scorer_id, data_hash, context, cache) if use_proxy else full
    if len(history):
        log.info("search %s: resuming after %d recorded trials", search_dir.name, len(history))

    asker = _make_asker(space, optimizer, budget, seed, num_workers, opts)
    pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 1 and submit is None else None
    try:
        search_trials: list[Trial] = []
        if submit is not None:
            search_trials = _search_async(asker, proxy, history, submit, budget, num_workers)
        while len(search_trials) < budget:
            n = min(num_workers, budget - len(search_trials))
            asked = asker.ask_batch(n)
            start = len(search_trials)
            points = [(start + j, "search", params) for j, (_, params) in enumerate(asked)]
            batch = _score_batch(points, proxy, history, pool)
            for (handle, _), t in zip(asked, batch):
                asker.tell(handle, t.score, t.extra.get("rows"), t.params)
                log.info("trial %d/%d %s score %.6g%s", t.trial + 1, budget, t.fidelity, t.score,
                         " (cached)" if t.cached else "")
            search_trials.extend(batch)
    finally:
        asker.close()

    try:
        final_trials: list[Trial] = []
        if use_proxy and full_top_k > 0:
            ranked, seen = [], set()
            for t in sorted(search_trials, key=_rank_key):
                k = json.dumps(t.params, sort_keys=True)
                if k not in seen and math.isfinite(t.score) and asker.eligible(t.params):
                    seen.add(k)
                    ranked.append(t)
            points = [(budget + r, "final", t.params) for r, t in enumerate(ranked[:full_top_k])]
            final_trials = _score_batch(points, full, history, pool, submit)
    finally:
        if pool is not None:
            pool.shutdown()

    candidates = final_trials if use_proxy and full_top_k > 0 else search_trials
    finite = [t for t in candidates if math.isfinite(t.score) and asker.eligible(t.params)]
    if not finite:
        raise BmmError(f"search {search_dir.name}: no trial gave a finite score")
    best = min(finite, key=_rank_key)
    result = SearchResult(
        best_params=best.params, best_score=best.score, best_fidelity=best.fidelity, best_trial=best.trial,
        trials=list(history.trials), search_dir=search_dir,
        evaluations=full.evaluations + (proxy.evaluations if use_proxy else 0), optimizer=optimizer,
    )
    if write_report:
        from bmmstream.search.report import write_report as _write

        _write(result)
    return result
