"""A model repo on the Hugging Face Hub, streamed tensor by tensor under a disk budget.

Why: five 8B experts are 80+ GB; downloading them all before merging needs that much disk. This
source resolves `org/name[@rev]` to a commit hash once (so a resumed run reads the same bytes),
reads the safetensors headers with range requests, and fetches tensor bytes with HTTP range reads
through huggingface_hub's session, coalescing adjacent tensors of one file into one request.

- `prefetch(names)` queues tensors for a background thread that downloads them into a spool folder
  on disk (not RAM); `get(name)` returns the spooled bytes and evicts them (consumed), or fetches
  directly into memory when the tensor was not queued (or is still waiting for budget), so the
  consumer never waits on a budget that only it can free; `release(names)` cancels what is left.
- `DiskBudget`: the spooled bytes never exceed `max_disk`; a prefetch waits for room. One budget can
  be shared by several sources (pass the same `DiskBudget` as `max_disk`) to bound their total.
- Faults: 5xx/408/429, timeouts, dropped connections, short bodies and wrong ranges are retried with
  exponential backoff, continuing a partial transfer from the first missing byte; 401/403/404 and a
  missing revision end with a BmmError naming the repo (and file).
- Integrity: the bytes handed to the merge are hashed per file and, before the output is presented
  as complete, `verify()` compares each weight file with the sha256 and size the Hub records (LFS
  metadata of the pinned commit); a tensor read twice must be byte-identical.
- HF_HUB_OFFLINE=1: works from the Hugging Face cache (a full safetensors file there is read
  directly, online too); what is not cached is a clear error. The token comes from huggingface_hub
  (`token=` or HF_TOKEN / the saved login) and is never logged or written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx2
import torch
from huggingface_hub import HfApi, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from bmmstream.errors import BmmError
from bmmstream.sources.base import AUX_FILES, ST_TO_TORCH, TensorInfo, read_config_json
from bmmstream.sources.header import parse_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CHUNK = 1 << 20
MAX_REQUEST_BYTES = 256 << 20  # one coalesced range request at most
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
SPOOL_PREFIX = "bmm-hub-spool-"
_SPEC_RE = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.\-]*)/([A-Za-z0-9][\w.\-]*)(?:@(.+))?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def parse_spec(spec: str) -> tuple[str, str]:
    """`org/name`, `org/name@rev`, `hf://org/name@rev` -> (repo_id, revision); revision defaults to main."""
    m = _SPEC_RE.match(spec.strip())
    if m is None or ".." in spec:
        raise BmmError(
            f"{spec}: not a local path and not a Hub repo (write org/name, org/name@revision or hf://org/name)"
        )
    return f"{m.group(1)}/{m.group(2)}", (m.group(3) or "main")


class DiskBudget:
    """Bytes of downloaded tensor data held on disk, bounded by `limit` (None: unbounded).

    `reserved` gates new downloads (a download reserves its bytes before starting); `on_disk` counts
    bytes actually written and not yet evicted; `high_water` is the largest `on_disk` seen.
    The condition variable is shared by every source using this budget (their state is guarded by it).
    """

    def __init__(self, limit: int | None):
        if limit is not None and limit < 0:
            raise BmmError(f"max_disk must be >= 0 bytes, got {limit}")
        self.limit = limit
        self.cv = threading.Condition()
        self.reserved = 0
        self.on_disk = 0
        self.high_water = 0

    def fits(self, n: int) -> bool:
        return self.limit is None or self.reserved + n <= self.limit


class _Transient(Exception):
    """A response that was not what was asked for (short body, wrong range): worth retrying."""


class _Aborted(Exception):
    """The source was closed while a download ran."""


def _http_status(e: BaseException | None) -> int | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code
        e = e.__cause__ or e.__context__
    return None


def _is_transient(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (_Transient, httpx2.TransportError)):
            return True
        if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)):
            return False
        if isinstance(e, HfHubHTTPError):
            return e.response is not None and e.response.status_code in RETRY_STATUS
        if isinstance(e, OSError) and str(e).startswith("Consistency check failed"):
            return True  # huggingface_hub's own size check of a download (a truncated body)
        e = e.__cause__ or e.__context__
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_spools(root: Path) -> None:
    """Spool folders left by a killed process still hold bytes on disk: remove them (the budget is
    about what is on disk, and a resumed run starts a fresh spool)."""
    if not root.is_dir():
        return
    for d in root.glob(f"{SPOOL_PREFIX}*"):
        pid = d.name[len(SPOOL_PREFIX):].split("-")[0]
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


class _FileHash:
    """sha256 of one repo file, fed with the bytes the merge used: a range that reaches the end of the
    hashed prefix extends it, so reads in file order cost no extra transfer, and `HubSource.verify`
    only fetches what was skipped."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.pos = 0
        self.lock = threading.Lock()

    def feed(self, start: int, chunk) -> None:
        with self.lock:
            if start <= self.pos < start + len(chunk):
                self.h.update(memoryview(chunk)[self.pos - start :])
                self.pos = start + len(chunk)


