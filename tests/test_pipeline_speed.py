"""The streaming pipeline's speed features keep its results: thread counts (config, API, CLI, auto rule,
recorded for resume), the fused raw-tensor dispatch (merge_raw / prepass_observe_raw) with its fallback,
one tensor at a time for per-tensor methods, zero-copy source tensors, one commit (two fsyncs) per
unit, write-behind with bounded memory, and a run killed between a unit's data fsync and its journal
lines resuming bit-identical."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import bmmstream
import bmmstream.executors.threads as TH
from bmmstream.errors import BmmError
from bmmstream.methods.registry import _REGISTRY, MergeMethod, RawModule, register, weighted_combination
from bmmstream.output.writer import ShardWriter
from bmmstream.sources.local import LocalSource

ROOT = Path(__file__).resolve().parent.parent


def _cfg(suite, method="task_arithmetic", params=None, **kw):
    d = {
        "base_model": str(suite.base),
        "models": [{"model": str(e)} for e in suite.experts],
        "merge_method": method,
        "parameters": params if params is not None else {"scale": 0.7},
        "out_dtype": "bfloat16",
        "shard_size": "60KB",
    }
    d.update(kw)
    return d


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- test-only methods ---------------------------------------------------------------------------
SEEN: dict[str, list] = {}


class _Sum(MergeMethod):
    """Task arithmetic with a fused raw path computed like the general one (float32, base + scale*sum)."""

    name = "_test_raw_sum"
    defaults = {"scale": 0.7, "refuse": False}
    needs_prepass = True

    def merge(self, inp):
        SEEN.setdefault("merge_sizes", []).append(1)
        SEEN.setdefault("threads", []).append((torch.get_num_threads(), _numba_threads()))
        return float(self.params["scale"]) * weighted_combination(inp.deltas, None, False)

    def merge_raw(self, raw: RawModule, out_dtype):
        SEEN.setdefault("raw", []).append(raw.spec.name)
        if self.params["refuse"]:
            return None
        for t in (raw.base, *raw.experts):
            assert not t.is_floating_point() or t.dtype == torch.float32  # stored dtype, not converted
        base = raw.base.float()
        deltas = torch.stack([e.float() - base for e in raw.experts])
        flip = raw.spec.transposed
        u = float(self.params["scale"]) * weighted_combination(deltas.transpose(-1, -2) if flip else deltas, None,
                                                              False)
        return (base + (u.T if flip else u)).to(out_dtype)

    def prepass_observe(self, inp):
        SEEN.setdefault("observe", []).append(inp.spec.name)

    def prepass_observe_raw(self, raw):
        SEEN.setdefault("observe_raw", []).append(raw.spec.name)
        return not self.params["refuse"]

    def prepass_state(self):
        return {"n": len(SEEN.get("observe", [])) + len(SEEN.get("observe_raw", []))}


class _Unit(MergeMethod):
    """Overrides merge_unit: must still get the whole unit."""

    name = "_test_whole_unit"
    defaults = {}

    def merge_unit(self, inputs):
        SEEN.setdefault("unit_sizes", []).append(len(inputs))
        return {i.spec.name: i.deltas.mean(0) for i in inputs}


def _numba_threads():
    import numba

    return numba.get_num_threads()


@pytest.fixture
def test_methods():
    SEEN.clear()
    for cls in (_Sum, _Unit):
        register(cls)
    yield SEEN
    for cls in (_Sum, _Unit):
        _REGISTRY.pop(cls.name, None)


# -- threads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -2, "x", 1.5, True])
def test_bad_thread_counts_are_one_line(tiny_llama_suite, tmp_path, bad):
    msg = f"must be an integer >= 1 or 'auto', got {bad!r}"
    with pytest.raises(BmmError) as e:
        bmmstream.merge(_cfg(tiny_llama_suite, threads=bad), run_dir=tmp_path / "r", progress=False)
    assert str(e.value) == f"config: threads: {msg}"
    with pytest.raises(BmmError) as e:
        bmmstream.merge(_cfg(tiny_llama_suite), run_dir=tmp_path / "r", progress=False, threads=bad)
    assert str(e.value) == f"threads: {msg}"


def test_cli_bad_threads(tiny_llama_suite, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cfg(tiny_llama_suite)))
    r = subprocess.run([sys.executable, "-m", "bmmstream.cli", "merge", str(cfg), "--run-dir", str(tmp_path / "r"),
                        "--threads", "0", "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --threads: must be an integer >= 1 or 'auto', got 0"


def test_auto_rule(monkeypatch):
    monkeypatch.setattr(TH, "usable_cores", lambda: 8)
    monkeypatch.setattr(TH, "_own_load", lambda: 1.0)
    for load, want in [(0.0, 8), (1.0, 8), (2.4, 7), (2.6, 6), (8.6, 1), (30.0, 1)]:
        monkeypatch.setattr(TH.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert TH.auto_threads() == want, load
    assert TH.resolve_threads(3) == 3 and TH.resolve_threads("auto") == TH.auto_threads()


def test_threads_apply_during_the_run_and_are_restored(tiny_llama_suite, tmp_path, test_methods):
    before = (torch.get_num_threads(), _numba_threads())
    bmmstream.merge(_cfg(tiny_llama_suite, "_test_raw_sum", {"refuse": True}), out=tmp_path / "o",
                    run_dir=tmp_path / "r", device="cpu", progress=False, threads=1)
    assert set(test_methods["threads"]) == {(1, 1)}
    assert (torch.get_num_threads(), _numba_threads()) == before
    assert json.loads((tmp_path / "r" / "run.json").read_text())["threads"] == 1


def test_auto_is_recorded_and_a_resume_reuses_it(tiny_llama_suite, tmp_path, test_methods, monkeypatch):
    import bmmstream.pipeline as P

    monkeypatch.setattr(P, "resolve_threads", lambda v: 1)
    cfg = _cfg(tiny_llama_suite, "_test_raw_sum", {"refuse": True})
    job = P.prepare(cfg, out=tmp_path / "o", run_dir=tmp_path / "r", device="cpu")
    job.sources.close()
    assert json.loads((tmp_path / "r" / "run.json").read_text())["threads"] == 1
    monkeypatch.setattr(P, "resolve_threads", lambda v: 2)  # the load changed: the resumed run computes as before
    bmmstream.merge(cfg, out=tmp_path / "o", run_dir=tmp_path / "r", device="cpu", progress=False)
    assert {t for t, _ in test_methods["threads"]} == {1}


def test_threads_are_not_part_of_the_merge_identity(tiny_llama_suite, tmp_path):
    from bmmstream.config import load_config
    from bmmstream.pipeline import default_run_dir

    a, b = _cfg(tiny_llama_suite, threads=1), _cfg(tiny_llama_suite)
    assert default_run_dir(load_config(a), "x.yaml") == default_run_dir(load_config(b), "x.yaml")
    ref = bmmstream.merge(b, out=tmp_path / "ref", run_dir=tmp_path / "rr", device="cpu", progress=False)
    bmmstream.merge(a, out=tmp_path / "o", run_dir=tmp_path / "r", device="cpu", progress=False)
    # the same run directory, asked with another count: accepted (already complete), same bytes
    out = bmmstream.merge(_cfg(tiny_llama_suite, threads=2), out=tmp_path / "o", run_dir=tmp_path / "r",
                          device="cpu", progress=False)
    assert _digest(out) == _digest(ref)


# -- fused raw dispatch ----------------------------------------------------------------------------
def test_raw_path_is_used_and_gives_the_general_paths_bytes(tiny_llama_suite, tmp_path, test_methods):
    cfg = _cfg(tiny_llama_suite, "_test_raw_sum", {"scale": 0.7}, dtype="float32")
    raw = bmmstream.merge(cfg, out=tmp_path / "raw", run_dir=tmp_path / "r1", device="cpu", progress=False)
    assert test_methods["raw"] and "merge_sizes" not in test_methods  # every floating tensor took the raw path
    assert test_methods["observe_raw"] and "observe" not in test_methods
    n_float = len(test_methods["raw"])
    test_methods.clear()
    cfg["parameters"] = {"scale": 0.7, "refuse": True}  # merge_raw returns None: the general path
    gen = bmmstream.merge(cfg, out=tmp_path / "gen", run_dir=tmp_path / "r2", device="cpu", progress=False)
    assert len(test_methods["raw"]) == n_float and len(test_methods["merge_sizes"]) == n_float
    assert len(test_methods["observe"]) == n_float
    shards = lambda d: {k: v for k, v in _digest(d).items() if k != "README.md"}  # the card names the parameters
    assert shards(raw) == shards(gen)


def test_raw_path_not_asked_for_float64_compute(tiny_llama_suite, tmp_path, test_methods):
    cfg = _cfg(tiny_llama_suite, "_test_raw_sum", {"scale": 0.7}, dtype="float64")
    bmmstream.merge(cfg, out=tmp_path / "o", run_dir=tmp_path / "r", device="cpu", progress=False)
    assert "raw" not in test_methods and "observe_raw" not in test_methods and test_methods["merge_sizes"]


def test_per_tensor_methods_get_one_tensor_and_unit_methods_the_unit(tiny_llama_suite, tmp_path, test_methods,
                                                                     monkeypatch):
    import bmmstream.methods.registry as R

    sizes = []
    orig = R.MergeMethod.merge_unit
    monkeypatch.setattr(R.MergeMethod, "merge_unit", lambda self, inputs: sizes.append(len(inputs)) or orig(self, inputs))
    bmmstream.merge(_cfg(tiny_llama_suite, dtype="float64"), out=tmp_path / "a", run_dir=tmp_path / "ra",
                    device="cpu", progress=False)  # float64: the general path (no fused kernel)
    assert sizes and set(sizes) == {1}
    bmmstream.merge(_cfg(tiny_llama_suite, "_test_whole_unit", {}), out=tmp_path / "b", run_dir=tmp_path / "rb",
                    device="cpu", progress=False)
    assert max(test_methods["unit_sizes"]) > 1  # a layer's tensors together


def test_bmm_merges_module_by_module_with_the_units_bytes(tiny_llama_suite, tmp_path, monkeypatch):
    """BMM declares merges_by_module: one module's task vectors and statistics at a time, same bytes."""
    import bmmstream.methods.bmm as B

    cfg = _cfg(tiny_llama_suite, "bmm", {"anchor": "task_arithmetic", "rho": 0.01}, dtype="float64")
    by_module = bmmstream.merge(cfg, out=tmp_path / "a", run_dir=tmp_path / "ra", device="cpu", progress=False)
    sizes = []
    cls = next(c for c in vars(B).values() if isinstance(c, type) and getattr(c, "name", None) == "bmm")
    orig = cls.merge_unit
    monkeypatch.setattr(cls, "merge_unit", lambda self, inputs, stats=None: sizes.append(len(inputs))
                        or orig(self, inputs, stats))
    bmmstream.merge(cfg, out=tmp_path / "b", run_dir=tmp_path / "rb", device="cpu", progress=False)
    assert sizes and set(sizes) == {1}
    monkeypatch.setattr(cls, "merges_by_module", False)  # the whole unit at once, as before
    whole = bmmstream.merge(cfg, out=tmp_path / "c", run_dir=tmp_path / "rc", device="cpu", progress=False)
    assert _digest(by_module) == _digest(whole)


