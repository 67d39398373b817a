"""Streaming, resumable, sharded safetensors output, plus the model folder's small files.

Why this shape: a merge produces one tensor at a time and may be killed at any moment. Since the
whole layout (names, shapes, dtypes, order) is known before the first tensor exists, every shard's
header can be written up front and each tensor's bytes appended as it arrives; a journal line after
the tensor's bytes were fsync'd records how far the shard is valid. A caller may batch (write(...,
commit=False), then commit()): one data fsync, then the batch's journal lines and one journal fsync,
so a tensor is still journaled only once its bytes are durable, at two fsyncs per batch instead of
two per tensor. On restart the temporary shard is cut back to the last journaled offset and writing
continues. Files depend only on the layout and the tensor
values, so an interrupted-then-resumed run is byte-identical to an uninterrupted one.

Journal format (JSON lines, fsync'd after each append):
  {"writer": 1, "fingerprint": "<sha256 of layout, shard size, metadata>"}   first line
  {"tensor": name, "shard": i, "end": byte offset in the shard file after this tensor}
  {"shard_done": i}                        after the shard was renamed to its final name
  {"finalized": true}                      after the index was written
A torn last line (crash during the append) is ignored and cut off.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from bmmstream.errors import BmmError
from bmmstream.sources.base import ST_TO_TORCH, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
LayoutEntry = tuple[str, tuple[int, ...], str]


# -- errors from the filesystem -----------------------------------------------------------------
def disk_error(e: OSError, path: Path | str | None = None, needed: int | None = None) -> BmmError:
    """One line for a failed write: which path, why, and on a full disk how many bytes were needed.
    Everything written before is kept, so rerunning the same command resumes."""
    where = path if path is not None else (e.filename or "filesystem")
    if e.errno == errno.ENOSPC:
        need = f" ({needed} bytes needed)" if needed is not None else ""
        return BmmError(f"{where}: no space left on device{need}; free space and rerun the same command to resume")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return BmmError(f"{where}: {why}; choose a writable --out / --run-dir")
    return BmmError(f"{where}: {e.strerror or e}")


# -- atomic file helpers ------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary name and os.replace, so readers see old or new only."""
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", the spelling config.json uses."""
    return str(dtype).removeprefix("torch.")


def write_config(out_dir: Path, base_config: dict, out_dtype: torch.dtype) -> Path:
    """config.json of the merged model: the base's, with the dtype keys saying what was written."""
    cfg = dict(base_config)
    cfg["torch_dtype"] = dtype_name(out_dtype)  # transformers < 4.56 reads this key
    cfg["dtype"] = dtype_name(out_dtype)  # newer transformers read this one
    path = Path(out_dir) / "config.json"
    write_json_atomic(path, cfg)
    return path


def copy_aux(source, out_dir: Path, files: Iterable[str] | None = None) -> list[str]:
    """Copy the source's tokenizer/generation files (base.AUX_FILES present) into out_dir."""
    out_dir = Path(out_dir)
    copied = []
    for name in files if files is not None else source.aux_files():
        src = Path(source.aux_path(name))
        dst = out_dir / name
        tmp = _tmp_name(dst)
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
        copied.append(name)
    if copied:
        fsync_dir(out_dir)
    return copied


# -- layout -> shards ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    index: int
    filename: str
    names: list[str]  # in layout order
    header: bytes  # 8-byte length + padded JSON
    ends: list[int]  # absolute file offset after each tensor
    size: int  # final file size


def _entry_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return TensorInfo(tuple(shape), dtype).nbytes


