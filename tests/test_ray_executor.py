"""`executor: ray` (issue 14): units computed by Ray workers, the output byte-identical to a local run.

One local 2-CPU Ray instance serves the module (started once: Ray's start-up is most of the cost);
without Ray installed the module is skipped, and without `--executor ray` Ray is never imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bmmstream.errors import BmmError

ray = pytest.importorskip("ray")

FAULT_ENV = "BMMSTREAM_RAY_FAULT_FILE"  # bmmstream.executors.ray_units.FAULT_ENV


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray with 2 CPU slots; its workers see FAULT_ENV naming `fault` (absent unless a test writes it)."""
    fault = tmp_path_factory.mktemp("ray_fault") / "unit"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {FAULT_ENV: str(fault)}})
    yield fault
    ray.shutdown()


def _cfg(suite, anchor: str) -> dict:
    return {"base_model": str(suite.base), "models": [{"model": str(e)} for e in suite.experts],
            "merge_method": "bmm", "parameters": {"anchor": anchor, "rho": 0.05}, "shard_size": "40KB"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def local_runs(tiny_llama_suite, tmp_path_factory):
    """The single-process outputs (and solve logs) the Ray runs must reproduce byte for byte."""
    from bmmstream.api import merge

    root = tmp_path_factory.mktemp("local")
    out = {}
    for anchor in ("task_arithmetic", "ties"):
        m = merge(_cfg(tiny_llama_suite, anchor), out=root / anchor, run_dir=root / f"run-{anchor}",
                  device="cpu", progress=False)
        out[anchor] = (_files(m), _solve_log(root / f"run-{anchor}"))
    return out


def _solve_log(run: Path) -> bytes:
    """The run's solve records (BMM's lam per module), which the workers send back with their units."""
    from bmmstream.output.rundir import RunDir

    return RunDir(run).solve_log.read_bytes()


@pytest.mark.parametrize("anchor", ["task_arithmetic", "ties"])  # ties: the global-threshold prepass
def test_sharded_merge_equals_single_process(anchor, cluster, local_runs, tiny_llama_suite, tmp_path):
    from bmmstream.api import merge

    out = merge(_cfg(tiny_llama_suite, anchor), out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu",
                progress=False, executor={"kind": "ray", "workers": 2})
    files, log = local_runs[anchor]
    got = _files(out)
    assert sorted(got) == sorted(files) and len([f for f in got if f.endswith(".safetensors")]) > 2
    for name in files:
        assert got[name] == files[name], name
    assert _solve_log(tmp_path / "run") == log  # the workers' solve records, in unit order
    assert ray.is_initialized()  # a Ray the caller started is the caller's to shut down


def test_a_killed_worker_is_retried_and_the_bytes_are_the_same(cluster, local_runs, tiny_llama_suite, tmp_path):
    from bmmstream.api import merge

    cluster.write_text("3")  # the worker that gets unit 3 (a layer) kills its process once
    out = merge(_cfg(tiny_llama_suite, "ties"), out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu",
                progress=False, executor="ray", workers=2)
    assert not cluster.exists(), "the fault never fired"
    assert _files(out) == local_runs["ties"][0]
    assert _solve_log(tmp_path / "run") == local_runs["ties"][1]


def test_a_ray_run_resumes_a_killed_local_run(cluster, local_runs, tiny_llama_suite, tmp_path):
    """A run stopped after some units (journal and partial shards on disk) finishes on Ray, same bytes."""
    from bmmstream.api import merge
    from bmmstream.output.rundir import read_jsonl
    from bmmstream.pipeline import execute, prepare

    cfg = _cfg(tiny_llama_suite, "task_arithmetic")
    job = prepare(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu")
    units = job.plan.units

    class Stop(Exception):
        pass

    calls = {"n": 0}
    real = job.method.merge_unit

    def stop_at_third(*a, **k):  # the driver dies while merging its third unit
        calls["n"] += 1
        if calls["n"] == 3:
            raise Stop
        return real(*a, **k)

    job.method.merge_unit = stop_at_third
    with pytest.raises(Stop):
        execute(job, progress=False)
    job.sources.close()
    written = {r["tensor"] for r in read_jsonl(job.run.journal) if "tensor" in r}
    assert written and len(written) < sum(map(len, units))
    out = merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False,
                executor="ray", workers=2)
    assert _files(out) == local_runs["task_arithmetic"][0]


def test_a_workers_input_error_is_one_line(cluster, tiny_llama_suite, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from bmmstream.api import merge

    bad = Path(shutil.copytree(tiny_llama_suite.experts[1], tmp_path / "e1"))
    n = "model.layers.1.mlp.down_proj.weight"
    st = next(bad.glob("*.safetensors"))
    ts = load_file(st)
    ts[n] = ts[n].clone()
    ts[n].view(-1)[3] = float("nan")
    save_file(ts, st)
    cfg = _cfg(tiny_llama_suite, "task_arithmetic")
    cfg["models"][1]["model"] = str(bad)
    with pytest.raises(BmmError) as e:
        merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False,
              executor="ray", workers=2)
    assert str(e.value) == f"{bad}: tensor '{n}' contains NaN or Inf values"
    assert type(e.value) is BmmError


def test_more_workers_than_slots_is_refused_not_a_hang(cluster, tiny_llama_suite, tmp_path):
    from bmmstream.api import merge

    with pytest.raises(BmmError, match=r"^--workers 3: the local Ray has 2 CPU slot\(s\) \(one per worker\); "
                                       r"use --workers 2 or a larger cluster$"):
        merge(_cfg(tiny_llama_suite, "task_arithmetic"), out=tmp_path / "out", run_dir=tmp_path / "run",
              device="cpu", progress=False, executor="ray", workers=3)


def _data_offset(st: Path, name: str) -> int:
    """Absolute file offset of a tensor's first byte in a safetensors file."""
    n = int.from_bytes(st.read_bytes()[:8], "little")
    return 8 + n + json.loads(st.read_bytes()[8:8 + n])[name]["data_offsets"][0]


def test_hub_bytes_a_worker_merged_are_verified(cluster, tiny_llama_suite, tmp_path, monkeypatch):
    """The loopback Hub flips one bit of a layer tensor the first time a data range holding it is
    served (a worker's read); later reads (the driver's end-of-run verify) get the true bytes. The
    driver's verify must fail the run on the worker's bytes, as a local run fails on its own."""
    from hub_fixtures import load_server_module, serve_suite

    import huggingface_hub.constants as hfc

    from bmmstream.api import merge

    mod = load_server_module()
    serve_suite(tmp_path / "hub-root", tiny_llama_suite)
    n = "model.layers.1.mlp.down_proj.weight"
    target = next(tiny_llama_suite.experts[1].glob("*.safetensors")).resolve()
    at = _data_offset(target, n) + 5
    flipped = []
    real = mod._Handler._stream

    def stream(self, p, start, length, *, corrupt, bitflip=False):
        if not flipped and start > 0 and start <= at < start + length and Path(p).resolve() == target:
            flipped.append(start)
            with open(p, "rb") as f:
                f.seek(start)
                data = bytearray(f.read(length))
            data[at - start] ^= 1
            self.hub.add_bytes(len(data))
            self.wfile.write(bytes(data))
            return
        return real(self, p, start, length, corrupt=corrupt, bitflip=bitflip)

    monkeypatch.setattr(mod._Handler, "_stream", stream)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)
    with mod.HubServer(tmp_path / "hub-root") as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)  # the workers get it from the driver
        cfg = _cfg(tiny_llama_suite, "task_arithmetic") | {
            "base_model": "org/base", "models": [{"model": f"org/expert_{i}"} for i in range(3)]}
        with pytest.raises(BmmError, match=r"^Hub repo 'org/expert_1' at revision [0-9a-f]{40}, file "
                                           r"'model.safetensors': tensor 'model.layers.1.mlp.down_proj.weight' read "
                                           r"twice with different bytes"):
            merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False,
                  executor="ray", workers=2)
    assert flipped, "no worker read the tensor from the loopback Hub"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def test_a_local_merge_or_search_never_imports_ray(tiny_llama_suite, tmp_path):
    cfg = json.dumps(_cfg(tiny_llama_suite, "task_arithmetic") | {"merge_method": "task_arithmetic",
                                                                  "parameters": {}})
    search = json.dumps(_cfg(tiny_llama_suite, "task_arithmetic") | {"search": {
        "optimizer": "random", "budget": 2, "full_top_k": 0, "scorer": {"callable": "sys:getsizeof"}}})  # any number will do
    r = _run(f"""
import sys, json
import bmmstream, bmmstream.api, bmmstream.cli, bmmstream.pipeline, bmmstream.executors
from bmmstream.api import merge, search_merge
merge(json.loads({cfg!r}), out={str(tmp_path / 'out')!r}, run_dir={str(tmp_path / 'run')!r}, device='cpu',
      progress=False)
search_merge(json.loads({search!r}), out={str(tmp_path / 'sout')!r}, run_dir={str(tmp_path / 'srun')!r},
             device='cpu', progress=False)
print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))
""")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "sout" / "config.json").exists()


