import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bmmstream.errors import BmmError
from bmmstream.sources.base import TORCH_TO_ST
from bmmstream.sources.local import LocalSource
from bmmstream.output.writer import ShardWriter, copy_aux, plan_shards, write_config, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "l0.q.weight": torch.randn(8, 8, generator=g),
        "l0.norm": torch.randn(8, generator=g).to(torch.float16),
        "l0.steps": torch.tensor([3, -1, 7], dtype=torch.int64),
        "l1.q.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "l1.up.weight": torch.randn(12, 8, generator=g).to(torch.float16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "head.weight": torch.randn(16, 8, generator=g),
    }


def _layout(ts):
    return [(n, tuple(t.shape), TORCH_TO_ST[t.dtype]) for n, t in ts.items()]


def _write_all(out, journal, ts, shard_bytes, layout=None, metadata=None):
    w = ShardWriter(out, layout or _layout(ts), shard_bytes, journal, metadata=metadata)
    for n, t in ts.items():
        w.write(n, t)
    paths = w.finalize()
    w.close()
    return paths


def _load_all(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_single_shard_roundtrip_exact(tmp_path):
    ts = _tensors()
    paths = _write_all(tmp_path / "out", tmp_path / "j.jsonl", ts, 1 << 30, metadata={"who": "test"})
    assert [p.name for p in paths] == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]  # no tmp, no index
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert list(got) == list(ts) or set(got) == set(ts)
    for n, t in ts.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "who": "test"}
    # header is padded to a multiple of 8
    raw = paths[0].read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0


def test_conversion_to_layout_dtype(tmp_path):
    x = torch.randn(5, 3, dtype=torch.float64)
    layout = [("a", (5, 3), "BF16"), ("b", (5, 3), "F16"), ("c", (5, 3), "F32")]
    w = ShardWriter(tmp_path / "o", layout, 1 << 20, tmp_path / "j")
    for n, _, _ in layout:
        w.write(n, x)
    w.finalize()
    got = load_file(tmp_path / "o" / "model.safetensors")
    assert torch.equal(got["a"], x.to(torch.bfloat16))
    assert torch.equal(got["b"], x.to(torch.float16))
    assert torch.equal(got["c"], x.to(torch.float32))


def test_sharding_respects_limit_and_index(tmp_path):
    ts = _tensors()
    limit = 300  # bytes; emb (256 B) and head (512 B, oversize) force several shards
    paths = _write_all(tmp_path / "out", tmp_path / "j.jsonl", ts, limit)
    shards = plan_shards(_layout(ts), limit)
    assert len(paths) == len(shards) > 2
    assert [p.name for p in paths] == [
        f"model-{i:05d}-of-{len(paths):05d}.safetensors" for i in range(1, len(paths) + 1)
    ]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ts)
    total = sum(t.numel() * t.element_size() for t in ts.values())
    assert index["metadata"]["total_size"] == total
    order = []
    for p in paths:
        part = load_file(p)
        nbytes = sum(t.numel() * t.element_size() for t in part.values())
        assert nbytes <= limit or len(part) == 1, (p.name, nbytes)
        for n in part:
            assert index["weight_map"][n] == p.name
            assert torch.equal(part[n], ts[n])
        order += sorted(part, key=list(ts).index)
    assert order == list(ts)  # shards hold consecutive runs of the layout
    # greedy: no shard could have taken the first tensor of the next one
    for a, b in zip(shards, shards[1:]):
        data_a = a.size - len(a.header)
        first_b = ts[b.names[0]]
        assert data_a + first_b.numel() * first_b.element_size() > limit
    src = LocalSource(tmp_path / "out")
    for n, t in ts.items():
        assert torch.equal(src.get(n), t)


def test_byte_determinism(tmp_path):
    ts = _tensors()
    _write_all(tmp_path / "a", tmp_path / "ja", ts, 300)
    _write_all(tmp_path / "b", tmp_path / "jb", ts, 300)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()


def test_order_and_shape_errors(tmp_path):
    ts = _tensors()
    w = ShardWriter(tmp_path / "o", _layout(ts), 300, tmp_path / "j")
    with pytest.raises(ValueError, match="tensors must be written in layout order; next is 'emb.weight'"):
        w.write("l0.q.weight", ts["l0.q.weight"])
    w.write("emb.weight", ts["emb.weight"])
    assert w.done("emb.weight") and not w.done("l0.q.weight")
    assert w.next_name() == "l0.q.weight"
    with pytest.raises(ValueError, match=r"shape \(8, 9\), layout says \(8, 8\)"):
        w.write("l0.q.weight", torch.zeros(8, 9))
    with pytest.raises(ValueError, match="8 tensor\\(s\\) not written yet, next is 'l0.q.weight'"):
        w.finalize()
    with pytest.raises(ValueError, match="layout names tensor 'a' twice"):
        ShardWriter(tmp_path / "o2", [("a", (1,), "F32"), ("a", (1,), "F32")], 10, tmp_path / "j2")