def _tensor_from(buf: bytearray, info: TensorInfo) -> torch.Tensor:
    dt = ST_TO_TORCH[info.dtype]
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dt)
    return torch.frombuffer(buf, dtype=dt).reshape(info.shape)


class HubSource:
    """TensorSource over a Hub model repo at one pinned commit (see the module docstring)."""

    def __init__(
        self,
        spec: str,
        *,
        max_disk: int | DiskBudget | None = None,
        cache_dir: str | os.PathLike | None = None,
        endpoint: str | None = None,
        token: str | bool | None = None,
        hf_cache_dir: str | os.PathLike | None = None,
        max_retries: int = 8,
        retry_wait: float = 0.5,
        max_wait: float = 8.0,
        timeout: float = 30.0,
    ):
        self.id = spec
        self.repo_id, self.requested_revision = parse_spec(spec)
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT).rstrip("/")
        self.budget = max_disk if isinstance(max_disk, DiskBudget) else DiskBudget(max_disk)
        self.max_retries, self.retry_wait, self.max_wait, self.timeout = max_retries, retry_wait, max_wait, timeout
        self.hf_cache_dir = str(hf_cache_dir or os.environ.get("HF_HUB_CACHE") or hf_constants.HF_HUB_CACHE)
        self._token = token  # handed to huggingface_hub only; never logged or written
        self._api = HfApi(endpoint=self.endpoint, token=token)
        self.offline = hf_constants.is_offline_mode()
        # counters (read by tests and the bench)
        self.high_water_bytes = 0  # most downloaded bytes this source held on disk at once
        self.bytes_downloaded = 0
        self.range_requests = 0
        self.retries = 0
        # streaming state, guarded by the budget's condition variable
        self._cv = self.budget.cv
        self._on_disk = 0
        self._queue: dict[str, None] = {}  # names waiting for the worker, in fetch order
        self._state: dict[str, object] = {}  # name -> "fetching" | "ready" | BaseException
        self._spooled: dict[str, Path] = {}
        self._drop_when_done: set[str] = set()
        self._worker: threading.Thread | None = None
        self._worker_blocked = False  # the worker waits for budget (then get() fetches by itself)
        self._closed = False
        root = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
        self._spool_root = root
        self._spool: Path | None = None  # created on first prefetch
        self._config: dict | None = None
        self._recorded: dict[str, tuple[str, int]] = {}  # file -> the Hub's LFS (sha256, size)
        self._hashes: dict[str, _FileHash] = {}
        self._digests: dict[str, bytes] = {}  # tensor -> sha256 of the bytes first used

        self.revision, self._files = self._resolve()
        self._local: dict[str, Path] = {}  # weight files found complete in the HF cache
        self._loc: dict[str, tuple[str, int, int]] = {}  # name -> (file, absolute start, end)
        self._infos: dict[str, TensorInfo] = {}
        for fn in self._weight_files():
            for name, (info, start, end) in self._read_header(fn).items():
                if name in self._loc:
                    raise BmmError(
                        f"Hub repo '{self.repo_id}' at revision {self.revision}: tensor '{name}' appears in both "
                        f"{self._loc[name][0]} and {fn}"
                    )
                self._infos[name] = info
                self._loc[name] = (fn, start, end)

    @classmethod
    def from_spec(cls, spec: str, **options) -> "HubSource":
        return cls(spec, **options)

    def __repr__(self) -> str:
        return f"HubSource({self.repo_id!r}, revision={getattr(self, 'revision', None)!r}, endpoint={self.endpoint!r})"

    # ---- errors and retries ---------------------------------------------------------------
    def _where(self, filename: str | None) -> str:
        rev = getattr(self, "revision", None) or self.requested_revision
        at = f"Hub repo '{self.repo_id}' at revision {rev}"
        return f"{at}, file '{filename}'" if filename else at

    def _error(self, e: BaseException, filename: str | None, attempts: int = 1) -> BmmError:
        """Translate a huggingface_hub / httpx failure into one line naming the repo (and file)."""
        if isinstance(e, BmmError):
            return e
        status = _http_status(e)
        repo = self.repo_id
        if isinstance(e, OfflineModeIsEnabled) or (self.offline and isinstance(e, LocalEntryNotFoundError)):
            return BmmError(f"{self._where(filename)}: not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1)")
        if isinstance(e, GatedRepoError) or isinstance(e.__cause__, GatedRepoError):
            return BmmError(f"Hub repo '{repo}': access denied (HTTP 403, gated repo): accept its terms with the account of your token")
        if isinstance(e, RevisionNotFoundError):
            return BmmError(f"Hub repo '{repo}' has no revision '{self.requested_revision}'")
        if isinstance(e, RemoteEntryNotFoundError):
            return BmmError(f"{self._where(filename)}: file not found on the Hub")
        if isinstance(e, RepositoryNotFoundError):
            return BmmError(
                f"Hub repo '{repo}' not found (HTTP {status}): check the name; if it is private, log in or set HF_TOKEN"
            )
        if status == 401:
            return BmmError(f"Hub repo '{repo}': token rejected (HTTP 401): check HF_TOKEN or log in again")
        if status == 403:
            return BmmError(f"{self._where(filename)}: access denied (HTTP 403)")
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if status is not None:
            reason = f"HTTP {status}"
        if _is_transient(e):
            return BmmError(f"{self._where(filename)}: download failed after {attempts} attempts ({reason})")
        return BmmError(f"{self._where(filename)}: {type(e).__name__}: {reason}")

    def _backoff(self, attempt: int) -> None:
        with self._cv:
            self.retries += 1
        time.sleep(min(self.retry_wait * 2 ** (attempt - 1), self.max_wait))

    def _retrying(self, filename: str | None, fn):
        """Call fn(), retrying transient failures with exponential backoff."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:
                attempt += 1
                if not _is_transient(e) or attempt > self.max_retries:
                    raise self._error(e, filename, attempt) from None
                self._backoff(attempt)

    # ---- revision, files, headers ------------------------------------------------------------
    def _storage(self) -> Path:
        return Path(self.hf_cache_dir) / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    def _resolve(self) -> tuple[str, dict[str, int]]:
        """Commit hash and {file: size} of the repo at the requested revision."""
        rev = self.requested_revision
        if self.offline:
            commit = rev if _COMMIT_RE.match(rev) else None
            ref = self._storage() / "refs" / rev
            if commit is None and ref.is_file():
                commit = ref.read_text().strip()
            snap = self._storage() / "snapshots" / (commit or "")
            if commit is None or not snap.is_dir():
                raise BmmError(
                    f"Hub repo '{self.repo_id}': revision '{rev}' is not in the Hugging Face cache "
                    f"and offline mode is on (HF_HUB_OFFLINE=1)"
                )
            files = {
                p.relative_to(snap).as_posix(): p.stat().st_size for p in snap.rglob("*") if p.is_file()
            }
            return commit, files
        info = self._retrying(None, lambda: self._api.model_info(self.repo_id, revision=rev, files_metadata=True))
        if not info.sha or not _COMMIT_RE.match(info.sha):
            raise BmmError(f"Hub repo '{self.repo_id}': the server did not report a commit hash for revision '{rev}'")
        if rev != info.sha:  # remember the branch -> commit as huggingface_hub does, so offline runs resolve it
            try:
                ref = self._storage() / "refs" / rev
                ref.parent.mkdir(parents=True, exist_ok=True)
                if not ref.is_file() or ref.read_text() != info.sha:
                    ref.write_text(info.sha)
            except OSError:
                pass  # a read-only cache only costs offline resolution of the branch name
        self._recorded = {
            s.rfilename: (s.lfs.sha256, int(s.lfs.size)) for s in (info.siblings or []) if s.lfs is not None
        }
        return info.sha, {s.rfilename: (s.size if s.size is not None else -1) for s in (info.siblings or [])}

    def _download(self, filename: str) -> Path:
        """A small file of the repo through huggingface_hub's cache (config, index, tokenizer)."""
        return Path(
            self._retrying(
                filename,
                lambda: hf_hub_download(
                    self.repo_id,
                    filename,
                    revision=self.revision,
                    cache_dir=self.hf_cache_dir,
                    endpoint=self.endpoint,
                    token=self._token,
                    local_files_only=self.offline,
                ),
            )
        )

    def _weight_files(self) -> list[str]:
        if SINGLE_NAME in self._files:
            files = [SINGLE_NAME]
        elif INDEX_NAME in self._files:
            p = self._download(INDEX_NAME)
            try:
                weight_map = json.loads(p.read_text())["weight_map"]
                files = list(dict.fromkeys(str(v) for v in weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise BmmError(f"{self._where(INDEX_NAME)}: not a valid safetensors index ({e})") from None
            missing = [f for f in files if f not in self._files]
            if missing and not self.offline:
                raise BmmError(f"{self._where(missing[0])}: named by {INDEX_NAME} but not in the repo")
        else:
            others = sorted(f for f in self._files if f.endswith(".safetensors") and "/" not in f)
            if others:
                files = others
            elif self.offline:
                raise BmmError(
                    f"{self._where(None)}: no {SINGLE_NAME} or {INDEX_NAME} in the Hugging Face cache "
                    f"and offline mode is on (HF_HUB_OFFLINE=1)"
                )
            else:
                raise BmmError(
                    f"{self._where(None)}: no {SINGLE_NAME} or {INDEX_NAME} in the repo "
                    f"(bmmstream reads safetensors checkpoints only)"
                )
        for fn in files:
            cached = try_to_load_from_cache(self.repo_id, fn, cache_dir=self.hf_cache_dir, revision=self.revision)
            if isinstance(cached, str) and os.path.isfile(cached):
                self._local[fn] = Path(cached)
                self._files[fn] = os.path.getsize(cached)
            elif self.offline:
                raise BmmError(
                    f"{self._where(fn)}: not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1)"
                )
        return files

    def _read_header(self, fn: str) -> dict[str, tuple[TensorInfo, int, int]]:
        size = self._files.get(fn, -1)
        got: list[bytearray] = []  # contiguous reads from byte 0

        def read(a: int, b: int) -> bytearray:
            got.append(self._read_bytes(fn, a, b))
            return got[-1]

        entries = parse_header(self._where(fn), read, size if size >= 0 else None)
        head = b"".join(got)
        self._hasher(fn).feed(0, head[: 8 + int.from_bytes(head[:8], "little")])  # the header, not the data probed
        return entries

    # ---- byte transfer ---------------------------------------------------------------------
    def _read_bytes(self, fn: str, start: int, end: int) -> bytearray:
        """Bytes [start, end) of a repo file, into memory."""
        buf = bytearray()
        if end <= start:
            return buf
        if fn in self._local:
            with open(self._local[fn], "rb") as f:
                f.seek(start)
                buf = bytearray(end - start)
                got = f.readinto(buf)
            if got != end - start:
                raise BmmError(f"{self._local[fn]}: file ended before byte {end}")
            return buf
        self._stream_range(fn, start, end, buf.extend)
        return buf

    def _stream_range(self, fn: str, start: int, end: int, sink) -> None:
        """Feed bytes [start, end) of `fn` to sink(chunk) in order, resuming after faults."""
        if self.offline:
            raise self._error(OfflineModeIsEnabled("offline mode"), fn)
        url = hf_hub_url(self.repo_id, fn, revision=self.revision, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token)
        headers["Accept-Encoding"] = "identity"
        pos, attempt = start, 0
        while pos < end:
            before = pos
            try:
                headers["Range"] = f"bytes={pos}-{end - 1}"
                with get_session().stream("GET", url, headers=headers, timeout=self.timeout) as r:
                    if r.status_code >= 400:
                        r.read()
                        hf_raise_for_status(r)
                    cr = r.headers.get("Content-Range", "")
                    whole = r.status_code == 200 and pos == 0 and end == self._files.get(fn, -1)
                    if not whole and (r.status_code != 206 or not cr.startswith(f"bytes {pos}-{end - 1}/")):
                        raise _Transient(
                            f"asked for bytes {pos}-{end - 1}, got HTTP {r.status_code} {cr or 'without Content-Range'}"
                        )
                    with self._cv:
                        self.range_requests += 1
                    for chunk in r.iter_bytes(CHUNK):
                        if self._closed:
                            raise _Aborted()
                        take = chunk[: end - pos]
                        if take:
                            sink(take)
                            pos += len(take)
                            with self._cv:
                                self.bytes_downloaded += len(take)
                        if pos >= end:
                            break
                if pos < end:
                    raise _Transient(f"body ended {end - pos} bytes short")
            except _Aborted:
                raise
            except Exception as e:
                attempt = 1 if pos > before else attempt + 1  # progress resets the count
                if not _is_transient(e) or attempt > self.max_retries:
                    raise self._error(e, fn, attempt) from None
                self._backoff(attempt)

    # ---- integrity -------------------------------------------------------------------------
    def _hasher(self, fn: str) -> _FileHash:
        with self._cv:
            return self._hashes.setdefault(fn, _FileHash())

    def _account(self, name: str, fn: str, start: int, buf) -> None:
        """Bytes handed to the merge: they extend the file's sha256, and a tensor read again (a prepass,
        a resumed unit) must be byte-identical to its first read, which the file hash covers."""
        digest = hashlib.sha256(buf).digest()
        with self._cv:
            first = self._digests.setdefault(name, digest)
        if first != digest:
            raise BmmError(f"{self._where(fn)}: tensor '{name}' read twice with different bytes (corrupted in "
                           f"transit or changed on the server); rerun to fetch it again")
        self._hasher(fn).feed(start, buf)

    def verify(self) -> None:
        """Check each weight file against the sha256 and size the Hub records for it (LFS files).

        Why: a header can be valid while tensor bytes were corrupted in transit or changed under a
        pinned name; the merge must not present such an output as complete. The header and the
        tensors used in file order were hashed as they came; the rest of the file is fetched once more
        here, one tensor at a time (a tensor used out of order must match its first read). Files the
        Hub lists without LFS metadata (offline runs, non-LFS files) are not checked. A resumed run
        checks the bytes it used itself."""
        for fn in sorted({loc[0] for loc in self._loc.values()}):
            if fn not in self._recorded:
                continue
            sha, size = self._recorded[fn]
            hasher = self._hasher(fn)
            spans = sorted((a, b, n) for n, (f, a, b) in self._loc.items() if f == fn and a >= hasher.pos and b > a)
            for a, b, n in spans + [(size, size, None)]:
                if hasher.pos < a:  # padding between tensors, or past the last one
                    hasher.feed(hasher.pos, self._read_bytes(fn, hasher.pos, a))
                if n is not None:
                    self._account(n, fn, a, self._read_bytes(fn, a, b))
            if hasher.pos != size or hasher.h.hexdigest() != sha:
                raise BmmError(
                    f"{self._where(fn)}: the bytes read do not match the Hub's recorded sha256 {sha[:16]}... "
                    f"of {size} bytes (corrupted in transit or changed on the server); rerun to fetch them again"
                )

    # ---- TensorSource ----------------------------------------------------------------------
    def tensor_infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def config(self) -> dict:
        if self._config is None:
            if "config.json" not in self._files:
                self._config = {}
            else:
                self._config = read_config_json(self._download("config.json"), self._where("config.json"))
        return dict(self._config)

    def aux_files(self) -> list[str]:
        return [f for f in AUX_FILES if f in self._files]

    def aux_path(self, filename: str) -> Path:
        return self._download(filename)

    def prefetch(self, names: list[str]) -> None:
        """Queue tensors for the background download, in file order so neighbours coalesce."""
        if self._closed:
            raise BmmError(f"Hub repo '{self.repo_id}': source is closed")
        todo = []
        for n in names:
            loc = self._loc.get(n)
            if loc is None or loc[0] in self._local or loc[2] == loc[1]:
                continue  # unknown (get() will say so), cached locally, or empty
            nbytes = loc[2] - loc[1]
            if self.budget.limit is not None and nbytes > self.budget.limit:
                raise BmmError(
                    f"{self._where(loc[0])}: tensor '{n}' is {nbytes} bytes, more than the disk budget "
                    f"max_disk={self.budget.limit}"
                )
            todo.append(n)
        todo.sort(key=lambda n: self._loc[n][:2])
        with self._cv:
            for n in todo:
                if n not in self._state and n not in self._queue:
                    self._queue[n] = None
            if self._spool is None:
                _remove_stale_spools(self._spool_root)
                self._spool = self._spool_root / f"{SPOOL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
                self._spool.mkdir(parents=True, exist_ok=True)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=f"prefetch {self.repo_id}", daemon=True)
                self._worker.start()
            self._cv.notify_all()

    def get(self, name: str) -> torch.Tensor:
        loc = self._loc.get(name)
        if loc is None:
            raise BmmError(f"Hub repo '{self.repo_id}' at revision {self.revision}: no tensor '{name}'")
        fn, start, end = loc
        info = self._infos[name]
        path = None
        with self._cv:
            while True:
                st = self._state.get(name)
                if st == "fetching":
                    self._cv.wait()
                    continue
                if st == "ready":
                    del self._state[name]
                    path = self._spooled.pop(name)
                elif isinstance(st, BaseException):
                    del self._state[name]
                    raise st
                elif name in self._queue:
                    if not self._worker_blocked and not self._closed:
                        self._cv.wait()  # the worker will take it (coalesced with its neighbours)
                        continue
                    del self._queue[name]  # the worker waits for budget: fetch it here instead
                    self._cv.notify_all()
                break
        if path is None:
            buf = self._read_bytes(fn, start, end)
        else:
            buf = bytearray(end - start)
            with open(path, "rb") as f:
                got = f.readinto(buf)
            self._evict(name, path)
            if got != end - start:
                raise BmmError(f"{self._where(fn)}: spooled tensor '{name}' has {got} bytes, expected {end - start}")
        if len(buf) != end - start:
            raise BmmError(f"{self._where(fn)}: tensor '{name}' read {len(buf)} bytes, header says {end - start}")
        self._account(name, fn, start, buf)
        return _tensor_from(buf, info)

    def release(self, names: list[str]) -> None:
        """Drop what is queued, spooled or being fetched for these names."""
        with self._cv:
            for n in names:
                self._queue.pop(n, None)
                st = self._state.get(n)
                if st == "fetching":
                    self._drop_when_done.add(n)
                elif st == "ready":
                    del self._state[n]
                    self._evict_locked(n, self._spooled.pop(n))
                elif isinstance(st, BaseException):
                    del self._state[n]
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join()
        with self._cv:
            for n, p in list(self._spooled.items()):
                self._evict_locked(n, p)
            self._spooled.clear()
            self._state.clear()
            self._cv.notify_all()
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)

    # ---- background worker ---------------------------------------------------------------------
    def _nbytes(self, name: str) -> int:
        _, s, e = self._loc[name]
        return e - s

    def _evict(self, name: str, path: Path) -> None:
        with self._cv:
            self._evict_locked(name, path)
            self._cv.notify_all()

    def _evict_locked(self, name: str, path: Path) -> None:
        path.unlink(missing_ok=True)
        n = self._nbytes(name)
        self._on_disk -= n
        self.budget.on_disk -= n
        self.budget.reserved -= n

    def _take_group(self) -> list[str] | None:
        """Under the lock: reserve budget for the next run of adjacent queued tensors (None: closed)."""
        while True:
            if self._closed:
                return None
            if not self._queue:
                self._worker_blocked = False
                self._cv.wait()
                continue
            head = next(iter(self._queue))
            need = self._nbytes(head)
            if not self.budget.fits(need):
                if not self._worker_blocked:
                    self._worker_blocked = True
                    self._cv.notify_all()  # a get() waiting for a queued tensor now fetches it itself
                self._cv.wait()  # woken by evictions, releases, get() taking the head, close()
                continue
            self._worker_blocked = False
            group, total = [head], need
            fn, _, end = self._loc[head]
            for n in list(self._queue)[1:]:
                fn2, s2, e2 = self._loc[n]
                m = e2 - s2
                if fn2 != fn or s2 != end or total + m > MAX_REQUEST_BYTES or not self.budget.fits(total + m):
                    break
                group.append(n)
                total += m
                end = e2
            for n in group:
                del self._queue[n]
                self._state[n] = "fetching"
            self.budget.reserved += total
            return group

    def _work(self) -> None:
        while True:
            with self._cv:
                group = self._take_group()
            if group is None:
                return
            done: set[str] = set()
            try:
                self._fetch_group(group, done)
            except BaseException as e:
                err = e if isinstance(e, BmmError) else self._error(e, self._loc[group[0]][0])
                with self._cv:
                    for n in group:
                        if n in done:
                            continue
                        self.budget.reserved -= self._nbytes(n)
                        if n in self._drop_when_done or isinstance(e, _Aborted):
                            self._drop_when_done.discard(n)
                            self._state.pop(n, None)
                        else:
                            self._state[n] = err
                    self._cv.notify_all()

    def _fetch_group(self, group: list[str], done: set[str]) -> None:
        """One range request for adjacent tensors, each written to its own spool file as it arrives."""
        fn, start, _ = self._loc[group[0]]
        end = self._loc[group[-1]][2]
        idx = 0
        cur = {"f": None, "left": 0, "path": None}
        assert self._spool is not None

        def open_next() -> None:
            name = group[idx]
            cur["path"] = self._spool / f"{uuid.uuid4().hex}.part"
            cur["f"] = open(cur["path"], "wb")
            cur["left"] = self._nbytes(name)

        def finish(name: str) -> None:
            cur["f"].close()
            final = cur["path"].with_suffix(".bin")
            os.replace(cur["path"], final)
            with self._cv:
                done.add(name)
                if name in self._drop_when_done or self._closed:
                    self._drop_when_done.discard(name)
                    self._state.pop(name, None)
                    self._evict_locked(name, final)
                else:
                    self._state[name] = "ready"
                    self._spooled[name] = final
                self._cv.notify_all()

        def sink(chunk: bytes) -> None:
            nonlocal idx
            mv = memoryview(chunk)
            while len(mv):
                if cur["f"] is None:
                    open_next()
                k = min(cur["left"], len(mv))
                cur["f"].write(mv[:k])
                cur["left"] -= k
                with self._cv:
                    self._on_disk += k
                    self.budget.on_disk += k
                    self.high_water_bytes = max(self.high_water_bytes, self._on_disk)
                    self.budget.high_water = max(self.budget.high_water, self.budget.on_disk)
                mv = mv[k:]
                if cur["left"] == 0:
                    finish(group[idx])
                    cur["f"] = None
                    idx += 1

        try:
            self._stream_range(fn, start, end, sink)
        finally:
            if cur["f"] is not None:  # a tensor left half-written: remove it and its disk count
                cur["f"].close()
                written = self._nbytes(group[idx]) - cur["left"]
                cur["path"].unlink(missing_ok=True)
                with self._cv:
                    self._on_disk -= written
                    self.budget.on_disk -= written
