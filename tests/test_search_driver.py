import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bmmstream.errors import BmmError
from bmmstream.search import SearchSpace, run_search
from bmmstream.search.history import History

ROOT = Path(__file__).resolve().parents[1]


def quad(p, center=-2.0, scale_center=1.1):
    """A cheap analytic objective: a quadratic in log10 rho (peak at 10**center) and in scale."""
    return -sum((math.log10(v) - center) ** 2 for b in p["blocks"] for v in b["rho"].values()) - sum(
        10 * (b["scale"] - scale_center) ** 2 for b in p["blocks"]
    )


class Counter:
    def __init__(self, fn=quad):
        self.fn, self.calls = fn, 0

    def __call__(self, p):
        self.calls += 1
        return self.fn(p)


def _history(result):
    return History(result.search_dir / "history.jsonl").trials


def test_repeated_point_costs_no_evaluation(tmp_path):
    # a space with nothing free: every ask is the same point
    fixed = SearchSpace(1, scale_range=(1.0, 1.0), rho_range=(0.1, 0.1))
    f = Counter()
    r = run_search(fixed, f, optimizer="NGOpt", budget=5, run_dir=tmp_path, write_report=False)
    assert f.calls == 1 and r.evaluations == 1
    assert [t.cached for t in r.trials] == [False, True, True, True, True]
    assert len({t.score for t in r.trials}) == 1

    # a finished search run again: no evaluation at all, same answer
    sp = SearchSpace(1)
    g = Counter()
    r1 = run_search(sp, g, optimizer="NGOpt", budget=8, seed=1, run_dir=tmp_path, write_report=False)
    distinct = {json.dumps(t.params, sort_keys=True) for t in r1.trials}
    assert g.calls == r1.evaluations == len(distinct)
    r2 = run_search(sp, g, optimizer="NGOpt", budget=8, seed=1, run_dir=tmp_path, write_report=False)
    assert g.calls == len(distinct) and r2.evaluations == 0
    assert r2.best_params == r1.best_params and _history(r2) == _history(r1)

    # another search (different seed: its own history) over the same grid points hits the shared cache
    h = Counter()
    a = run_search(sp, h, optimizer="grid", budget=4, seed=0, run_dir=tmp_path, write_report=False)
    b = run_search(sp, h, optimizer="grid", budget=4, seed=1, run_dir=tmp_path, write_report=False)
    assert a.search_dir != b.search_dir
    assert h.calls == 4 and b.evaluations == 0 and all(t.cached for t in b.trials)

    # a different scorer id is a different score: evaluated again
    run_search(sp, h, optimizer="grid", budget=4, seed=0, run_dir=tmp_path, scorer_id="other", write_report=False)
    assert h.calls == 8


def test_grid_baseline(tmp_path):
    sp = SearchSpace(2, rho_range=(1e-4, 1.0))
    r = run_search(sp, Counter(lambda p: quad(p, scale_center=1.0)), optimizer="grid", budget=5, run_dir=tmp_path,
                   write_report=False)
    rhos = [t.params["blocks"][1]["rho"]["mlp_in"] for t in r.trials]
    assert rhos == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert all(b["scale"] == 1.0 for t in r.trials for b in t.params["blocks"])
    assert r.best_params == sp.shared_point(1e-2) and r.best_score == 0.0 and r.best_trial == 2


def test_random_baseline_seeded(tmp_path):
    sp = SearchSpace(2, hybrid=True)
    a = run_search(sp, quad, optimizer="random", budget=6, seed=5, run_dir=tmp_path / "a", write_report=False)
    b = run_search(sp, quad, optimizer="random", budget=6, seed=5, run_dir=tmp_path / "b", write_report=False)
    c = run_search(sp, quad, optimizer="random", budget=6, seed=6, run_dir=tmp_path / "c", write_report=False)
    pa = [t.params for t in a.trials]
    assert pa == [t.params for t in b.trials]
    assert pa != [t.params for t in c.trials]
    assert len({json.dumps(p, sort_keys=True) for p in pa}) == 6
    assert a.best_score == max(quad(p) for p in pa)
    assert all(0.0 <= p["eps"] <= 1.0 for p in pa)


