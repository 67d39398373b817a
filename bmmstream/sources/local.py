"""A Hugging Face model folder on local disk, read tensor by tensor through memory maps.

Headers are parsed once (8-byte length + JSON) so names, shapes and dtypes are known without
touching any weight bytes; shards are opened with `safetensors.safe_open` only when a tensor of
theirs is first asked for, and the handle is kept, so reading one layer never reads another.
Pickle checkpoints are refused: loading them can execute arbitrary code.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from bmmstream.errors import BmmError
from bmmstream.sources.base import AUX_FILES, TensorInfo, read_config_json
from bmmstream.sources.header import parse_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header; raise BmmError naming the file if it is not valid."""
    return {name: info for name, (info, _, _) in read_header_spans(path).items()}


def read_header_spans(path: Path) -> dict[str, tuple[TensorInfo, int, int]]:
    """Like read_header, with each tensor's absolute byte span [start, end) in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:

            def read(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)

            entries = parse_header(str(path), read, size)
    except OSError as e:
        raise BmmError(f"{path}: cannot read ({e.strerror or e})") from e
    return entries


class _ReadAhead:
    """One background thread asking the kernel to read file spans into the page cache
    (posix_fadvise WILLNEED), so the next unit's bytes arrive while this one is computed.
    Only a hint: a span it never reaches is read on demand, as without it."""

    def __init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, spans: list[tuple[Path, int, int]]) -> None:
        if not spans or not hasattr(os, "posix_fadvise"):
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="bmm-read-ahead", daemon=True)
                self._thread.start()
        self._q.put(spans)

    def _run(self) -> None:
        while True:
            spans = self._q.get()
            for path, start, end in spans:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
                finally:
                    os.close(fd)


READ_AHEAD = _ReadAhead()


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding a model folder's weights, or a BmmError saying why none."""
    if not folder.exists():
        raise BmmError(f"{folder}: no such file or folder")
    if folder.is_file():
        if folder.suffix == ".safetensors":
            return [folder]
        raise BmmError(f"{folder}: not a model folder or a .safetensors file")
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shard_names = list(dict.fromkeys(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BmmError(f"{index}: not a valid safetensors index ({e})") from e
        outside = [s for s in shard_names if Path(s).is_absolute() or ".." in Path(s).parts]
        if outside:  # the index must not make us read (or report on) files outside the model folder
            raise BmmError(f"{index}: names shard '{outside[0]}' outside the model folder; refusing to read it")
        shards = [folder / s for s in shard_names]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise BmmError(
                f"{index}: names shard(s) that are missing from the folder: {', '.join(missing)}"
            )
        return shards
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        shown = ", ".join(pickles[:3]) + (f", ... ({len(pickles)} files)" if len(pickles) > 3 else "")
        raise BmmError(
            f"{folder}: only pickle weights ({shown}); bmmstream reads safetensors only and never "
            f"unpickles (convert with: model.save_pretrained(out, safe_serialization=True) "
            f"in an environment you trust)"
        )
    if (folder / "adapter_config.json").is_file():
        raise BmmError(
            f"{folder}: a PEFT adapter without full weights; merge the adapter into its base "
            f"model first (peft: model.merge_and_unload().save_pretrained(out))"
        )
    raise BmmError(f"{folder}: no weights found (no *.safetensors file)")


class LocalSource:
    """TensorSource over a local model folder (single file, indexed shards, or loose shards)."""

    def __init__(self, path: str | os.PathLike, id: str | None = None):
        self.path = Path(path).expanduser()
        self.id = id if id is not None else str(path)
        self.revision: str | None = None
        self.folder = self.path.parent if self.path.is_file() else self.path
        files = find_weight_files(self.path)
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, Path] = {}
        self._span: dict[str, tuple[int, int]] = {}  # byte span in its file, for read-ahead
        for f in files:
            for name, (info, start, end) in read_header_spans(f).items():
                if name in self._where:
                    raise BmmError(
                        f"{self.folder}: tensor '{name}' appears in both "
                        f"{self._where[name].name} and {f.name}"
                    )
                self._infos[name] = info
                self._where[name] = f
                self._span[name] = (start, end)
        self._check_index(files)
        self._handles: dict[Path, object] = {}
        self._config: dict | None = None

    def _check_index(self, files: list[Path]) -> None:
        index = self.folder / INDEX_NAME
        if self.path.is_file() or not index.is_file():
            return
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, shard in weight_map.items():
            where = self._where.get(name)
            if where is None or where.name != shard:
                raise BmmError(f"{index}: maps tensor '{name}' to {shard}, whose header lacks it")

    # -- TensorSource ---------------------------------------------------------------------
    def tensor_infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def config(self) -> dict:
        if self._config is None:
            p = self.folder / "config.json"
            self._config = read_config_json(p) if p.is_file() else {}
        return dict(self._config)

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor, a zero-copy view of the memory-mapped file (read-only use: the
        mapping is private, so a write would copy the page, never change the file)."""
        where = self._where.get(name)
        if where is None:
            raise BmmError(f"{self.id}: no tensor '{name}'")
        handle = self._handles.get(where)
        if handle is None:
            try:
                handle = safe_open(str(where), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise BmmError(f"{where}: cannot open as safetensors ({e})") from e
            self._handles[where] = handle
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise BmmError(f"{where}: cannot read tensor '{name}' ({e})") from e

    def prefetch(self, names: list[str]) -> None:
        """Ask the kernel (on a background thread) to read these tensors' bytes ahead, in file order:
        a cold page cache then fills while the current unit is computed, not when it is touched."""
        spans = sorted((self._where[n], *self._span[n]) for n in names if n in self._where)
        READ_AHEAD.submit(spans)

    def release(self, names: list[str]) -> None:
        """Unmap the shards holding `names`: touched mmap pages count in RSS for as long as the
        mapping lives, so keeping it would make peak RSS grow with the layers read. A later `get`
        maps the shard again (cheap: the header is re-read, no weight bytes)."""
        for name in names:
            where = self._where.get(name)
            if where is not None:
                self._handles.pop(where, None)

    def aux_files(self) -> list[str]:
        return [f for f in AUX_FILES if (self.folder / f).is_file()]

    def aux_path(self, filename: str) -> Path:
        p = self.folder / filename
        if not p.is_file():
            raise BmmError(f"{self.folder}: no file {filename}")
        return p

    def close(self) -> None:
        self._handles.clear()

    def shard_of(self, name: str) -> Path:
        """The file holding `name` (for diagnostics and tests)."""
        return self._where[name]

    def __repr__(self) -> str:
        return f"LocalSource({self.id!r}, {len(self._infos)} tensors)"
