"""A run stopped at any moment and rerun gives the uninterrupted output byte for byte (issue 11).

- `bmm search` killed before its history exists (statistics), during the trials or during the final
  write, then `bmm resume R`: the search continues and chooses the same model (not a plain merge).
- a merge started with relative paths from one directory and resumed from another: identical files,
  README.md (model card) included.
- SIGKILL at >= 20 seeded random moments of `python -m bmmstream.cli merge` (start-up, before the run
  directory is complete, prepass, writing, renames), each followed by reruns of `bmm merge` / `bmm resume`.
- SIGINT / SIGTERM: a clean stop (one line, exit 130 / 143) that `bmm resume` completes identically.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import bmmstream
from bmmstream.output.writer import ShardWriter
from bmmstream.statistics.store import StatsStore

ROOT = Path(__file__).resolve().parent.parent


class Killed(BaseException):
    """Stands for the process dying at this point (not an Exception: nothing may catch it)."""


def _dying(monkeypatch, cls, attr: str, after: int) -> None:
    """cls.attr raises Killed on its `after`-th call."""
    orig = getattr(cls, attr)
    calls = {"n": 0}

    def f(*a, **kw):
        calls["n"] += 1
        if calls["n"] == after:
            raise Killed()
        return orig(*a, **kw)

    monkeypatch.setattr(cls, attr, f)


def _digest(folder: Path) -> dict[str, str]:
    """Every file of a folder, hidden ones included, by content."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


# -- the search ---------------------------------------------------------------------------------------
SCORER = textwrap.dedent(
    """
    DIE_AT = {"n": None, "calls": 0}

    class Killed(BaseException):
        pass

    def score(model):
        DIE_AT["calls"] += 1
        if DIE_AT["n"] is not None and DIE_AT["calls"] >= DIE_AT["n"]:
            raise Killed()  # the process stops while a trial is scored
        sd = model.state_dict()
        return -float(sum((v.double() ** 2).sum() for k, v in sd.items() if k.endswith("proj.weight")))
    """
)


@pytest.fixture
def kr_scorer(tmp_path, monkeypatch):
    (tmp_path / "kr_scorer.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("kr_scorer", None)
    import kr_scorer

    return kr_scorer


def _search_cfg(suite) -> dict:
    return {
        "base_model": str(suite.base),
        "models": [{"model": str(e)} for e in suite.experts],
        "merge_method": "bmm",
        "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "rho": 0.01, "blocks": 2},
        "dtype": "float64",
        "out_dtype": "float32",
        "search": {"optimizer": "random", "budget": 4, "seed": 3, "rho_range": [1e-3, 1.0],
                   "scale_range": [1.0, 1.3], "scorer": {"callable": "kr_scorer:score"}, "full_top_k": 1},
    }


def _history(run: Path) -> list[dict]:
    (h,) = list((run / "search").glob("*/history.jsonl"))
    drop = ("seconds", "time", "wall")
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in h.read_text().splitlines()]


@pytest.mark.parametrize("point", ["statistics", "trial", "final write"])
def test_killed_search_resumes_as_a_search_and_chooses_the_same_model(tiny_llama_suite, tmp_path, kr_scorer,
                                                                      monkeypatch, point):
    cfg = _search_cfg(tiny_llama_suite)
    ref = bmmstream.search_merge(cfg, run_dir=tmp_path / "ref", device="cpu", progress=False)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        if point == "statistics":  # before the history exists
            _dying(m, StatsStore, "put", 3)
        elif point == "trial":
            kr_scorer.DIE_AT.update(n=3, calls=0)
        else:
            _dying(m, ShardWriter, "write", 4)
        with pytest.raises((Killed, kr_scorer.Killed)):
            bmmstream.search_merge(cfg, run_dir=run, device="cpu", progress=False)
    kr_scorer.DIE_AT.update(n=None)
    assert not (run / "model").exists() and not bmmstream.status(run)["complete"]
    st = bmmstream.status(run)
    assert st["search"] and (st["search_trials"] == 0) == (point == "statistics"), st
    out = bmmstream.resume(run, device="cpu", progress=False)
    assert out == (run / "model").resolve()
    assert json.loads((run / "best_params.json").read_text()) == ref["best_params"]
    assert _history(run) == _history(tmp_path / "ref")
    assert _digest(out) == _digest(ref["output"])


KILL_IN_STATISTICS = textwrap.dedent(
    """
    import os, signal, sys
    import bmmstream.statistics.store as S
    orig, calls = S.StatsStore.put, {"n": 0}
    def put(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*a, **kw)
    S.StatsStore.put = put
    from bmmstream.cli import app
    app(sys.argv[1:], prog_name="bmm")
    """
)


def test_cli_search_sigkilled_during_statistics_then_bmm_resume(tiny_llama_suite, tmp_path, kr_scorer):
    """The same through the CLI with a real SIGKILL: `bmm resume R` runs the search, not a plain merge."""
    cfg = _search_cfg(tiny_llama_suite)
    ref = bmmstream.search_merge(cfg, run_dir=tmp_path / "ref", device="cpu", progress=False)
    (tmp_path / "s.yaml").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", KILL_IN_STATISTICS, "search", str(tmp_path / "s.yaml"), "--run-dir",
                        str(run), "--device", "cpu", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not list(run.glob("search/*/history.jsonl"))
    r = subprocess.run([sys.executable, "-m", "bmmstream.cli", "resume", str(run), "--device", "cpu", "--no-progress"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "best_params.json").read_text()) == ref["best_params"]
    assert _history(run) == _history(tmp_path / "ref")
    assert _digest(run / "model") == _digest(ref["output"])


