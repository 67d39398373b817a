"""End to end: a merge whose inputs are streamed from the loopback Hub equals the local merge bit for bit,
under a disk budget smaller than one expert and with faults; bad repos fail the CLI cleanly."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_fixtures import hub, hub_env  # noqa: F401  (fixtures)

import bmmstream
import bmmstream.pipeline as pipeline
from bmmstream.sources import open_source as real_open_source
from bmmstream.sources.hub import DiskBudget, HubSource
from bmmstream.sources.local import LocalSource

ROOT = Path(__file__).resolve().parent.parent
HUB_SPECS = ["org/base", "org/expert_0", "org/expert_1", "org/expert_2"]


def _config(base: str, experts: list[str], **extra) -> dict:
    return {
        "base_model": base,
        "models": [{"model": e} for e in experts],
        "merge_method": "bmm",
        "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3},
                       "statistics": "data_free", "rho": 0.01},
        "dtype": "float64",
        "out_dtype": "float32",
        "shard_size": "60KB",
        **extra,
    }


def _weights_digest(folder: Path) -> dict[str, str]:
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.index.json"))
    assert files
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def local_merge(tiny_llama_suite, tmp_path):
    s = tiny_llama_suite
    out = bmmstream.merge(_config(str(s.base), [str(e) for e in s.experts]), out=tmp_path / "local",
                          run_dir=tmp_path / "run-local", device="cpu", progress=False)
    return _weights_digest(out)


@pytest.fixture
def recorded(monkeypatch):
    """Record the sources the pipeline opens (to read their high-water marks after the run)."""
    opened = []

    def recording(spec, **opts):
        src = real_open_source(spec, **opts)
        opened.append(src)
        return src

    monkeypatch.setattr(pipeline, "open_source", recording)
    return opened


def _one_expert_bytes(folder: Path) -> int:
    return sum(i.nbytes for i in LocalSource(folder).tensor_infos().values())


def test_hub_merge_bit_identical_to_local(hub, local_merge, tmp_path, recorded):
    out = bmmstream.merge(_config(HUB_SPECS[0], HUB_SPECS[1:]), out=tmp_path / "hub",
                          run_dir=tmp_path / "run-hub", device="cpu", progress=False)
    assert _weights_digest(out) == local_merge
    assert all(isinstance(s, HubSource) for s in recorded) and len(recorded) == 4
    # the run directory pins every Hub input to the commit it read
    text = "\n".join(p.read_text() for p in (tmp_path / "run-hub").rglob("*.json"))
    for s, spec in zip(recorded, HUB_SPECS):
        assert f"{spec}@{s.revision}" in text


def test_hub_merge_under_disk_budget_smaller_than_one_expert(hub, local_merge, tiny_llama_suite, tmp_path, recorded):
    limit = _one_expert_bytes(tiny_llama_suite.experts[0]) // 3
    out = bmmstream.merge(_config(HUB_SPECS[0], HUB_SPECS[1:], max_disk=limit), out=tmp_path / "hub",
                          run_dir=tmp_path / "run-hub", device="cpu", progress=False)
    assert _weights_digest(out) == local_merge
    assert len(recorded) == 4
    assert all(s.budget.limit == limit for s in recorded)
    assert all(s.high_water_bytes <= limit for s in recorded)
    assert sum(s.high_water_bytes for s in recorded) > 0  # bytes really went through the spool


def test_hub_merge_with_one_shared_budget(hub, local_merge, tiny_llama_suite, tmp_path, monkeypatch):
    """All inputs together stay under the budget when the sources share one DiskBudget."""
    limit = _one_expert_bytes(tiny_llama_suite.experts[0]) // 3
    shared = DiskBudget(limit)

    def with_shared_budget(spec, **opts):
        return real_open_source(spec, **{**opts, "max_disk": shared})

    monkeypatch.setattr(pipeline, "open_source", with_shared_budget)
    out = bmmstream.merge(_config(HUB_SPECS[0], HUB_SPECS[1:], max_disk=limit), out=tmp_path / "hub",
                          run_dir=tmp_path / "run-hub", device="cpu", progress=False)
    assert _weights_digest(out) == local_merge
    assert 0 < shared.high_water <= limit
    assert shared.reserved == 0 and shared.on_disk == 0


def test_hub_merge_with_faults(hub, local_merge, tiny_llama_suite, tmp_path, recorded, monkeypatch):
    monkeypatch.setattr(HubSource.__init__, "__kwdefaults__",
                        {**HubSource.__init__.__kwdefaults__, "retry_wait": 0.001, "max_wait": 0.01})
    hub.set_faults(fail_every=5, drop=1)
    limit = _one_expert_bytes(tiny_llama_suite.experts[0]) // 3
    out = bmmstream.merge(_config(HUB_SPECS[0], HUB_SPECS[1:], max_disk=limit), out=tmp_path / "hub",
                          run_dir=tmp_path / "run-hub", device="cpu", progress=False)
    assert _weights_digest(out) == local_merge
    injected = hub.snapshot()["injected"]
    assert injected["drop"] == 1 and injected["error_500"] >= 5
    assert sum(s.retries for s in recorded) > 0  # (huggingface_hub retries its own HEADs, uncounted here)


def test_hub_merge_with_token_keeps_it_out_of_every_file(tiny_llama_suite, local_merge, tmp_path, hub_env, monkeypatch):
    from hub_fixtures import load_server_module, serve_suite

    secret = "hf_mergeSECRET987"
    root = tmp_path / "private"
    serve_suite(root, tiny_llama_suite)
    with load_server_module().HubServer(root, token=secret) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_TOKEN", secret)
        out = bmmstream.merge(_config(HUB_SPECS[0], HUB_SPECS[1:]), out=tmp_path / "hub",
                              run_dir=tmp_path / "run-hub", device="cpu", progress=False)
    assert _weights_digest(out) == local_merge
    for p in [*(tmp_path / "run-hub").rglob("*"), *out.rglob("*"), *hub_env.rglob("*")]:
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


def test_offline_merge_from_the_hf_cache(hub, hub_env, local_merge, tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc
    from huggingface_hub import snapshot_download

    for spec in HUB_SPECS:
        snapshot_download(spec, endpoint=hub.url, cache_dir=hub_env)
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    before = hub.snapshot()["requests"]
    out = bmmstream.merge(_config(HUB_SPECS[0], HUB_SPECS[1:]), out=tmp_path / "hub",
                          run_dir=tmp_path / "run-hub", device="cpu", progress=False)
    assert _weights_digest(out) == local_merge
    assert hub.snapshot()["requests"] == before  # nothing went over the network


def test_cli_max_disk_flag(hub, hub_env, local_merge, tiny_llama_suite, tmp_path):
    limit = _one_expert_bytes(tiny_llama_suite.experts[0]) // 3
    (tmp_path / "c.yaml").write_text(json.dumps(_config(HUB_SPECS[0], HUB_SPECS[1:])))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(hub_env)}
    r = subprocess.run([sys.executable, "-m", "bmmstream.cli", "merge", str(tmp_path / "c.yaml"), "--out",
                        str(tmp_path / "o"), "--run-dir", str(tmp_path / "r"), "--no-progress",
                        "--max-disk", str(limit)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _weights_digest(tmp_path / "o") == local_merge
    assert hub.snapshot()["range_requests"] > 4  # tensors came over range reads, not from a cache


def _broken_repo(root: Path) -> None:
    broken = root / "org" / "noweights"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("org/nope", "error: Hub repo 'org/nope' not found (HTTP 404): check the name; if it is private, "
                     "log in or set HF_TOKEN"),
        ("org/expert_1@v9", "error: Hub repo 'org/expert_1' has no revision 'v9'"),
        ("org/noweights", "error: Hub repo 'org/noweights' at revision {rev}: no model.safetensors or "
                          "model.safetensors.index.json in the repo (bmmstream reads safetensors checkpoints only)"),
    ],
)
def test_cli_bad_repo_fails_cleanly(hub, hub_env, tmp_path, case, expected):
    _broken_repo(hub.root)
    cfg = _config(HUB_SPECS[0], [HUB_SPECS[1], case])
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(hub_env)}
    r = subprocess.run([sys.executable, "-m", "bmmstream.cli", "merge", str(tmp_path / "c.yaml"), "--out",
                        str(tmp_path / "o"), "--run-dir", str(tmp_path / "r"), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    if "{rev}" in expected:
        from huggingface_hub import HfApi

        expected = expected.format(rev=HfApi(endpoint=hub.url).model_info(case).sha)
    assert err[0] == expected
    assert r.stdout.strip() == ""
    assert not (tmp_path / "o").exists()