def test_nevergrad_improves_on_analytic_objective(tmp_path):
    sp = SearchSpace(1)
    r = run_search(sp, quad, optimizer="NGOpt", budget=30, seed=0, run_dir=tmp_path, write_report=False)
    first = r.trials[0].score
    assert r.best_score > first and r.best_score > -0.05
    assert r.best_score == max(t.score for t in r.trials)


def test_optimizer_name_validation(tmp_path):
    sp = SearchSpace(1)
    with pytest.raises(BmmError, match=r"^search.optimizer: unknown optimizer 'NGopt' \(did you mean NGOpt"):
        run_search(sp, quad, optimizer="NGopt", budget=3, run_dir=tmp_path)
    with pytest.raises(BmmError) as ei:
        run_search(sp, quad, optimizer="zzqqxx", budget=3, run_dir=tmp_path)
    assert str(ei.value) == (
        "search.optimizer: unknown optimizer 'zzqqxx'; use staged, paper_bo, grid, random, or a nevergrad "
        "optimizer name such as NGOpt, CMA, BO, TwoPointsDE, RandomSearch"
    )
    with pytest.raises(BmmError, match=r"^search.budget must be an integer >= 1, got 0$"):
        run_search(sp, quad, optimizer="grid", budget=0, run_dir=tmp_path)
    assert not (tmp_path / "search").exists()  # nothing written for a rejected search


def test_proxy_for_trials_full_for_top_k(tmp_path):
    sp = SearchSpace(1)
    proxy = Counter(lambda p: quad(p, center=-2.0, scale_center=1.0))
    full = Counter(lambda p: quad(p, center=-1.2, scale_center=1.0))
    r = run_search(sp, full, proxy_evaluate=proxy, optimizer="grid", budget=5, full_top_k=3, run_dir=tmp_path,
                   write_report=False)
    assert proxy.calls == 5 and full.calls == 3 and r.evaluations == 8
    search = [t for t in r.trials if t.phase == "search"]
    final = [t for t in r.trials if t.phase == "final"]
    assert all(t.fidelity == "proxy" for t in search) and all(t.fidelity == "full" for t in final)
    # top 3 by proxy score (ties by trial order): 1e-2, then 1e-3 and 1e-1
    assert [t.params["blocks"][0]["rho"]["attn_in"] for t in final] == [1e-2, 1e-3, 1e-1]
    assert [t.trial for t in final] == [5, 6, 7]
    # the final choice is the best full score, not the best proxy score
    assert r.best_params == sp.shared_point(1e-1) and r.best_fidelity == "full" and r.best_trial == 7
    assert r.best_score == pytest.approx(-4 * 0.2**2)


def test_non_finite_scores_are_recorded_not_chosen(tmp_path):
    sp = SearchSpace(1)
    f = lambda p: float("nan") if p["blocks"][0]["rho"]["attn_in"] < 1e-2 else quad(p)  # noqa: E731
    r = run_search(sp, f, optimizer="grid", budget=5, run_dir=tmp_path, write_report=False)
    assert sum(math.isnan(t.score) for t in r.trials) == 2
    assert r.best_params == sp.shared_point(1e-2)
    with pytest.raises(BmmError, match=r"no trial gave a finite score$"):
        run_search(sp, lambda p: float("nan"), optimizer="grid", budget=2, run_dir=tmp_path / "x", write_report=False)
    with pytest.raises(BmmError, match=r"^search: the full scorer returned 'abc', expected a number$"):
        run_search(sp, lambda p: "abc", optimizer="grid", budget=2, run_dir=tmp_path / "y", write_report=False)


def test_replay_mismatch_fails_loudly(tmp_path):
    sp = SearchSpace(1)
    r = run_search(sp, quad, optimizer="random", budget=3, seed=0, run_dir=tmp_path, write_report=False)
    path = r.search_dir / "history.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["params"]["blocks"][0]["scale"] = 1.0
    lines[1] = json.dumps(rec)
    path.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(BmmError, match=r"^search resume: trial 1 re-asked search point .* but the history in"):
        run_search(sp, quad, optimizer="random", budget=3, seed=0, run_dir=tmp_path, write_report=False)