def test_explicit_auto_overrides_the_configs_count(tiny_llama_suite, tmp_path, monkeypatch):
    import bmmstream.pipeline as P

    monkeypatch.setattr(P, "resolve_threads", lambda v: 1)
    job = P.prepare(_cfg(tiny_llama_suite, threads=2), run_dir=tmp_path / "r", device="cpu", threads="auto")
    job.sources.close()
    assert job.threads == 1
    job = P.prepare(_cfg(tiny_llama_suite, threads=2), run_dir=tmp_path / "r", device="cpu")
    job.sources.close()
    assert job.threads == 2


def test_local_tensors_are_zero_copy_views_of_the_file(tiny_llama_suite):
    src = LocalSource(tiny_llama_suite.base)
    name = next(iter(src.tensor_infos()))
    a, b = src.get(name), src.get(name)
    assert a.data_ptr() == b.data_ptr()
    path = str(src.shard_of(name).resolve())
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    inside = [m for m in maps if len(m) >= 6 and m[5] == path
              and int(m[0].split("-")[0], 16) <= a.data_ptr() < int(m[0].split("-")[1], 16)]
    assert inside, "the tensor does not point into the file's mapping"
    src.close()


# -- writer: one commit per unit; write-behind bounded ----------------------------------------------
def test_one_journal_append_per_unit(tiny_llama_suite, tmp_path, monkeypatch):
    appends = []
    orig = ShardWriter._append
    monkeypatch.setattr(ShardWriter, "_append", lambda self, rec: appends.append(rec) or orig(self, rec))
    cfg = _cfg(tiny_llama_suite, shard_size="1GB")
    bmmstream.merge(cfg, out=tmp_path / "o", run_dir=tmp_path / "r", device="cpu", progress=False)
    from bmmstream.pipeline import plan_for
    from bmmstream.config import load_config

    units = plan_for(load_config(cfg), LocalSource(tiny_llama_suite.base)).units
    tensor_batches = [r for r in appends if isinstance(r, list)]
    assert [len(b) for b in tensor_batches] == [len(u) for u in units]


