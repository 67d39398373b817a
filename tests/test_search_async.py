"""The search driver with trials in flight (`run_search(submit=...)`, issue 14), without Ray.

Results arrive out of order (a thread pool whose evaluations sleep by point), so the history is in
arrival order with each trial's ask index; a resumed search replays that interleaving.
"""
from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

from bmmstream.errors import BmmError
from bmmstream.search import SearchSpace, run_search


def quad(p: dict) -> float:
    b = p["blocks"][0]
    return -sum((v - 0.1) ** 2 for v in b["rho"].values()) - (b["scale"] - 1.1) ** 2


@pytest.fixture
def submit():
    """Evaluations on 2 threads; later asks may finish first (sleeps from the point's score)."""
    pool = concurrent.futures.ThreadPoolExecutor(2)
    calls = []

    def sub(fidelity: str, params: dict) -> concurrent.futures.Future:
        calls.append(params)

        def run():
            time.sleep((abs(quad(params)) * 1e4) % 0.03)
            return quad(params), 0.001

        return pool.submit(run)

    sub.calls = calls
    yield sub
    pool.shutdown()


def _set(trials) -> list[str]:
    return sorted(json.dumps([t.params, t.score], sort_keys=True) for t in trials)


@pytest.mark.parametrize("optimizer", ["random", "grid"])
def test_in_flight_search_gives_the_sequential_trials(optimizer, submit, tmp_path):
    sp = SearchSpace(1)
    seq = run_search(sp, quad, optimizer=optimizer, budget=8, seed=1, run_dir=tmp_path / "seq", write_report=False)
    par = run_search(sp, quad, optimizer=optimizer, budget=8, seed=1, num_workers=2, run_dir=tmp_path / "par",
                     write_report=False, submit=submit)
    assert _set(par.trials) == _set(seq.trials) and par.best_params == seq.best_params
    assert [t.trial for t in par.trials] == list(range(8))
    assert sorted(t.extra["ask"] for t in par.trials) == list(range(8))
    assert par.evaluations == len(submit.calls) == 8
    assert par.search_dir != seq.search_dir  # told as they arrive: its own search (meta "dispatch")
    assert json.loads((par.search_dir / "meta.json").read_text())["dispatch"] == "async"


def test_resume_replays_the_recorded_interleaving(submit, tmp_path):
    """A nevergrad search with 3 in flight, cut after 5 told trials (the cache lost too): the resume
    re-asks the same points in the recorded order and evaluates only the rest."""
    sp = SearchSpace(2)
    kw = dict(optimizer="TwoPointsDE", budget=10, seed=0, num_workers=3, run_dir=tmp_path, write_report=False)
    full = run_search(sp, quad, submit=submit, **kw)
    h = full.search_dir / "history.jsonl"
    lines = h.read_text().splitlines()
    h.write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "search" / "scores.jsonl").unlink()
    submit.calls.clear()
    again = run_search(sp, quad, submit=submit, **kw)
    assert [json.loads(l) for l in lines[:5]] == [t.to_record() for t in again.trials[:5]]
    assert again.evaluations == len(submit.calls) == 5
    assert len(again.trials) == 10

    # a history whose interleaving the optimiser cannot reproduce stops the search
    recs = [json.loads(l) for l in h.read_text().splitlines()]
    recs[1]["extra"]["ask"], recs[2]["extra"]["ask"] = recs[2]["extra"]["ask"], recs[1]["extra"]["ask"]
    h.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(BmmError, match=r"^search resume: trial 1 \(ask \d+\) re-asked search point "):
        run_search(sp, quad, submit=submit, **kw)


def test_one_at_a_time_is_the_sequential_search(tmp_path):
    """num_workers 1 with submit: the same search id, records and history as without it."""
    sp = SearchSpace(1)

    def sync(fidelity, params):
        f = concurrent.futures.Future()
        f.set_result((quad(params), 0.0))
        return f

    a = run_search(sp, quad, optimizer="NGOpt", budget=5, seed=2, run_dir=tmp_path / "a", write_report=False)
    b = run_search(sp, quad, optimizer="NGOpt", budget=5, seed=2, run_dir=tmp_path / "b", write_report=False,
                   submit=sync)
    assert a.search_dir.name == b.search_dir.name
    assert [(t.params, t.score, t.extra) for t in a.trials] == [(t.params, t.score, t.extra) for t in b.trials]
