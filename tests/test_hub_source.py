"""HubSource against the loopback Hub: bit-exact tensors, the disk budget, faults, errors, offline."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from hub_fixtures import hub, hub_env, load_server_module, serve_suite  # noqa: F401  (fixtures)

from bmmstream.errors import BmmError
from bmmstream.plan.layout import build_plan
from bmmstream.sources import open_source
from bmmstream.sources.hub import DiskBudget, HubSource, parse_spec
from bmmstream.sources.local import LocalSource

REPOS = ["org/base", "org/expert_0", "org/expert_1", "org/expert_2"]
FAST = {"retry_wait": 0.001, "max_wait": 0.01}


def _open(spec, tmp_path, **kw):
    return HubSource.from_spec(spec, cache_dir=tmp_path / "spool", **FAST, **kw)


def _stream_all(src: HubSource, units: list[list[str]]) -> dict[str, torch.Tensor]:
    """Read unit by unit the way the pipeline does: prefetch the next unit, get this one, release it."""
    out = {}
    for i, names in enumerate(units):
        if i + 1 < len(units):
            src.prefetch(units[i + 1])
        for n in names:
            out[n] = src.get(n)
        src.release(names)
    return out


def _assert_same(got: dict[str, torch.Tensor], local: LocalSource) -> None:
    assert sorted(got) == sorted(local.tensor_infos())
    for n, t in got.items():
        ref = local.get(n)
        assert t.dtype == ref.dtype and t.shape == ref.shape, n
        assert torch.equal(t.view(torch.uint8) if t.numel() else t, ref.view(torch.uint8) if ref.numel() else ref), n


def _units(src) -> list[list[str]]:
    return build_plan(src.config(), src.tensor_infos()).units


def _model_bytes(folder) -> int:
    return sum(i.nbytes for i in LocalSource(folder).tensor_infos().values())


def test_parse_spec():
    assert parse_spec("org/name") == ("org/name", "main")
    assert parse_spec("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_spec("hf://org/na-me.x@abc") == ("org/na-me.x", "abc")
    with pytest.raises(BmmError, match="not a local path and not a Hub repo"):
        parse_spec("just-a-name")


def test_every_tensor_bit_identical_and_revision_pinned(hub, tiny_llama_suite, tmp_path):
    for repo, folder in zip(REPOS, [tiny_llama_suite.base, *tiny_llama_suite.experts]):
        local = LocalSource(folder)
        src = open_source(repo, cache_dir=tmp_path / "spool", **FAST)
        assert isinstance(src, HubSource)
        assert re.fullmatch(r"[0-9a-f]{40}", src.revision)
        assert src.tensor_infos() == local.tensor_infos()
        assert src.config() == local.config()
        assert src.aux_files() == local.aux_files()
        for f in src.aux_files():
            assert src.aux_path(f).read_bytes() == (folder / f).read_bytes()
        _assert_same({n: src.get(n) for n in src.tensor_infos()}, local)  # no prefetch: straight into RAM
        assert src.high_water_bytes == 0
        # the recorded hash reads the same bytes, in every spelling
        for spec in (f"{repo}@{src.revision}", f"hf://{repo}@{src.revision}"):
            pinned = _open(spec, tmp_path)
            assert pinned.revision == src.revision
            _assert_same(_stream_all(pinned, _units(pinned)), local)
            pinned.close()
        src.close()


def test_budget_smaller_than_one_expert(hub, tiny_llama_suite, tmp_path):
    folder = tiny_llama_suite.experts[0]
    total = _model_bytes(folder)
    biggest = max(i.nbytes for i in LocalSource(folder).tensor_infos().values())
    budget = total // 3
    assert biggest < budget < total
    src = _open("org/expert_0", tmp_path, max_disk=budget)
    got = _stream_all(src, _units(src))
    _assert_same(got, LocalSource(folder))
    assert 0 < src.high_water_bytes <= budget  # prefetch really spooled, and never above the budget
    assert src.budget.reserved == 0 and src.budget.on_disk == 0
    assert list((tmp_path / "spool").glob("*/*")) == []  # consumed bytes were evicted
    src.close()
    assert list((tmp_path / "spool").iterdir()) == []  # spool folder removed


def test_spool_left_by_a_killed_process_is_removed(hub, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "spool" / f"bmm-hub-spool-{int(dead.stdout)}-abc"
    stale.mkdir(parents=True)
    (stale / "x.bin").write_bytes(b"0" * 100)
    alive = tmp_path / "spool" / f"bmm-hub-spool-{os.getppid()}-def"  # a live process: kept
    alive.mkdir()
    src = _open("org/base", tmp_path, max_disk=10**6)
    src.prefetch(list(src.tensor_infos())[:1])
    assert not stale.exists() and alive.is_dir()
    src.close()


def test_shared_budget_bounds_all_sources_together(hub, tiny_llama_suite, tmp_path):
    """Base + 3 experts streamed in lockstep with one budget smaller than a single expert."""
    limit = _model_bytes(tiny_llama_suite.base) // 3
    budget = DiskBudget(limit)
    srcs = [_open(r, tmp_path, max_disk=budget) for r in REPOS]
    locals_ = [LocalSource(f) for f in [tiny_llama_suite.base, *tiny_llama_suite.experts]]
    units = _units(srcs[0])
    for i, names in enumerate(units):
        if i + 1 < len(units):
            for s in srcs:
                s.prefetch(units[i + 1])
        for n in names:
            for s, loc in zip(srcs, locals_):
                assert torch.equal(s.get(n), loc.get(n)), (s.id, n)
        for s in srcs:
            s.release(names)
    assert 0 < budget.high_water <= limit
    assert sum(s.high_water_bytes for s in srcs) > 0
    for s in srcs:
        s.close()
    assert budget.reserved == 0 and budget.on_disk == 0


def test_adjacent_tensors_coalesce_into_one_request(hub, tiny_llama_suite, tmp_path):
    src = _open("org/base", tmp_path)
    after_header = src.range_requests
    names = list(src.tensor_infos())
    src.prefetch(names)
    for n in names:
        src.get(n)
    assert src.range_requests - after_header == 1  # one file, no budget: a single range read
    src.close()


def test_faults_every_5th_request_and_a_dropped_connection(hub, tiny_llama_suite, tmp_path):
    hub.set_faults(fail_every=5, drop=1)
    budget = _model_bytes(tiny_llama_suite.experts[1]) // 3
    src = _open("org/expert_1", tmp_path, max_disk=budget)
    got = _stream_all(src, _units(src))
    _assert_same(got, LocalSource(tiny_llama_suite.experts[1]))
    stats = hub.snapshot()
    assert stats["injected"]["drop"] == 1 and stats["injected"]["error_500"] >= 1
    assert src.retries > 0  # (a 500 on huggingface_hub's own HEAD is retried inside it, uncounted here)
    assert src.high_water_bytes <= budget
    src.close()


@pytest.mark.parametrize("fault", ["truncate", "ignore_range"])
def test_short_bodies_and_wrong_ranges_are_refetched(hub, tiny_llama_suite, tmp_path, fault):
    hub.set_faults(**{fault: 2})
    src = _open("org/expert_2", tmp_path)
    got = _stream_all(src, _units(src))
    _assert_same(got, LocalSource(tiny_llama_suite.experts[2]))
    assert hub.snapshot()["injected"][fault] == 2
    assert src.retries == 2
    src.close()


def test_retries_give_up_with_a_clear_error(hub, tmp_path):
    src = _open("org/base", tmp_path, max_retries=2)
    hub.set_faults(fail_every=1)
    name = sorted(src.tensor_infos())[0]
    with pytest.raises(BmmError) as e:
        src.get(name)
    assert str(e.value) == (
        f"Hub repo 'org/base' at revision {src.revision}, file 'model.safetensors': "
        f"download failed after 3 attempts (HTTP 500)"
    )
    # the same failure surfaces from the background thread through get()
    src.prefetch([name])
    with pytest.raises(BmmError, match="download failed after 3 attempts"):
        src.get(name)
    hub.set_faults(fail_every=0)
    src.close()


def test_tensor_larger_than_budget(hub, tmp_path):
    src = _open("org/base", tmp_path, max_disk=1000)
    name = "model.embed_tokens.weight"
    n = src.tensor_infos()[name].nbytes
    with pytest.raises(BmmError) as e:
        src.prefetch([name])
    assert str(e.value) == (
        f"Hub repo 'org/base' at revision {src.revision}, file 'model.safetensors': tensor '{name}' "
        f"is {n} bytes, more than the disk budget max_disk=1000"
    )
    src.close()


def test_nonexistent_repo(hub, tmp_path):
    with pytest.raises(BmmError) as e:
        _open("org/nope", tmp_path)
    assert str(e.value) == (
        "Hub repo 'org/nope' not found (HTTP 404): check the name; if it is private, log in or set HF_TOKEN"
    )


def test_nonexistent_revision(hub, tmp_path):
    with pytest.raises(BmmError) as e:
        _open("org/base@v9", tmp_path)
    assert str(e.value) == "Hub repo 'org/base' has no revision 'v9'"
    with pytest.raises(BmmError) as e:
        _open("org/base@" + "0" * 40, tmp_path)
    assert str(e.value) == f"Hub repo 'org/base' has no revision '{'0' * 40}'"


def test_missing_files(hub, tiny_llama_suite, tmp_path):
    root = hub.root
    # a sharded repo whose index names a shard that is not there
    broken = root / "org" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    (broken / "model-00001-of-00002.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(BmmError) as e:
        _open("org/broken", tmp_path)
    assert re.fullmatch(
        r"Hub repo 'org/broken' at revision [0-9a-f]{40}, file 'model-00002-of-00002.safetensors': "
        r"named by model.safetensors.index.json but not in the repo",
        str(e.value),
    ), str(e.value)
    # a repo without weights
    empty = root / "org" / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(BmmError) as e:
        _open("org/empty", tmp_path)
    assert re.fullmatch(
        r"Hub repo 'org/empty' at revision [0-9a-f]{40}: no model.safetensors or model.safetensors.index.json "
        r"in the repo \(bmmstream reads safetensors checkpoints only\)",
        str(e.value),
    ), str(e.value)
    # a file asked for by name that the repo lacks
    src = _open("org/base", tmp_path)
    with pytest.raises(BmmError) as e:
        src.aux_path("tokenizer.json")
    assert str(e.value) == (
        f"Hub repo 'org/base' at revision {src.revision}, file 'tokenizer.json': file not found on the Hub"
    )
    with pytest.raises(BmmError) as e:
        src.get("no.such.tensor")
    assert str(e.value) == f"Hub repo 'org/base' at revision {src.revision}: no tensor 'no.such.tensor'"
    src.close()


def test_token_required_gated_and_never_exposed(tiny_llama_suite, tmp_path, hub_env, monkeypatch):
    mod = load_server_module()
    root = tmp_path / "private-root"
    serve_suite(root, tiny_llama_suite)
    secret = "hf_secretTOKEN123"
    with mod.HubServer(root, token=secret, gated=("org/expert_0",)) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        with pytest.raises(BmmError) as e:
            _open("org/base", tmp_path)
        assert str(e.value) == (
            "Hub repo 'org/base' not found (HTTP 401): check the name; if it is private, log in or set HF_TOKEN"
        )
        with pytest.raises(BmmError) as e:
            _open("org/base", tmp_path, token="hf_wrong")
        assert str(e.value) == "Hub repo 'org/base': token rejected (HTTP 401): check HF_TOKEN or log in again"
        monkeypatch.setenv("HF_TOKEN", secret)  # the usual huggingface_hub mechanism
        with pytest.raises(BmmError) as e:
            _open("org/expert_0", tmp_path)
        assert str(e.value) == (
            "Hub repo 'org/expert_0': access denied (HTTP 403, gated repo): accept its terms with the account of your token"
        )
        src = _open("org/base", tmp_path, max_disk=10**6)
        _assert_same(_stream_all(src, _units(src)), LocalSource(tiny_llama_suite.base))
        assert secret not in repr(src) and secret not in repr(vars(src).get("budget"))
        src.close()
    for p in tmp_path.rglob("*"):
        if p.is_file() and not p.is_relative_to(root) and not p.is_symlink():
            assert secret.encode() not in p.read_bytes(), p


def test_offline_mode_works_from_the_cache(hub, hub_env, tiny_llama_suite, tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc
    from huggingface_hub import hf_hub_download

    online = _open("org/base", tmp_path)
    online.config()
    for f in online.aux_files():
        online.aux_path(f)
    hf_hub_download("org/base", "model.safetensors", revision=online.revision, endpoint=hub.url, cache_dir=hub_env)  # full file in the HF cache
    rev = online.revision
    online.close()
    only_config = _open("org/expert_1", tmp_path)
    only_config.config()  # config.json cached (and refs/main), the weights are not
    rev1 = only_config.revision
    only_config.close()
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    before = hub.snapshot()["requests"]
    for spec in ("org/base", f"org/base@{rev}"):
        src = _open(spec, tmp_path, max_disk=1000)
        assert src.revision == rev
        assert src.config() == LocalSource(tiny_llama_suite.base).config()
        _assert_same(_stream_all(src, _units(src)), LocalSource(tiny_llama_suite.base))
        src.close()
    assert hub.snapshot()["requests"] == before  # not one request went out
    with pytest.raises(BmmError) as e:
        _open("org/expert_0", tmp_path)
    assert str(e.value) == (
        "Hub repo 'org/expert_0': revision 'main' is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1)"
    )
    with pytest.raises(BmmError) as e:
        _open("org/expert_1", tmp_path)
    assert str(e.value) == (
        f"Hub repo 'org/expert_1' at revision {rev1}: no model.safetensors or model.safetensors.index.json "
        f"in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1)"
    )


def test_corrupt_header_is_a_clear_error(hub, tmp_path):
    hub.set_faults(corrupt=1)  # every byte of the header probe flipped: wrong content
    with pytest.raises(BmmError) as e:
        _open("org/base", tmp_path)
    assert re.fullmatch(
        r"Hub repo 'org/base' at revision [0-9a-f]{40}, file 'model.safetensors': corrupt safetensors header "
        r"\(declared header length \d+ does not fit in a \d+-byte file\)",
        str(e.value),
    ), str(e.value)


def test_get_does_not_wait_for_budget_only_the_caller_can_free(hub, tiny_llama_suite, tmp_path):
    """Budget for one tensor; A spooled and not consumed; B queued behind it is fetched by get() itself."""
    import threading
    import time

    src = _open("org/base", tmp_path)
    layer0 = [n for n in src.tensor_infos() if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    a, b = sorted(layer0, key=lambda n: src._loc[n][1])[:2]  # first two in file order
    sizes = src.tensor_infos()
    src.close()
    src = _open("org/base", tmp_path, max_disk=max(sizes[a].nbytes, sizes[b].nbytes))
    assert sizes[a].nbytes + sizes[b].nbytes > src.budget.limit
    src.prefetch([a, b])
    deadline = time.time() + 20
    while not src._worker_blocked and time.time() < deadline:  # A spooled, the worker waits for room for B
        time.sleep(0.01)
    assert src._worker_blocked
    got = {}
    t = threading.Thread(target=lambda: got.update(b=src.get(b)))
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "get() hung waiting for budget"
    local = LocalSource(tiny_llama_suite.base)
    assert torch.equal(got["b"], local.get(b)) and torch.equal(src.get(a), local.get(a))
    assert src.high_water_bytes == sizes[a].nbytes  # only A was ever spooled
    src.close()
