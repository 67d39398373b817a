"""A Hugging Face Hub look-alike on 127.0.0.1 that serves local model folders, with fault injection.

It exists so tests and benchmarks can exercise bmmstream's Hub streaming (and huggingface_hub itself)
without a network: DIR/<org>/<name>/ is served as the model repo `org/name`, revision `main` or its
fake commit hash (sha1 over the folder's file hashes). Endpoints are the ones huggingface_hub uses:

- GET  /api/models/{org}/{name}[/revision/{rev}]   model info (sha, siblings with sizes and LFS info)
- GET  /api/models/{org}/{name}/tree/{rev}[/{path}] tree listing
- HEAD/GET /{org}/{name}/resolve/{rev}/{path}     file bytes, Range -> 206, X-Repo-Commit, ETag,
                                                  X-Linked-Etag / X-Linked-Size for LFS-like files
- GET  /_control/stats, POST /_control/faults (JSON), POST /_control/reset   (not counted, never faulty)

Errors carry the X-Error-Code header huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo). Faults (see `Faults`) can be set at start or later.

    python tools/hub_server.py --root DIR --port 0        # prints the URL, serves until Ctrl-C
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from email.utils import formatdate
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
LFS_MIN_SIZE = 10 * 2**20
CHUNK = 1 << 20
_FLIP = bytes(255 - i for i in range(256))


@dataclass
class Faults:
    """What goes wrong, and how often. Counts are 'remaining occurrences'; 0 disables a fault.

    Body faults (drop/truncate/corrupt/bitflip/ignore_range) apply only to GET /resolve responses whose
    file matches `body_glob` and whose body has at least 2 bytes.
    """

    latency: float = 0.0  # seconds added before every counted request
    fail_every: int = 0  # every N-th counted request answers 500
    drop: int = 0  # close the connection after half the body (Content-Length promised the whole)
    truncate: int = 0  # send half the body with a Content-Length that matches the half
    corrupt: int = 0  # flip every byte of the body (same length): wrong content
    ignore_range: int = 0  # answer a Range request with 200 and the whole file: wrong content
    bandwidth: float = 0.0  # bytes per second per response, 0 = unlimited
    body_glob: str = "*.safetensors"
    bitflip: int = 0  # flip the lowest bit of the body's first byte: a valid-looking file with wrong bytes

    def update(self, **kw) -> None:
        names = {f.name for f in fields(self)}
        for k, v in kw.items():
            if k not in names:
                raise ValueError(f"unknown fault {k!r}; known: {sorted(names)}")
            setattr(self, k, type(getattr(self, k))(v))


@dataclass
class Stats:
    requests: int = 0  # counted requests (everything but /_control)
    bytes_served: int = 0  # body bytes actually written
    range_requests: int = 0
    by_kind: dict = field(default_factory=dict)
    injected: dict = field(default_factory=dict)


class _Repo:
    """One folder served as a repo; file hashes are cached by (size, mtime)."""

    def __init__(self, repo_id: str, path: Path, hash_cache: dict, lock: threading.Lock):
        self.id = repo_id
        self.path = path
        self._hash_cache = hash_cache  # owned by the server, shared by requests
        self._lock = lock

    def files(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith(".") and fn != ".gitattributes":
                    continue
                out.append(Path(dirpath, fn).relative_to(self.path).as_posix())
        return sorted(out)

    @staticmethod
    def is_lfs(rel: str, size: int) -> bool:
        return rel.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE

    def file_hash(self, rel: str) -> str:
        """sha256 for LFS-like files (what the Hub uses as their ETag), git blob sha1 otherwise."""
        p = self.path / rel
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._hash_cache:
                return self._hash_cache[key]
        if self.is_lfs(rel, st.st_size):
            h = hashlib.sha256()
        else:
            h = hashlib.sha1()
            h.update(f"blob {st.st_size}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._hash_cache[key] = digest
        return digest

    def commit(self) -> str:
        h = hashlib.sha1()
        for rel in self.files():
            h.update(f"{rel} {self.file_hash(rel)}\n".encode())
        return h.hexdigest()

    def entry(self, rel: str) -> dict:
        size = (self.path / rel).stat().st_size
        digest = self.file_hash(rel)
        e = {"type": "file", "path": rel, "size": size}
        if self.is_lfs(rel, size):
            e["oid"] = hashlib.sha1(f"lfs {digest}".encode()).hexdigest()
            e["lfs"] = {"oid": digest, "size": size, "pointerSize": 134}
        else:
            e["oid"] = digest
        return e


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class HubServer:
    """The server object: `HubServer(root).start()`, `.url`, `.stats`, `.faults`, `.stop()`."""

    def __init__(
        self,
        root: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        gated: tuple[str, ...] = (),
        faults: Faults | None = None,
    ):
        self.root = Path(root)
        self.token = token  # when set, every counted request needs `Authorization: Bearer <token>`
        self.gated = set(gated)  # repos answering 403 GatedRepo even with a valid token
        self.faults = faults or Faults()
        self.stats = Stats()
        self.lock = threading.Lock()
        self._hash_cache: dict[tuple[str, int, int], str] = {}
        self._hash_lock = threading.Lock()
        self._httpd = _Httpd((host, port), _Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_faults(self, **kw) -> None:
        with self.lock:
            self.faults.update(**kw)

    def reset(self) -> None:
        """Clear faults and counters."""
        with self.lock:
            self.faults = Faults()
            self.stats = Stats()

    def snapshot(self) -> dict:
        with self.lock:
            return json.loads(json.dumps(asdict(self.stats)))

    # ---- bookkeeping used by the handler ----
    def count(self, kind: str) -> int:
        with self.lock:
            self.stats.requests += 1
            self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
            return self.stats.requests

    def injected(self, what: str) -> None:
        with self.lock:
            self.stats.injected[what] = self.stats.injected.get(what, 0) + 1

    def take(self, fault: str) -> bool:
        """Consume one occurrence of a counted fault."""
        with self.lock:
            n = getattr(self.faults, fault)
            if n > 0:
                setattr(self.faults, fault, n - 1)
                self.stats.injected[fault] = self.stats.injected.get(fault, 0) + 1
                return True
            return False

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.stats.bytes_served += n

    def repo(self, org: str, name: str) -> _Repo:
        repo_id = f"{org}/{name}"
        bad = any(p in ("", ".", "..") or "\\" in p for p in (org, name))
        path = self.root / org / name
        if bad or not path.is_dir():
            raise HubError(404, "RepoNotFound", "Repository not found")
        return _Repo(repo_id, path, self._hash_cache, self._hash_lock)

    def commit_for(self, repo: _Repo, rev: str) -> str:
        commit = repo.commit()
        if rev not in ("main", commit):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit


class _Httpd(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer


_API_RE = re.compile(r"^/api/models/([^/]+)/([^/]+)(?:/revision/([^/]+))?/?$")
_TREE_RE = re.compile(r"^/api/models/([^/]+)/([^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE_RE = re.compile(r"^/(?:models/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bmm-hub-server/1"
    timeout = 30  # idle keep-alive connections end after this

    def log_message(self, *args) -> None:  # quiet: tests read stats instead
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    # ---- plumbing ----
    def _send_json(self, status: int, obj, extra: dict | None = None, count: bool = True) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            if count:
                self.hub.add_bytes(len(body))  # counted before the write so a client never sees it uncounted
            self.wfile.write(body)

    def _send_error(self, err: HubError) -> None:
        extra = {"X-Error-Message": err.message}
        if err.code:
            extra["X-Error-Code"] = err.code
        if err.commit:
            extra["X-Repo-Commit"] = err.commit
        self._send_json(err.status, {"error": err.message}, extra)

    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _check_auth(self, repo_id: str | None) -> None:
        if self.hub.token is not None:
            auth = self.headers.get("Authorization")
            if auth is None:
                raise HubError(401, "RepoNotFound", "Repository not found")
            if auth != f"Bearer {self.hub.token}":
                raise HubError(401, None, "Invalid credentials in Authorization header")
        if repo_id is not None and repo_id in self.hub.gated:
            raise HubError(403, "GatedRepo", "Access to this repo is restricted")

    # ---- dispatch ----
    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/_control/"):
            self._control(path)
        else:
            self._send_error(HubError(405, None, "method not allowed"))

    def _control(self, path: str) -> None:
        try:
            if path == "/_control/stats":
                return self._send_json(200, self.hub.snapshot(), count=False)
            if path == "/_control/faults":
                body = self._read_body()
                if self.command == "POST":
                    self.hub.set_faults(**json.loads(body or b"{}"))
                with self.hub.lock:
                    faults = asdict(self.hub.faults)
                return self._send_json(200, faults, count=False)
            if path == "/_control/reset":
                self._read_body()
                self.hub.reset()
                return self._send_json(200, {"ok": True}, count=False)
            raise HubError(404, None, "unknown control endpoint")
        except (ValueError, TypeError) as e:
            self._send_json(400, {"error": str(e)}, count=False)
        except HubError as e:
            self._send_error(e)

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path.startswith("/_control/"):
            return self._control(path)
        m_api, m_tree, m_res = _API_RE.match(path), _TREE_RE.match(path), _RESOLVE_RE.match(path)
        kind = "resolve_" + self.command.lower() if m_res else ("tree" if m_tree else "model_info" if m_api else "other")
        n = self.hub.count(kind)
        with self.hub.lock:
            latency, fail_every = self.hub.faults.latency, self.hub.faults.fail_every
        if latency:
            time.sleep(latency)
        try:
            if fail_every and n % fail_every == 0:
                self.hub.injected("error_500")
                raise HubError(500, None, "Internal Error (injected)")
            if m_tree:
                org, name, rev, sub = (unquote(g) if g else g for g in m_tree.groups())
                return self._tree(org, name, rev, sub or "", query)
            if m_api and self.command == "GET":
                org, name, rev = (unquote(g) if g else g for g in m_api.groups())
                return self._model_info(org, name, rev or "main")
            if m_res:
                org, name, rev, rel = (unquote(g) for g in m_res.groups())
                return self._resolve(org, name, rev, rel)
            raise HubError(404, None, "Not Found")
        except HubError as e:
            self._send_error(e)

    # ---- endpoints ----
    def _model_info(self, org: str, name: str, rev: str) -> None:
        repo = self.hub.repo(org, name)
        self._check_auth(repo.id)
        commit = self.hub.commit_for(repo, rev)
        siblings = []
        for rel in repo.files():
            e = repo.entry(rel)
            s = {"rfilename": rel, "size": e["size"], "blobId": e["oid"]}
            if "lfs" in e:
                s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}
            siblings.append(s)
        info = {
            "_id": commit[:24],
            "id": repo.id,
            "modelId": repo.id,
            "author": org,
            "sha": commit,
            "private": self.hub.token is not None,
            "gated": False,
            "disabled": False,
            "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "siblings": siblings,
        }
        self._send_json(200, info)

    def _tree(self, org: str, name: str, rev: str, sub: str, query: dict) -> None:
        repo = self.hub.repo(org, name)
        self._check_auth(repo.id)
        commit = self.hub.commit_for(repo, rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        sub = sub.strip("/")
        base = repo.path / sub if sub else repo.path
        if sub and not base.is_dir():
            raise HubError(404, "EntryNotFound", f"{sub} does not exist on \"{rev}\"", commit)
        out = []
        dirs = set()
        for rel in repo.files():
            if sub and not rel.startswith(sub + "/"):
                continue
            rest = rel[len(sub) + 1 :] if sub else rel
            if "/" in rest and not recursive:
                d = (sub + "/" if sub else "") + rest.split("/")[0]
                dirs.add(d)
                continue
            if recursive:
                pieces = rest.split("/")[:-1]
                for i in range(1, len(pieces) + 1):
                    dirs.add((sub + "/" if sub else "") + "/".join(pieces[:i]))
            out.append(repo.entry(rel))
        for d in sorted(dirs):
            out.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()})
        out.sort(key=lambda e: e["path"])
        self._send_json(200, out)

    def _resolve(self, org: str, name: str, rev: str, rel: str) -> None:
        repo = self.hub.repo(org, name)
        self._check_auth(repo.id)
        commit = self.hub.commit_for(repo, rev)
        p = repo.path / rel
        if ".." in rel.split("/") or not p.is_file() or any(s.startswith(".") for s in rel.split("/")[:-1]):
            raise HubError(404, "EntryNotFound", f"{rel} does not exist on \"{rev}\"", commit)
        size = p.stat().st_size
        digest = repo.file_hash(rel)
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Last-Modified": formatdate(p.stat().st_mtime, usegmt=True),
        }
        if repo.is_lfs(rel, size):
            headers["X-Linked-Etag"] = f'"{digest}"'
            headers["X-Linked-Size"] = str(size)
        start, end, status = 0, size, 200  # [start, end)
        rng = self.headers.get("Range")
        body_faults = self.command == "GET" and fnmatch(rel.rsplit("/", 1)[-1], self.hub.faults.body_glob)
        if rng:
            with self.hub.lock:
                self.hub.stats.range_requests += 1
            m = _RANGE_RE.match(rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                raise HubError(416, None, "Invalid range")
            a, b = m.group(1), m.group(2)
            if a == "":
                start, end = max(size - int(b), 0), size
            else:
                start, end = int(a), size if b == "" else min(int(b) + 1, size)
            if start >= size or start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            if body_faults and end - start >= 2 and self.hub.take("ignore_range"):
                start, end, status = 0, size, 200
        length = end - start
        mode = None
        if body_faults and length >= 2:
            for f in ("drop", "truncate", "corrupt", "bitflip"):
                if self.hub.take(f):
                    mode = f
                    break
        send_len = length // 2 if mode in ("drop", "truncate") else length
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(send_len if mode == "truncate" else length))
        self.end_headers()
        if self.command == "HEAD":
            return
        self._stream(p, start, send_len, corrupt=mode == "corrupt", bitflip=mode == "bitflip")
        if mode == "drop":
            self.wfile.flush()
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.close_connection = True

    def _stream(self, p: Path, start: int, length: int, *, corrupt: bool, bitflip: bool = False) -> None:
        with self.hub.lock:
            bw = self.hub.faults.bandwidth
        t0 = time.perf_counter()
        sent = 0
        with open(p, "rb") as f:
            f.seek(start)
            while sent < length:
                chunk = f.read(min(CHUNK, length - sent))
                if not chunk:
                    break
                if corrupt:
                    chunk = chunk.translate(_FLIP)
                if bitflip and sent == 0:
                    chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
                self.hub.add_bytes(len(chunk))  # before the write: see _send_json
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.hub.add_bytes(-len(chunk))
                    self.close_connection = True
                    return
                sent += len(chunk)
                if bw:
                    ahead = sent / bw - (time.perf_counter() - t0)
                    if ahead > 0:
                        time.sleep(ahead)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve DIR/<org>/<name>/ folders as Hugging Face Hub model repos.")
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", default=None, help="require this bearer token (else 401)")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--fail-every", type=int, default=0)
    ap.add_argument("--drop", type=int, default=0, help="drop N connections mid-body")
    ap.add_argument("--truncate", type=int, default=0)
    ap.add_argument("--corrupt", type=int, default=0)
    ap.add_argument("--bitflip", type=int, default=0, help="flip one bit of N bodies")
    ap.add_argument("--ignore-range", type=int, default=0)
    ap.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s per response")
    a = ap.parse_args(argv)
    if not a.root.is_dir():
        ap.error(f"{a.root}: not a folder")
    faults = Faults(a.latency, a.fail_every, a.drop, a.truncate, a.corrupt, a.ignore_range, a.bandwidth,
                    bitflip=a.bitflip)
    srv = HubServer(a.root, host=a.host, port=a.port, token=a.token, faults=faults)
    print(srv.url, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv._httpd.server_close()


if __name__ == "__main__":
    main()
