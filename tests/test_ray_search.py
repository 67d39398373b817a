"""`bmm search --executor ray` (issue 14): trials on Ray actors with resident models, 2 in flight.

A 2-worker search gives the sequential search's trials (as a set: they are told as they arrive) and
best point for the seeded random and grid optimisers; a search whose worker fails resumes from the
driver's history; a bad --address is one line before anything starts. One local 2-CPU Ray serves the
module (its start-up is most of the cost).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bmmstream.errors import BmmError

ray = pytest.importorskip("ray")

# the score: a function of the resident model's weights; while a file `stop` beside the module holds
# a number n, the evaluation numbered n (from 0, counted across processes by mkdir) fails
SCORER = textwrap.dedent(
    """
    import os
    from pathlib import Path

    HERE = Path(__file__).parent

    def score(model):
        if (HERE / "stop").exists():
            k = 0
            while True:
                try:
                    os.mkdir(HERE / f"eval-{k}")
                    break
                except FileExistsError:
                    k += 1
            if k == int((HERE / "stop").read_text()):
                raise RuntimeError("scorer stopped by the test")
        sd = model.state_dict()
        return -sum(float((v.double() - 0.01).norm()) for k, v in sd.items() if k.endswith("proj.weight"))
    """
)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_scorer")
    (d / "ray_search_scorer.py").write_text(SCORER)
    sys.path.insert(0, str(d))  # the driver's sys.path travels to the workers
    yield d
    sys.path.remove(str(d))


def _cfg(suite, **search) -> dict:
    s = {"budget": 6, "seed": 3, "rho_range": [1e-3, 1.0], "scale_range": [0.8, 1.3],
         "scorer": {"callable": "ray_search_scorer:score"}, "full_top_k": 0}
    s.update(search)
    return {"base_model": str(suite.base), "models": [{"model": str(e)} for e in suite.experts],
            "merge_method": "bmm", "parameters": {"anchor": "task_arithmetic", "rho": 0.01, "blocks": 2},
            "search": s}


def _history(run: Path) -> list[dict]:
    (h,) = list((run / "search").glob("*/history.jsonl"))
    return [json.loads(l) for l in h.read_text().splitlines()]


def _as_set(history: list[dict]) -> list[str]:
    return sorted(json.dumps([t["params"], t["score"]], sort_keys=True) for t in history)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("optimizer", ["random", "grid"])
def test_two_workers_give_the_sequential_search(optimizer, cluster, scorer_dir, tiny_llama_suite, tmp_path):
    from bmmstream.api import search_merge

    cfg = _cfg(tiny_llama_suite, optimizer=optimizer)
    # one thread here and in each worker (the workers take the driver's count): bitwise equal scores
    seq = search_merge(cfg, run_dir=tmp_path / "seq", device="cpu", progress=False, threads=1)
    par = search_merge(cfg, run_dir=tmp_path / "ray", device="cpu", progress=False, threads=1, executor="ray",
                       workers=2)
    hs, hp = _history(tmp_path / "seq"), _history(tmp_path / "ray")
    assert len(hp) == 6 and _as_set(hp) == _as_set(hs)  # the same points, the same scores bit for bit
    assert sorted(t["extra"]["ask"] for t in hp) == list(range(6))  # told as they arrived, asks recorded
    assert par["best_params"] == seq["best_params"] and par["best_score"] == seq["best_score"]
    assert par["evaluations"] == seq["evaluations"] == 6
    assert _files(par["output"]) == _files(seq["output"])  # the best point, written the same
    costs = json.loads((tmp_path / "ray" / "search-report" / "trial_costs.json").read_text())
    assert costs["executor"] == "ray" and costs["workers"] == 2 and costs["evaluations"] == 6
    assert ray.is_initialized()  # a Ray the caller started is the caller's to shut down


def test_a_failed_search_resumes_from_the_drivers_history(cluster, scorer_dir, tiny_llama_suite, tmp_path):
    """NGOpt with 2 trials in flight, a worker's scorer fails: the error reaches the caller, and the
    search resumed without Ray (`bmm resume`: the recorded 2 in flight, evaluated here one at a time)
    replays the recorded ask/tell interleaving (another one would stop with the replay error), keeps
    every recorded trial and evaluates only what is missing."""
    from bmmstream.api import resume, search_merge

    cfg = _cfg(tiny_llama_suite, optimizer="NGOpt", budget=8)
    (scorer_dir / "stop").write_text("4")  # the 5th evaluation fails
    with pytest.raises(RuntimeError, match="scorer stopped by the test"):
        search_merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False,
                     threads=1, executor="ray", workers=2)
    (scorer_dir / "stop").unlink()
    first = _history(tmp_path / "run")
    assert 2 <= len(first) < 8 and all("ask" in t["extra"] for t in first)
    assert json.loads((tmp_path / "run" / "search_dispatch.json").read_text()) == {"num_workers": 2}
    resume(tmp_path / "run", device="cpu", progress=False, threads=1)
    done = _history(tmp_path / "run")
    assert len(done) == 8 and done[: len(first)] == first
    assert sorted(t["extra"]["ask"] for t in done) == list(range(8))
    cached = sum(t["cached"] for t in done[len(first):])
    assert cached <= 2  # at most the points in flight when it failed, whose scores reached the cache
    assert (tmp_path / "out" / "config.json").exists()


def test_search_options_refused_before_any_work(tiny_llama_suite, tmp_path):
    from bmmstream.api import search_merge

    with pytest.raises(BmmError, match=r"^search.in_core: true evaluates trials in this process; drop it to use "
                                       r"--executor ray$"):
        search_merge(_cfg(tiny_llama_suite, in_core=True), run_dir=tmp_path / "run", device="cpu", progress=False,
                     executor="ray", workers=2)
    with pytest.raises(BmmError, match=r"^search.num_workers must be an integer >= 1, got 0$"):
        search_merge(_cfg(tiny_llama_suite, num_workers=0), run_dir=tmp_path / "run", device="cpu",
                     progress=False)
    assert not (tmp_path / "run").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REFUSED = ("--address 127.0.0.1:{port}: nothing is listening there (connection refused); start the cluster with "
           "`ray start --head` on 127.0.0.1, or leave out --address for a local Ray")
FORMS = "HOST:PORT (the head's GCS port, 6379 unless `ray start --head --port` said otherwise), ray://HOST:PORT or auto"


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:{port}", REFUSED),
    ("ray://127.0.0.1:{port}", REFUSED.replace("--address 127.0.0.1", "--address ray://127.0.0.1")),
    ("127.0.0.1", f"--address 127.0.0.1: malformed; expected {FORMS}"),
    ("http://127.0.0.1:8265", f"--address http://127.0.0.1:8265: malformed; expected {FORMS}"),
    ("127.0.0.1:99999", f"--address 127.0.0.1:99999: malformed; expected {FORMS}"),
])
def test_a_bad_address_is_one_line_and_nothing_starts(address, expected, tiny_llama_suite, tmp_path):
    from bmmstream.api import merge, search_merge

    port = _closed_port()
    address, expected = address.format(port=port), expected.format(port=port)
    for run in (merge, search_merge):
        with pytest.raises(BmmError) as e:
            run(_cfg(tiny_llama_suite, optimizer="random"), run_dir=tmp_path / "run", device="cpu", progress=False,
                executor="ray", workers=2, address=address)
        assert str(e.value) == expected
    assert not (tmp_path / "run").exists()


def test_cli_bad_address_exits_with_one_line(tiny_llama_suite, tmp_path):
    port = _closed_port()
    (tmp_path / "c.yaml").write_text(json.dumps(_cfg(tiny_llama_suite, optimizer="random")))
    r = subprocess.run([sys.executable, "-m", "bmmstream", "search", str(tmp_path / "c.yaml"), "--run-dir",
                        str(tmp_path / "run"), "--no-progress", "--executor", "ray", "--workers", "2",
                        "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["error: " + REFUSED.format(port=port)]
    assert not (tmp_path / "run").exists()