class _SlowWriter:
    def __init__(self):
        self.gate = threading.Event()
        self.log = []

    def write(self, name, tensor, commit=True):
        self.gate.wait(5)
        self.log.append(name)

    def commit(self):
        self.log.append("commit")


def test_write_behind_keeps_at_most_one_unit_pending():
    from bmmstream.output.behind import WriteBehind

    w = _SlowWriter()
    wb = WriteBehind(w)
    wb.put("a", torch.zeros(1))
    wb.end_unit()
    wb.wait_pending(1)  # one unit pending: no wait
    wb.put("b", torch.zeros(1))
    wb.end_unit()
    t0 = time.monotonic()
    threading.Timer(0.3, w.gate.set).start()
    wb.wait_pending(1)  # two pending: waits until the first is committed
    assert time.monotonic() - t0 >= 0.25
    wb.close()
    assert w.log == ["a", "commit", "b", "commit"]


def test_write_behind_error_reaches_the_producer():
    from bmmstream.output.behind import WriteBehind

    class Failing(_SlowWriter):
        def write(self, name, tensor, commit=True):
            raise BmmError(f"{name}: no space left on device")

    wb = WriteBehind(Failing())
    wb.put("a", torch.zeros(1))
    wb.end_unit()
    with pytest.raises(BmmError, match="a: no space left on device"):
        wb.wait_pending(0)
    wb.abort()