def test_torn_journal_line_is_ignored(tmp_path):
    ts = _tensors()
    names = list(ts)
    w = ShardWriter(tmp_path / "o", _layout(ts), 300, tmp_path / "j")
    for n in names[:4]:
        w.write(n, ts[n])
    w.close()
    # a crash while appending the 5th tensor's line: torn JSON, no newline
    with open(tmp_path / "j", "a") as f:
        f.write('{"tensor":"l1.q.weig')
    w = ShardWriter(tmp_path / "o", _layout(ts), 300, tmp_path / "j")
    assert w.next_name() == names[4]
    for n in names[4:]:
        w.write(n, ts[n])
    w.finalize()
    w.close()
    for line in (tmp_path / "j").read_text().splitlines():
        json.loads(line)  # the torn fragment was cut off, not glued to a later line
    _write_all(tmp_path / "ref", tmp_path / "jr", ts, 300)
    for n in os.listdir(tmp_path / "ref"):
        assert (tmp_path / "o" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes()


def test_journal_of_another_layout_is_refused(tmp_path):
    ts = _tensors()
    w = ShardWriter(tmp_path / "o", _layout(ts), 300, tmp_path / "j")
    w.write("emb.weight", ts["emb.weight"])
    w.close()
    with pytest.raises(BmmError, match="belongs to a different output layout"):
        ShardWriter(tmp_path / "o", _layout(ts), 400, tmp_path / "j")


# -- a real crash test: the child SIGKILLs itself at chosen points -------------------------------
CHILD = r"""
import os, signal, sys, types
sys.path.insert(0, sys.argv[1])
import torch
import bmmstream.output.writer as W
from tests.test_writer import _tensors, _layout

out, journal, mode, k = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
ts = _tensors()
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
count = {"data": 0, "journal": 0, "replace": 0, "dirsync": 0}

class Killer:
    # wraps a real file; dies half-way through the k-th tensor-data or journal write
    def __init__(self, f, kind):
        self._f, self._kind = f, kind
    def write(self, data):
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if self._kind == mode and size > 8:  # skip tiny writes (a 4-byte scalar)
            count[mode] += 1
            if count[mode] == k:
                half = bytes(data)[: size // 2] if not isinstance(data, str) else data[: size // 2]
                self._f.write(half)
                self._f.flush()
                os.fsync(self._f.fileno())
                die()
        return self._f.write(data)
    def __getattr__(self, a):
        return getattr(self._f, a)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self._f.close()

real_open = open
def patched_open(path, m="r", *a, **kw):
    f = real_open(path, m, *a, **kw)
    if "a" in m:
        return Killer(f, "journal")
    if "w" in m or "+" in m:
        return Killer(f, "data")
    return f
W.open = patched_open

real_replace, real_dirsync = os.replace, W.fsync_dir
def replace(a, b):
    count["replace"] += 1
    if mode == "replace" and count["replace"] == k:
        die()
    real_replace(a, b)
def dirsync(p):
    real_dirsync(p)
    count["dirsync"] += 1
    if mode == "dirsync" and count["dirsync"] == k:
        die()
W.os = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if not n.startswith("__")})
W.os.replace = replace
W.fsync_dir = dirsync

w = W.ShardWriter(out, _layout(ts), 300, journal)
written = 0
for n, t in ts.items():
    if w.done(n):
        continue
    w.write(n, t)
    written += 1
    if mode == "after" and written == k:
        die()
w.finalize()
w.close()
print("completed")
"""


def _run_child(tmp_path, mode, k):
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(tmp_path / "out"), str(tmp_path / "j"), mode, str(k)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )


def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path):
    ts = _tensors()
    _write_all(tmp_path / "ref", tmp_path / "jref", ts, 300)
    rng = random.Random(1234)
    plan = [("data", rng.randint(1, 3)), ("after", rng.randint(1, 2)), ("journal", rng.randint(2, 3)),
            ("replace", 1), ("dirsync", 1), ("data", 1)]
    for mode, k in plan:
        r = _run_child(tmp_path, mode, k)
        assert r.returncode == -9, (mode, k, r.returncode, r.stderr[-2000:])
    lines = (tmp_path / "j").read_text().splitlines()
    assert 2 < sum('"tensor"' in line for line in lines) < len(ts)  # crashes really happened mid-run
    r = _run_child(tmp_path, "none", 0)
    assert r.returncode == 0 and "completed" in r.stdout, r.stderr[-2000:]
    names = sorted(os.listdir(tmp_path / "ref"))
    assert sorted(os.listdir(tmp_path / "out")) == names  # no leftover temporary shards
    for n in names:
        assert (tmp_path / "out" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes(), n


def test_partial_tmp_shard_is_truncated_on_resume(tmp_path):
    """Bytes appended after the last journaled tensor (a crash before its journal line) are dropped."""
    ts = _tensors()
    layout = _layout(ts)
    w = ShardWriter(tmp_path / "o", layout, 1 << 20, tmp_path / "j")
    w.write("emb.weight", ts["emb.weight"])
    w.close()
    tmp = tmp_path / "o" / ".model.safetensors.tmp"
    committed = tmp.stat().st_size
    with open(tmp, "ab") as f:
        f.write(b"\x13" * 100)  # the next tensor's bytes, never journaled
    w = ShardWriter(tmp_path / "o", layout, 1 << 20, tmp_path / "j")
    assert tmp.stat().st_size == committed
    for n in list(ts)[1:]:
        w.write(n, ts[n])
    w.finalize()
    got = load_file(tmp_path / "o" / "model.safetensors")
    for n, t in ts.items():
        assert torch.equal(got[n], t)


# -- model folder helpers -----------------------------------------------------------------------
def test_write_config_patches_dtype(tmp_path):
    base = {"model_type": "llama", "hidden_size": 8, "torch_dtype": "float32"}
    p = write_config(tmp_path, base, torch.bfloat16)
    cfg = json.loads(p.read_text())
    assert cfg == {"model_type": "llama", "hidden_size": 8, "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    assert base["torch_dtype"] == "float32"  # input not modified
    assert not list(tmp_path.glob(".*.tmp"))


def test_copy_aux_and_atomic_text(tmp_path, st_folder):
    st_folder(tmp_path / "m", {"w": torch.zeros(2)})
    (tmp_path / "m" / "tokenizer.json").write_text('{"t": 1}')
    (tmp_path / "m" / "special_tokens_map.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_aux(LocalSource(tmp_path / "m"), out)
    assert copied == ["tokenizer.json", "special_tokens_map.json"]
    assert (out / "tokenizer.json").read_text() == '{"t": 1}'
    write_text_atomic(out / "README.md", "hello\n")
    write_text_atomic(out / "README.md", "again\n")
    assert (out / "README.md").read_text() == "again\n"
    assert sorted(os.listdir(out)) == ["README.md", "special_tokens_map.json", "tokenizer.json"]


@pytest.mark.parametrize(
    "err, needed, expected",
    [
        (errno.ENOSPC, 1234, "/o/x: no space left on device (1234 bytes needed); free space and rerun the same command to resume"),
        (errno.ENOSPC, None, "/o/x: no space left on device; free space and rerun the same command to resume"),
        (errno.EROFS, None, "/o/x: read-only file system; choose a writable --out / --run-dir"),
        (errno.EACCES, None, "/o/x: permission denied; choose a writable --out / --run-dir"),
        (errno.EIO, None, "/o/x: Input/output error"),
    ],
)
def test_disk_error_is_one_line_naming_the_path(err, needed, expected):
    from bmmstream.output.writer import disk_error

    e = OSError(err, os.strerror(err), "/o/x")
    assert str(disk_error(e, needed=needed)) == expected
    assert str(disk_error(OSError(err, os.strerror(err)), "/o/x", needed)) == expected  # path given by the caller


def test_full_disk_in_the_middle_of_a_tensor_names_the_shard_and_resumes(tmp_path, monkeypatch):
    tensors = _tensors()
    layout = _layout(tensors)
    calls = {"n": 0}
    orig = ShardWriter._write_data

    def full_on_3rd(self, data):
        calls["n"] += 1
        if calls["n"] == 3:
            self._file.write(bytes(data)[:5])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(self, data)

    monkeypatch.setattr(ShardWriter, "_write_data", full_on_3rd)
    w = ShardWriter(tmp_path / "out", layout, 10**9, tmp_path / "j.jsonl")
    with pytest.raises(BmmError) as e:
        for n, _, _ in layout:
            w.write(n, tensors[n])
    (sh,) = w.shards
    assert str(e.value) == (f"{tmp_path / 'out' / '.model.safetensors.tmp'}: no space left on device "
                            f"({sh.size - sh.ends[1]} bytes needed); free space and rerun the same command to resume")
    w.close()
    monkeypatch.setattr(ShardWriter, "_write_data", orig)
    w = ShardWriter(tmp_path / "out", layout, 10**9, tmp_path / "j.jsonl")
    for n, _, _ in layout:
        if not w.done(n):
            w.write(n, tensors[n])
    w.finalize()
    w.close()
    _write_all(tmp_path / "ref", tmp_path / "r.jsonl", tensors, 10**9)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