def plan_shards(
    layout: list[LayoutEntry], max_shard_bytes: int, metadata: dict[str, str] | None = None
) -> list[Shard]:
    """Greedy, deterministic assignment of tensors to shards, with each shard's header bytes."""
    if not layout:
        raise ValueError("empty layout: nothing to write")
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    seen = set()
    groups: list[list[LayoutEntry]] = []
    cur_bytes = 0
    for name, shape, dtype in layout:
        if name in seen:
            raise ValueError(f"layout names tensor '{name}' twice")
        seen.add(name)
        if dtype not in ST_TO_TORCH:
            raise ValueError(f"tensor '{name}': unsupported dtype {dtype!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is not a valid tensor name")
        n = _entry_nbytes(shape, dtype)
        if not groups or (cur_bytes > 0 and cur_bytes + n > max_shard_bytes):
            groups.append([])
            cur_bytes = 0
        groups[-1].append((name, tuple(int(s) for s in shape), dtype))
        cur_bytes += n

    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError("safetensors metadata must map str to str")
        meta[k] = v
    total = len(groups)
    shards = []
    for i, group in enumerate(groups):
        filename = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        header: dict = {"__metadata__": meta}
        offset = 0
        rel_ends = []
        for name, shape, dtype in group:
            n = _entry_nbytes(shape, dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            rel_ends.append(offset)
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        head = len(raw).to_bytes(8, "little") + raw
        ends = [len(head) + e for e in rel_ends]
        shards.append(Shard(i, filename, [g[0] for g in group], head, ends, len(head) + offset))
    return shards


def tensor_bytes(tensor: torch.Tensor, dtype: str) -> memoryview:
    """The little-endian bytes of `tensor` converted to safetensors dtype `dtype`."""
    t = tensor.detach().to(device="cpu", dtype=ST_TO_TORCH[dtype]).contiguous().reshape(-1)
    arr = t.view(torch.uint8).numpy()
    if sys.byteorder != "little" and t.element_size() > 1:
        arr = t.numpy().byteswap().view("u1")
    return memoryview(arr)


# -- the writer ---------------------------------------------------------------------------------
class ShardWriter:
    """Write tensors in layout order into safetensors shards; survive being killed at any point.

    Holds at most the one tensor being written (plus its converted copy). Not thread-safe: one
    thread writes (bmmstream/output/behind.py runs it on its own).
    """

    def __init__(
        self,
        out_dir: Path,
        layout: list[LayoutEntry],
        max_shard_bytes: int,
        journal: Path,
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.layout = [(n, tuple(int(s) for s in shape), d) for n, shape, d in layout]
        self.shards = plan_shards(self.layout, max_shard_bytes, metadata)
        self.journal_path = Path(journal)
        self._pos = {name: i for i, (name, _, _) in enumerate(self.layout)}
        self._shard_of: dict[str, tuple[Shard, int]] = {}
        for sh in self.shards:
            for k, name in enumerate(sh.names):
                self._shard_of[name] = (sh, k)
        fp_src = json.dumps([self.layout, max_shard_bytes, metadata or {}], sort_keys=True)
        self.fingerprint = hashlib.sha256(fp_src.encode()).hexdigest()
        self._next = 0  # index into layout of the next tensor to write
        self._file = None  # open tmp shard being filled
        self._pending: list[dict] = []  # journal records of tensors written to the file, not yet durable
        self._finalized = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.journal_path.parent.mkdir(parents=True, exist_ok=True)
        self._resume()

    # -- journal --------------------------------------------------------------------------
    def _append(self, rec: dict | list[dict]) -> None:
        recs = rec if isinstance(rec, list) else [rec]
        self._journal.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def _read_journal(self) -> list[dict]:
        """Complete, parseable records; the file is cut back to the end of the last good one."""
        if not self.journal_path.exists():
            return []
        data = self.journal_path.read_bytes()
        recs, good_end, pos = [], 0, 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            try:
                rec = json.loads(data[pos:nl])
                if not isinstance(rec, dict):
                    raise ValueError
            except ValueError:
                break  # torn or garbage: nothing after it can be trusted
            recs.append(rec)
            pos = good_end = nl + 1
        if good_end != len(data):
            with open(self.journal_path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return recs

    def _resume(self) -> None:
        recs = self._read_journal()
        if recs and recs[0].get("fingerprint") != self.fingerprint:
            raise BmmError(
                f"{self.journal_path}: this write journal belongs to a different output layout; "
                f"use a fresh run directory or delete the journal"
            )
        self._journal = open(self.journal_path, "a", encoding="utf-8")
        if not recs:
            self._append({"writer": 1, "fingerprint": self.fingerprint})
            return
        last_end: dict[int, int] = {}
        done_shards: set[int] = set()
        for rec in recs[1:]:
            if "tensor" in rec:
                name = rec["tensor"]
                if self._next >= len(self.layout) or self.layout[self._next][0] != name:
                    raise BmmError(f"{self.journal_path}: out-of-order record for tensor '{name}'")
                sh, k = self._shard_of[name]
                if rec.get("end") != sh.ends[k]:
                    raise BmmError(f"{self.journal_path}: wrong offset recorded for tensor '{name}'")
                last_end[sh.index] = rec["end"]
                self._next += 1
            elif "shard_done" in rec:
                done_shards.add(int(rec["shard_done"]))
            elif rec.get("finalized"):
                self._finalized = True

        for sh in self.shards:
            final, tmp = self.out_dir / sh.filename, self.out_dir / f".{sh.filename}.tmp"
            written = last_end.get(sh.index)
            if sh.index in done_shards:
                self._check_size(final, sh.size)
            elif written == sh.size:
                # every tensor is in, but the crash came before the rename was journaled
                if tmp.exists():
                    self._check_size(tmp, sh.size)
                    self._complete_shard(sh, tmp)
                else:
                    self._check_size(final, sh.size)
                    self._append({"shard_done": sh.index})
            elif written is not None:
                # partially written: drop whatever came after the last journaled tensor
                if not tmp.exists() or tmp.stat().st_size < written:
                    raise BmmError(f"{tmp}: missing or shorter than its journal says; cannot resume")
                self._file = open(tmp, "r+b")
                self._file.truncate(written)
                self._file.seek(written)
                self._file.flush()
                os.fsync(self._file.fileno())

    @staticmethod
    def _check_size(path: Path, size: int) -> None:
        if not path.exists() or path.stat().st_size != size:
            raise BmmError(f"{path}: missing or not the size the write journal expects; cannot resume")

    def _complete_shard(self, sh: Shard, tmp: Path) -> None:
        os.replace(tmp, self.out_dir / sh.filename)
        fsync_dir(self.out_dir)
        self._append({"shard_done": sh.index})

    # -- public API -----------------------------------------------------------------------
    def next_name(self) -> str | None:
        return self.layout[self._next][0] if self._next < len(self.layout) else None

    def done(self, name: str) -> bool:
        if name not in self._pos:
            raise KeyError(name)
        return self._pos[name] < self._next

    def write(self, name: str, tensor: torch.Tensor, commit: bool = True) -> None:
        """Append `name`'s bytes; must be the next tensor of the layout. commit=False leaves the
        fsync and the journal line to the next commit() (a shard's last tensor commits anyway)."""
        expected = self.next_name()
        if name != expected:
            if expected is None:
                raise ValueError(f"write('{name}'): every tensor of the layout is already written")
            raise ValueError(f"write('{name}'): tensors must be written in layout order; next is '{expected}'")
        _, shape, dtype = self.layout[self._next]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"write('{name}'): shape {tuple(tensor.shape)}, layout says {shape}")
        sh, k = self._shard_of[name]
        tmp = self.out_dir / f".{sh.filename}.tmp"
        data = tensor_bytes(tensor, dtype)
        try:
            if k == 0:
                if self._file is not None:
                    self._file.close()
                self._file = open(tmp, "wb")
                self._file.write(sh.header)
            self._write_data(data)
        except OSError as e:
            self._commit_written()  # what went out whole before this tensor is kept for the resume
            left = sh.size - (sh.ends[k - 1] if k else 0) + sum(s.size for s in self.shards[sh.index + 1 :])
            raise disk_error(e, tmp, left) from None
        del data
        self._pending.append({"tensor": name, "shard": sh.index, "end": sh.ends[k]})
        self._next += 1
        if commit or k == len(sh.names) - 1:
            self.commit()
        if k == len(sh.names) - 1:
            self._file.close()
            self._file = None
            self._complete_shard(sh, tmp)

    def commit(self) -> None:
        """Make the tensors written since the last commit durable, then journal them (one fsync each)."""
        if not self._pending:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._append(self._pending)
        self._pending = []

    def _commit_written(self) -> None:
        """After a failed write: journal the earlier tensors of the batch if their bytes (already handed
        to the OS by _write_data) can be made durable; the failed tensor's partial bytes stay unjournaled."""
        if not self._pending or self._file is None:
            return
        try:
            os.fsync(self._file.fileno())
            self._append(self._pending)
        except OSError:
            return  # not durable: the resume rewrites them
        self._pending = []

    def _write_data(self, data: memoryview) -> None:
        """Append a tensor's bytes to the open shard and hand them to the OS (a test seam for a full
        disk); commit() makes them durable."""
        self._file.write(data)
        self._file.flush()

    def finalize(self) -> list[Path]:
        """Write the index (when sharded) last; return the shard paths."""
        if self._next < len(self.layout):
            raise ValueError(
                f"finalize(): {len(self.layout) - self._next} tensor(s) not written yet, "
                f"next is '{self.next_name()}'"
            )
        index = self.out_dir / INDEX_NAME
        if len(self.shards) > 1:
            weight_map = {n: sh.filename for sh in self.shards for n in sh.names}
            total = sum(_entry_nbytes(s, d) for _, s, d in self.layout)
            obj = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_text_atomic(index, json.dumps(obj, indent=2) + "\n")
        elif index.exists():
            index.unlink()  # a stale index from an earlier run would point loaders at missing shards
            fsync_dir(self.out_dir)
        if not self._finalized:
            self._append({"finalized": True})
            self._finalized = True
        return [self.out_dir / sh.filename for sh in self.shards]

    def close(self) -> None:
        self._commit_written()  # a batch written whole before close() is kept
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._journal.closed:
            self._journal.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