# -- crash between a unit's data fsync and its journal lines ----------------------------------------
KILL = textwrap.dedent(
    """
    import os, signal, sys, json
    import bmmstream, bmmstream.output.writer as W
    mode, k = sys.argv[1], int(sys.argv[2])
    n = {"batches": 0}
    orig = W.ShardWriter._append
    def append(self, rec):
        if isinstance(rec, list):  # a unit's (or a shard's end) tensor records, after the data fsync
            n["batches"] += 1
            if n["batches"] == k:
                if mode == "torn":  # half of the lines reach the journal, not fsync'd
                    text = "".join(json.dumps(r, separators=(",", ":")) + "\\n" for r in rec)
                    self._journal.write(text[: len(text) // 2])
                    self._journal.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, rec)
    W.ShardWriter._append = append
    bmmstream.merge(json.loads(sys.argv[3]), out=sys.argv[4], run_dir=sys.argv[5], device="cpu", progress=False,
                    threads=1)
    """
)


@pytest.mark.parametrize("method,mode,k", [("task_arithmetic", "before", 3), ("task_arithmetic", "torn", 5),
                                           ("ties", "before", 4)])
def test_killed_between_data_fsync_and_journal_resumes_bit_identical(tiny_llama_suite, tmp_path, method, mode, k):
    params = {"scale": 0.7} if method == "task_arithmetic" else {"density": 0.5}
    cfg = _cfg(tiny_llama_suite, method, params)
    ref = bmmstream.merge(cfg, out=tmp_path / "ref", run_dir=tmp_path / "rr", device="cpu", progress=False)
    out, run = tmp_path / "out", tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", KILL, mode, str(k), json.dumps(cfg), str(out), str(run)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    st = bmmstream.status(run)
    assert not st["complete"] and st["tensors_written"] > 0
    tmps = list((tmp_path / "out.partial").glob(".*.tmp"))
    assert tmps  # bytes beyond the journal were on disk when it died
    r = subprocess.run([sys.executable, "-m", "bmmstream.cli", "resume", str(run), "--device", "cpu", "--no-progress",
                        "--threads", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(out) == _digest(ref)