# -- relative paths, resumed elsewhere ------------------------------------------------------------------
def test_resume_from_another_directory_with_relative_paths_is_byte_identical(tiny_llama_suite, tmp_path,
                                                                             monkeypatch):
    x, y = tmp_path / "x", tmp_path / "y"
    x.mkdir()
    y.mkdir()
    rel = lambda p: os.path.relpath(p, x)  # noqa: E731
    cfg = {"base_model": rel(tiny_llama_suite.base), "models": [{"model": rel(e)} for e in tiny_llama_suite.experts],
           "merge_method": "bmm", "parameters": {"anchor": "ties", "rho": 0.05}, "shard_size": "40KB"}
    monkeypatch.chdir(x)
    ref = bmmstream.merge(cfg, out="ref", run_dir="ref-run", device="cpu", progress=False)
    with monkeypatch.context() as m:
        _dying(m, ShardWriter, "write", 6)
        with pytest.raises(Killed):
            bmmstream.merge(cfg, out="out", run_dir="run", device="cpu", progress=False)
    monkeypatch.chdir(y)
    out = bmmstream.resume(Path("../x/run"), device="cpu", progress=False)
    assert out == x / "out"
    assert _digest(out) == _digest(x / "ref")
    assert (out / "README.md").read_bytes() == (ref / "README.md").read_bytes()
    assert str(tiny_llama_suite.base.resolve()) in (out / "README.md").read_text()


# -- SIGKILL / SIGINT / SIGTERM on the CLI ------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_suite(tmp_path_factory):
    """Many small units (8 layers) so that random moments fall inside the work, not only at start-up."""
    from bmmstream.demo import make_llama_suite

    return make_llama_suite(tmp_path_factory.mktemp("deep"), num_experts=2, hidden=16, intermediate=32, layers=8,
                            vocab=32, heads=2, kv_heads=1)


def _write_cfg(path: Path, suite, method: str, params: dict) -> Path:
    cfg = {"base_model": str(suite.base), "models": [{"model": str(e)} for e in suite.experts],
           "merge_method": method, "parameters": params, "shard_size": "8KB", "out_dtype": "bfloat16"}
    path.write_text(json.dumps(cfg))
    return path


def _merge_cmd(cfg: Path, out: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "bmmstream.cli", "merge", str(cfg), "--out", str(out), "--run-dir", str(run),
            "--device", "cpu", "--no-progress"]


def _resume_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "bmmstream.cli", "resume", str(run), "--device", "cpu", "--no-progress"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists() and proc.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.005)


def test_sigkill_at_random_moments_then_rerun_is_byte_identical(deep_suite, tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", deep_suite, "ties", {"density": 0.3})
    # the reference is the same command, uninterrupted; it also measures start-up and work here
    t0 = time.monotonic()
    p = subprocess.Popen(_merge_cmd(cfg, tmp_path / "ref", tmp_path / "ref-run"), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(tmp_path / "ref-run" / "run.json", p)
    startup = time.monotonic() - t0
    assert p.wait() == 0
    work = time.monotonic() - t0 - startup
    want = _digest(tmp_path / "ref")
    rng = random.Random(11)
    kills, chain, moments = 0, 0, set()
    while kills < 20:
        out, run = tmp_path / f"out{chain}", tmp_path / f"run{chain}"
        for i in range(6):
            use_resume = (run / "run.json").exists() and rng.random() < 0.5
            p = subprocess.Popen(_resume_cmd(run) if use_resume else _merge_cmd(cfg, out, run), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if i == 0 or rng.random() < 0.2:
                time.sleep(rng.uniform(0.0, startup))  # start-up: before or while the run directory is made
            else:
                _wait_for(run / "run.json", p)
                time.sleep(rng.uniform(0.0, work))
            if p.poll() is not None:  # finished before the kill
                assert p.returncode == 0, p.stderr.read().decode()[-2000:]
                p.stderr.close()
                break
            p.kill()
            p.wait()
            p.stderr.close()
            kills += 1
            moments.add("no run.json" if not (run / "run.json").exists() else
                        "output renamed" if out.exists() else
                        "writing" if (run / "journal.jsonl").exists() else "prepared")
            # whatever the moment, an output folder that exists is the complete one
            assert not out.exists() or _digest(out) == want, (chain, kills)
        cmd = _resume_cmd(run) if (run / "run.json").exists() and rng.random() < 0.5 else _merge_cmd(cfg, out, run)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert bmmstream.status(run)["complete"]
        assert _digest(out) == want, chain
        assert not out.with_name(out.name + ".partial").exists()
        chain += 1
    assert "no run.json" in moments and len(moments) >= 2, moments


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_cleanly_then_resume(deep_suite, tmp_path, sig, code):
    cfg = _write_cfg(tmp_path / "c.yaml", deep_suite, "bmm", {"anchor": "task_arithmetic", "rho": 0.01, "blocks": 2})
    ref = bmmstream.merge(cfg, out=tmp_path / "ref", run_dir=tmp_path / "ref-run", device="cpu", progress=False)
    out, run = tmp_path / "out", tmp_path / "run"
    p = subprocess.Popen(_merge_cmd(cfg, out, run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    _wait_for(run / "run.json", p)  # the run is prepared: statistics, solves and writes are ahead
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert p.returncode == code, err[-2000:]
    assert err.strip().splitlines() == [
        f"error: stopped by {name}; the progress so far is kept, rerun the same command or `bmm resume {run}` "
        f"to continue"
    ]
    assert not out.exists() and not bmmstream.status(run)["complete"]
    r = subprocess.run(_resume_cmd(run), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(out) == _digest(ref)