def test_parallel_workers_match_history_order(tmp_path):
    sp = SearchSpace(1)
    f = Counter()
    r = run_search(sp, f, optimizer="TwoPointsDE", budget=6, seed=0, num_workers=3, run_dir=tmp_path,
                   write_report=False)
    assert [t.trial for t in r.trials] == list(range(6))
    assert all(t.score == quad(t.params) for t in r.trials)
    again = run_search(sp, f, optimizer="TwoPointsDE", budget=6, seed=0, num_workers=3, run_dir=tmp_path,
                       write_report=False)
    assert again.evaluations == 0 and again.best_params == r.best_params


def test_report_files(tmp_path):
    sp = SearchSpace(1)
    r = run_search(sp, quad, proxy_evaluate=quad, optimizer="grid", budget=3, full_top_k=1, run_dir=tmp_path)
    best = json.loads((r.search_dir / "best.json").read_text())
    assert best["best_params"] == r.best_params and best["best_score"] == r.best_score
    assert best["optimizer"] == "grid" and best["trials"] == 4 and best["search_trials"] == 3
    assert (r.search_dir / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((r.search_dir / "meta.json").read_text())
    assert meta["budget"] == 3 and meta["optimizer"] == "grid"


# -- kill and resume ---------------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import json, math, os, signal, sys, threading
    from bmmstream.search import SearchSpace, run_search

    run_dir, optimizer, budget, workers, use_proxy, kill_at = sys.argv[1:7]
    budget, workers, kill_at = int(budget), int(workers), int(kill_at)
    lock, calls = threading.Lock(), [0]

    def tick():
        with lock:
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def objective(p, center):
        return -sum((math.log10(v) - center) ** 2 for b in p["blocks"] for v in b["rho"].values()) - sum(
            10 * (b["scale"] - 1.1) ** 2 for b in p["blocks"])

    def full(p):
        tick()
        return objective(p, -2.0)

    def proxy(p):
        tick()
        return objective(p, -2.3)

    r = run_search(SearchSpace(2), full, optimizer=optimizer, budget=budget, seed=3, run_dir=run_dir,
                   proxy_evaluate=proxy if use_proxy == "1" else None, full_top_k=2, num_workers=workers,
                   write_report=False)
    print(json.dumps({"best": r.best_params, "score": r.best_score, "trial": r.best_trial,
                      "dir": r.search_dir.name, "evaluations": r.evaluations}))
    """
)


def _run(script, run_dir, args, kill_at):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(script), str(run_dir), *map(str, args), str(kill_at)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _stripped_history(run_dir, name):
    recs = [json.loads(line) for line in (run_dir / "search" / name / "history.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("seconds")
        r.pop("cached")
    return recs


@pytest.mark.parametrize(
    "optimizer,budget,workers,use_proxy,kill_at",
    [
        ("NGOpt", 10, 1, 0, 6),  # killed in the search phase
        ("NGOpt", 8, 1, 1, 10),  # killed in the full-fidelity phase (8 proxy + 2nd full evaluation)
        ("CMA", 8, 2, 0, 4),  # batched asks, killed inside the second batch
        ("staged", 24, 1, 0, 15),  # the default design, killed in its refinement stage
        ("staged", 20, 3, 1, 17),  # staged, batched, killed in refinement (proxy), full phase after
    ],
)
def test_kill_and_resume_matches_uninterrupted(tmp_path, optimizer, budget, workers, use_proxy, kill_at):
    script = tmp_path / "search_script.py"
    script.write_text(SCRIPT)
    args = (optimizer, budget, workers, use_proxy)
    ref = _run(script, tmp_path / "ref", args, 0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_out = json.loads(ref.stdout.strip().splitlines()[-1])

    killed = _run(script, tmp_path / "res", args, kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    name = ref_out["dir"]
    partial = _stripped_history(tmp_path / "res", name)
    assert 0 < len(partial) < budget + (2 if use_proxy else 0)

    resumed = _run(script, tmp_path / "res", args, 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    res_out = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert _stripped_history(tmp_path / "res", name) == _stripped_history(tmp_path / "ref", name)
    assert {k: res_out[k] for k in ("best", "score", "trial", "dir")} == {
        k: ref_out[k] for k in ("best", "score", "trial", "dir")
    }
    # the resumed run evaluated only what the killed run had not finished
    assert res_out["evaluations"] < ref_out["evaluations"]
