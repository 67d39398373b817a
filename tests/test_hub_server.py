"""The loopback Hub server speaks enough of the Hub protocol for huggingface_hub, and injects faults."""
from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hub_fixtures import load_server_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root(tmp_path):
    r = tmp_path / "root" / "org" / "m"
    r.mkdir(parents=True)
    (r / "config.json").write_text('{"model_type": "llama"}')
    (r / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (r / "sub").mkdir()
    (r / "sub" / "a.txt").write_text("hello")
    return tmp_path / "root"


@pytest.fixture
def server(repo_root):
    with load_server_module().HubServer(repo_root) as srv:
        yield srv


def _req(srv, method, path, headers=None, body=None):
    u = urlsplit(srv.url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r, data


def test_model_info_tree_and_revisions(server, repo_root):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.url, token=False)
    info = api.model_info("org/m", files_metadata=True)
    assert len(info.sha) == 40
    sib = {s.rfilename: s for s in info.siblings}
    assert set(sib) == {"config.json", "model.safetensors", "sub/a.txt"}
    data = (repo_root / "org/m/model.safetensors").read_bytes()
    assert sib["model.safetensors"].lfs.sha256 == hashlib.sha256(data).hexdigest()
    assert sib["model.safetensors"].size == 1024
    assert api.model_info("org/m", revision=info.sha).sha == info.sha  # the hash is a revision too
    top = {e.path for e in api.list_repo_tree("org/m", revision=info.sha)}
    assert top == {"config.json", "model.safetensors", "sub"}
    deep = {e.path for e in api.list_repo_tree("org/m", recursive=True)}
    assert deep == {"config.json", "model.safetensors", "sub", "sub/a.txt"}
    # content change -> new commit hash; the old one no longer resolves
    (repo_root / "org/m/config.json").write_text("{}")
    assert api.model_info("org/m").sha != info.sha


def test_resolve_head_get_and_ranges(server, repo_root):
    data = (repo_root / "org/m/model.safetensors").read_bytes()
    r, body = _req(server, "HEAD", "/org/m/resolve/main/model.safetensors")
    assert r.status == 200 and body == b""
    assert r.getheader("Content-Length") == "1024" and r.getheader("X-Linked-Size") == "1024"
    assert r.getheader("X-Linked-Etag") == f'"{hashlib.sha256(data).hexdigest()}"'
    assert len(r.getheader("X-Repo-Commit")) == 40 and r.getheader("Accept-Ranges") == "bytes"
    r, body = _req(server, "GET", "/org/m/resolve/main/model.safetensors", {"Range": "bytes=10-19"})
    assert r.status == 206 and body == data[10:20] and r.getheader("Content-Range") == "bytes 10-19/1024"
    r, body = _req(server, "GET", "/org/m/resolve/main/model.safetensors", {"Range": "bytes=1000-"})
    assert r.status == 206 and body == data[1000:]
    r, body = _req(server, "GET", "/org/m/resolve/main/model.safetensors", {"Range": "bytes=-4"})
    assert r.status == 206 and body == data[-4:]
    r, _ = _req(server, "GET", "/org/m/resolve/main/model.safetensors", {"Range": "bytes=2000-"})
    assert r.status == 416 and r.getheader("Content-Range") == "bytes */1024"
    r, body = _req(server, "GET", "/org/m/resolve/main/config.json")
    assert r.status == 200 and body == b'{"model_type": "llama"}' and r.getheader("X-Linked-Size") is None
    s = server.snapshot()
    assert s["bytes_served"] == 10 + 24 + 4 + len(body) and s["range_requests"] == 4


def test_errors_map_to_huggingface_hub_exceptions(server, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    kw = {"endpoint": server.url, "cache_dir": tmp_path / "c", "token": False}
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/none", "config.json", **kw)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/m", "nope.json", **kw)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/m", "config.json", revision="v2", **kw)
    assert Path(hf_hub_download("org/m", "sub/a.txt", **kw)).read_text() == "hello"


def test_auth(repo_root, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with load_server_module().HubServer(repo_root, token="s3cret") as srv:
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=srv.url, token=False).model_info("org/m")
        with pytest.raises(HfHubHTTPError) as e:
            HfApi(endpoint=srv.url, token="bad").model_info("org/m")
        assert e.value.response.status_code == 401
        assert HfApi(endpoint=srv.url, token="s3cret").model_info("org/m").id == "org/m"


def test_faults(server):
    path = "/org/m/resolve/main/model.safetensors"
    server.set_faults(fail_every=3)
    codes = [_req(server, "GET", "/api/models/org/m")[0].status for _ in range(6)]
    assert codes == [200, 200, 500, 200, 200, 500]
    server.set_faults(fail_every=0, truncate=1)
    r, body = _req(server, "GET", path, {"Range": "bytes=0-99"})
    assert r.status == 206 and len(body) == 50 and r.getheader("Content-Range") == "bytes 0-99/1024"
    server.set_faults(corrupt=1)
    r, body = _req(server, "GET", path, {"Range": "bytes=0-3"})
    assert body == bytes([255, 254, 253, 252])
    server.set_faults(bitflip=1)  # one bit of the body, the rest as on disk
    r, body = _req(server, "GET", path, {"Range": "bytes=0-3"})
    r2, good = _req(server, "GET", path, {"Range": "bytes=0-3"})
    assert body[0] == good[0] ^ 1 and body[1:] == good[1:] and len(body) == 4
    server.set_faults(ignore_range=1)
    r, body = _req(server, "GET", path, {"Range": "bytes=0-3"})
    assert r.status == 200 and len(body) == 1024
    server.set_faults(drop=1)
    with pytest.raises(http.client.IncompleteRead):
        _req(server, "GET", path)
    r, body = _req(server, "GET", path)  # only once
    assert r.status == 200 and len(body) == 1024
    # control endpoint: same settings over HTTP, not counted as requests
    before = server.snapshot()["requests"]
    r, body = _req(server, "POST", "/_control/faults", {"Content-Type": "application/json"}, json.dumps({"latency": 0.0, "fail_every": 7}))
    assert r.status == 200 and json.loads(body)["fail_every"] == 7
    r, body = _req(server, "GET", "/_control/stats")
    stats = json.loads(body)
    assert stats["requests"] == before
    assert stats["injected"] == {"error_500": 2, "truncate": 1, "corrupt": 1, "bitflip": 1, "ignore_range": 1, "drop": 1}
    r, body = _req(server, "POST", "/_control/faults", {}, json.dumps({"nonsense": 1}))
    assert r.status == 400


def test_cli_prints_url_and_serves(repo_root):
    p = subprocess.Popen([sys.executable, str(ROOT / "tools" / "hub_server.py"), "--root", str(repo_root), "--port", "0"],
                         stdout=subprocess.PIPE, text=True)
    try:
        url = p.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        u = urlsplit(url)
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        c.request("GET", "/api/models/org/m")
        assert json.loads(c.getresponse().read())["id"] == "org/m"
    finally:
        p.terminate()
        p.wait(timeout=10)