@pytest.mark.parametrize("args, expected", [
    (["--workers", "2"], "error: --workers and --address need --executor ray"),
    (["--executor", "dask"], "error: executor must be one of ['local', 'ray'], got 'dask'"),
])
def test_cli_executor_options_are_checked_before_any_work(args, expected, tiny_llama_suite, tmp_path):
    (tmp_path / "c.yaml").write_text(json.dumps(_cfg(tiny_llama_suite, "task_arithmetic")))
    r = subprocess.run([sys.executable, "-m", "bmmstream", "merge", str(tmp_path / "c.yaml"), "--out",
                        str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--no-progress", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_executor_spec_names_what_is_wrong():
    from bmmstream.executors import executor_spec

    assert executor_spec(None).kind == "local"
    assert executor_spec({"kind": "ray", "workers": 3, "address": "auto"}).address == "auto"
    with pytest.raises(BmmError, match=r"^workers must be an integer >= 1, got 0$"):
        executor_spec("ray", workers=0)
    with pytest.raises(BmmError, match=r"^executor: unknown key\(s\) \['gpus'\]; expected kind, workers, address$"):
        executor_spec({"kind": "ray", "gpus": 2})


def test_ray_missing_is_one_line(monkeypatch):
    import importlib.util

    from bmmstream.executors import executor_spec

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(BmmError, match=r"^--executor ray needs Ray, an optional extra: pip install 'bmmstream\[ray\]'$"):
        executor_spec("ray", workers=2)
