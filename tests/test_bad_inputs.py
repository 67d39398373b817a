"""Every bad input the README promises to refuse: one exact line (exit 2 from the CLI), the inputs
unchanged, and no output presented as complete (no output folder, no manifest) (issue 11).

Cases already covered elsewhere, at the level of the part that detects them:
  tests/test_local_source.py  truncated / lying / huge headers, unknown dtypes, pickle-only folders,
                              index naming missing shards or the wrong shard, data past the end of file
  tests/test_validate.py      shape / dtype mismatch, missing / extra tensors (all in one line)
  tests/test_pipeline.py      a mismatch through the CLI (exit 2, one line)
  tests/test_calibration.py   malformed calibration files (each reader error)
  tests/test_hub_source.py    Hub 401 / 403 (token, gated), 404 (repo, revision, file), 5xx giving up,
                              truncated bodies and wrong ranges refetched, corrupt header
  tests/test_hub_merge.py     Hub 404 / missing revision / no weights through the CLI
Here each of them (and the new refusals: NaN/Inf, no config.json, blocks > layers, overlapping
offsets, index outside the folder, corrupted Hub bytes, read-only and full disks) goes through a
whole merge, with the input folders hashed before and after.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bmmstream
from bmmstream.errors import BmmError

ROOT = Path(__file__).resolve().parent.parent
ST = "model.safetensors"


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    from bmmstream.demo import make_llama_suite

    return make_llama_suite(tmp_path_factory.mktemp("small"), num_experts=2, hidden=16, intermediate=32, layers=2,
                            vocab=32, heads=2, kv_heads=1)


@pytest.fixture
def inputs(small_suite, tmp_path):
    """A private copy of the suite (tests damage it): {"base": path, "e0": path, "e1": path}."""
    d = tmp_path / "in"
    out = {}
    for key, src in (("base", small_suite.base), ("e0", small_suite.experts[0]), ("e1", small_suite.experts[1])):
        out[key] = Path(shutil.copytree(src, d / src.name))
    return out


def _tree_hash(folders) -> dict:
    h = {}
    for f in folders:
        for p in sorted(Path(f).rglob("*")):
            if p.is_file():
                h[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return h


def _cfg(inputs, method="task_arithmetic", params=None, **extra) -> dict:
    cfg = {"base_model": str(inputs["base"]), "models": [{"model": str(inputs["e0"])}, {"model": str(inputs["e1"])}],
           "merge_method": method, "parameters": params or {}}
    cfg.update(extra)
    return cfg


def _nothing_presented(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "run" / "manifest.json").exists()


def _refused_api(cfg, tmp_path, expected: str, inputs) -> None:
    before = _tree_hash(inputs.values())
    with pytest.raises(BmmError) as e:
        bmmstream.merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False)
    assert str(e.value) == expected
    _nothing_presented(tmp_path)
    assert _tree_hash(inputs.values()) == before


def _cli(args: list[str], env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """`bmm ARGS` in a fresh interpreter; `prelude` runs first (to simulate a read-only disk)."""
    code = prelude + "\nfrom bmmstream.cli import app\napp(sys.argv[1:], prog_name='bmm')\n"
    return subprocess.run([sys.executable, "-c", "import sys\n" + code, *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)


def _refused_cli(cfg, tmp_path, expected: str, inputs, prelude: str = "") -> None:
    before = _tree_hash(inputs.values())
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    r = _cli(["merge", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"),
              "--device", "cpu", "--no-progress"], prelude=prelude)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [f"error: {expected}"]
    assert r.stdout == ""
    _nothing_presented(tmp_path)
    assert _tree_hash(inputs.values()) == before


# -- safetensors damage -------------------------------------------------------------------------------
def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def _with_header(path: Path, change) -> None:
    header, data = _split(path)
    change(header)
    _join(path, header, data)


Q, K, V = (f"model.layers.1.self_attn.{m}_proj.weight" for m in "qkv")


def test_truncated_header(inputs, tmp_path):
    f = inputs["e0"] / ST
    f.write_bytes(f.read_bytes()[:5])
    _refused_api(_cfg(inputs), tmp_path, f"{f}: corrupt safetensors header (file is only 5 bytes)", inputs)


def test_huge_header(inputs, tmp_path):
    f = inputs["e1"] / ST
    raw = f.read_bytes()
    f.write_bytes((200_000_000).to_bytes(8, "little") + raw[8:])
    _refused_api(_cfg(inputs), tmp_path, f"{f}: corrupt safetensors header (declared header length 200000000 does "
                                         f"not fit in a {len(raw)}-byte file)", inputs)


def test_lying_data_offsets(inputs, tmp_path):
    f = inputs["e0"] / ST
    header, data = _split(f)
    a, _ = header[Q]["data_offsets"]
    header[Q]["data_offsets"] = [a, len(data) + 4]
    _join(f, header, data)
    _refused_api(_cfg(inputs), tmp_path, f"{f}: corrupt safetensors header: tensor '{Q}' data_offsets "
                                         f"[{a}, {len(data) + 4}] lie outside the {len(data)}-byte data section", inputs)


def test_overlapping_offsets(inputs, tmp_path):
    f = inputs["e1"] / ST
    header, _ = _split(f)
    k = header[K]["data_offsets"]
    _with_header(f, lambda h: h[V].update(data_offsets=list(k)))  # same shape, same bytes
    _refused_api(_cfg(inputs), tmp_path, f"{f}: corrupt safetensors header: tensors '{K}' and '{V}' overlap "
                                         f"(data_offsets [{k[0]}, {k[1]}] and [{k[0]}, {k[1]}])", inputs)


def test_unknown_dtype(inputs, tmp_path):
    f = inputs["e0"] / ST
    _with_header(f, lambda h: h[Q].update(dtype="C64"))
    _refused_api(_cfg(inputs), tmp_path, f"{f}: tensor '{Q}' has dtype C64, which bmmstream cannot read", inputs)


@pytest.mark.parametrize("case", ["shape", "dtype", "missing", "extra"])
def test_tensor_mismatch(inputs, tmp_path, case):
    f = inputs["e1"] / ST
    ts = load_file(f)
    n = "model.norm.weight"
    if case == "shape":
        ts[n] = torch.ones(17)
        why = f"tensor '{n}' has shape (17,), base has (16,)"
    elif case == "dtype":
        ts[n] = ts[n].to(torch.int32)
        why = f"tensor '{n}' has dtype I32, base has F32"
    elif case == "missing":
        del ts[n]
        why = f"missing tensor '{n}'"
    else:
        ts["extra.bias"] = torch.zeros(3)
        why = "unexpected tensor 'extra.bias'"
    save_file(ts, f)
    _refused_api(_cfg(inputs), tmp_path, f"1 problem in the inputs: expert '{inputs['e1']}': {why}", inputs)


def test_pickle_only_folder(inputs, tmp_path):
    e = inputs["e0"]
    (e / ST).unlink()
    (e / "pytorch_model.bin").write_bytes(b"not loaded")
    _refused_api(_cfg(inputs), tmp_path, f"{e}: only pickle weights (pytorch_model.bin); bmmstream reads "
                                         f"safetensors only and never unpickles (convert with: "
                                         f"model.save_pretrained(out, safe_serialization=True) in an environment "
                                         f"you trust)", inputs)


def test_index_pointing_outside_the_folder(inputs, tmp_path):
    e = inputs["e1"]
    outside = e.parent / "elsewhere.safetensors"
    (e / ST).rename(outside)
    names = list(load_file(outside))
    (e / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: "../elsewhere.safetensors" for n in names}}))
    _refused_api(_cfg(inputs), tmp_path, f"{e / 'model.safetensors.index.json'}: names shard "
                                         f"'../elsewhere.safetensors' outside the model folder; refusing to read it",
                 inputs)


def test_malformed_calibration_file(inputs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": "abc"}\n')
    cfg = _cfg(inputs, "regmean")
    for m in cfg["models"]:
        m["calibration"] = {"path": str(bad)}
    _refused_api(cfg, tmp_path, f"{bad}:2: 'input_ids' must be a list of non-negative integers", inputs)


# -- NaN / Inf, config.json, blocks --------------------------------------------------------------------
def _poison(folder: Path, name: str, value: float) -> None:
    ts = load_file(folder / ST)
    ts[name] = ts[name].clone()
    ts[name].view(-1)[3] = value
    save_file(ts, folder / ST)


def test_nan_in_an_expert_with_ties_cli(inputs, tmp_path):
    n = "model.layers.1.mlp.down_proj.weight"
    _poison(inputs["e1"], n, float("nan"))
    _refused_cli(_cfg(inputs, "ties"), tmp_path, f"{inputs['e1']}: tensor '{n}' contains NaN or Inf values", inputs)


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("bmm", {"anchor": "ties", "rho": 0.01}),
                                            ("dare_ties", {})])
def test_inf_in_the_base(inputs, tmp_path, method, params):
    n = "model.layers.0.self_attn.o_proj.weight"
    _poison(inputs["base"], n, float("-inf"))
    _refused_api(_cfg(inputs, method, params), tmp_path, f"{inputs['base']}: tensor '{n}' contains NaN or Inf values",
                 inputs)


def test_nan_in_a_norm_of_an_expert_with_bmm(inputs, tmp_path):
    n = "model.layers.0.input_layernorm.weight"
    _poison(inputs["e0"], n, float("nan"))
    _refused_api(_cfg(inputs, "bmm", {"anchor": "task_arithmetic"}), tmp_path,
                 f"{inputs['e0']}: tensor '{n}' contains NaN or Inf values", inputs)


def test_base_without_config_json_cli(inputs, tmp_path):
    (inputs["base"] / "config.json").unlink()
    _refused_cli(_cfg(inputs), tmp_path, f"{inputs['base']}: the base model has no config.json (needed to plan "
                                         f"the merge and to write the merged model)", inputs)


def test_blocks_larger_than_the_layers_cli(inputs, tmp_path):
    _refused_cli(_cfg(inputs, "bmm", {"blocks": 5}), tmp_path,
                 f"parameters.blocks is 5, but {inputs['base']} has 2 layer(s) to cut into blocks", inputs)


@pytest.mark.parametrize("blocks", [0, "two"])
def test_blocks_not_a_positive_integer(inputs, tmp_path, blocks):
    _refused_api(_cfg(inputs, "bmm", {"blocks": blocks}), tmp_path,
                 f"parameters.blocks must be an integer >= 1, got {blocks!r}", inputs)


# -- read-only and full disks --------------------------------------------------------------------------
READ_ONLY = textwrap.dedent(
    """
    import errno, os
    _ro, _mkdir = os.environ["BMM_TEST_READ_ONLY"], os.mkdir
    def mkdir(path, *a, **kw):  # tests run as root, which chmod does not stop: a read-only mount
        if os.fspath(path).startswith(_ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return _mkdir(path, *a, **kw)
    os.mkdir = mkdir
    """
)


@pytest.mark.parametrize("where", ["out", "run"])
def test_read_only_output_or_run_directory_cli(inputs, tmp_path, monkeypatch, where):
    monkeypatch.setenv("BMM_TEST_READ_ONLY", str(tmp_path / where))
    _refused_cli(_cfg(inputs), tmp_path, f"{tmp_path / where}: read-only file system; choose a writable --out / "
                                         f"--run-dir", inputs, prelude=READ_ONLY)
    assert not (tmp_path / "out.partial").exists()


def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_the_output_then_rerun_resumes(inputs, tmp_path, monkeypatch):
    from bmmstream.output.writer import ShardWriter

    cfg = _cfg(inputs, "ties", shard_size="4KB")
    ref = bmmstream.merge(cfg, out=tmp_path / "ref", run_dir=tmp_path / "ref-run", device="cpu", progress=False)
    before = _tree_hash(inputs.values())
    orig, calls = ShardWriter._write_data, {"n": 0}

    def full_on_7th(self, data):
        calls["n"] += 1
        if calls["n"] == 7:
            self._file.write(bytes(data)[: len(data) // 2])  # part of it went out before the disk filled
            _enospc()
        return orig(self, data)

    monkeypatch.setattr(ShardWriter, "_write_data", full_on_7th)
    with pytest.raises(BmmError) as e:
        bmmstream.merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False)
    m = re.fullmatch(rf"{re.escape(str(tmp_path / 'out.partial'))}/\.(model-\d+-of-\d+\.safetensors)\.tmp: no space "
                     r"left on device \((\d+) bytes needed\); free space and rerun the same command to resume",
                     str(e.value))
    assert m, str(e.value)
    _nothing_presented(tmp_path)
    # bytes needed = the rest of this shard after the last whole tensor + every later shard
    shard, needed = m.group(1), int(m.group(2))
    last_end = [json.loads(line) for line in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()][-1]["end"]
    sizes = {p.name: p.stat().st_size for p in ref.glob("model-*.safetensors")}
    assert needed == sizes[shard] - last_end + sum(s for n, s in sizes.items() if n > shard)
    monkeypatch.setattr(ShardWriter, "_write_data", orig)  # space freed: the same command resumes
    out = bmmstream.merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False)
    assert _tree_hash([out]) == {k.replace(str(tmp_path / "ref"), str(out)): v for k, v in _tree_hash([ref]).items()}
    assert _tree_hash(inputs.values()) == before


def test_disk_full_while_writing_statistics_then_rerun_resumes(inputs, tmp_path, monkeypatch):
    from bmmstream.statistics.store import StatsStore

    cfg = _cfg(inputs, "bmm", {"anchor": "task_arithmetic", "rho": 0.01}, dtype="float64")
    ref = bmmstream.merge(cfg, out=tmp_path / "ref", run_dir=tmp_path / "ref-run", device="cpu", progress=False)
    orig, calls = StatsStore.put, {"n": 0}

    def full_on_9th(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:
            _enospc()
        return orig(self, *a, **kw)

    monkeypatch.setattr(StatsStore, "put", full_on_9th)
    with pytest.raises(BmmError) as e:
        bmmstream.merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False)
    # layer 1 (the 9th module with statistics is its q_proj): G and C of its 7 linears in float64
    h, i, kv = 16, 32, 8
    need = 8 * ((h + h) * h + 2 * (kv + h) * h + (h + h) * h + 2 * (i + h) * h + (h + i) * i)
    assert str(e.value) == (f"{tmp_path / 'run' / 'stats.zarr'}: no space left on device ({need} bytes needed); "
                            f"free space and rerun the same command to resume")
    _nothing_presented(tmp_path)
    monkeypatch.setattr(StatsStore, "put", orig)
    out = bmmstream.merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False)
    for p in ref.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_disk_full_on_a_small_write_names_the_file(inputs, tmp_path, monkeypatch):
    """A full disk outside the shards (here the model card) is one line naming the file too."""
    import bmmstream.output.writer as W

    orig = W.write_bytes_atomic

    def full(path, data):
        if Path(path).name == "README.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(W._tmp_name(Path(path))))
        return orig(path, data)

    monkeypatch.setattr(W, "write_bytes_atomic", full)
    with pytest.raises(BmmError) as e:
        bmmstream.merge(_cfg(inputs), out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False)
    assert str(e.value) == (f"{tmp_path / 'out.partial' / '.README.md.tmp'}: no space left on device; free space "
                            f"and rerun the same command to resume")
    _nothing_presented(tmp_path)


# -- the Hub ---------------------------------------------------------------------------------------------
from hub_fixtures import hub, hub_env  # noqa: E402,F401  (fixtures)


def test_hub_bytes_corrupted_after_a_valid_header(hub, tiny_llama_suite, tmp_path):
    """The header parses, every value is finite, but one bit differs from the file the Hub recorded:
    the merge is refused before the output is presented, naming the file."""
    from huggingface_hub import HfApi

    from bmmstream.pipeline import execute, prepare

    cfg = {"base_model": str(tiny_llama_suite.base), "models": [{"model": "org/expert_0"},
                                                                 {"model": str(tiny_llama_suite.experts[1])}],
           "merge_method": "task_arithmetic"}
    before = _tree_hash([tiny_llama_suite.base, *tiny_llama_suite.experts])
    job = prepare(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu")
    hub.set_faults(bitflip=1)  # the next tensor body: headers were read already
    try:
        with pytest.raises(BmmError) as e:
            execute(job, progress=False)
    finally:
        job.sources.close()
    info = HfApi(endpoint=hub.url).model_info("org/expert_0", files_metadata=True)
    (lfs,) = [s.lfs for s in info.siblings if s.rfilename == ST]
    assert hub.snapshot()["injected"] == {"bitflip": 1}
    assert str(e.value) == (
        f"Hub repo 'org/expert_0' at revision {info.sha}, file '{ST}': the bytes read do not match the Hub's "
        f"recorded sha256 {lfs.sha256[:16]}... of {lfs.size} bytes (corrupted in transit or changed on the server); "
        f"rerun to fetch them again"
    )
    _nothing_presented(tmp_path)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "run" / "journal.jsonl").exists()
    assert _tree_hash([tiny_llama_suite.base, *tiny_llama_suite.experts]) == before
    # the fault is gone: the same merge completes and equals the local one
    out = bmmstream.merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False)
    local = {**cfg, "models": [{"model": str(e)} for e in tiny_llama_suite.experts[:2]]}
    ref = bmmstream.merge(local, out=tmp_path / "ref", run_dir=tmp_path / "ref-run", device="cpu", progress=False)
    for p in ref.glob("*.safetensors"):
        assert (out / p.name).read_bytes() == p.read_bytes()


def test_hub_tensor_read_twice_with_different_bytes(hub, tmp_path):
    """A tensor read again (a prepass, then the merge) must be the bytes first read, which the file's
    sha256 covers; verify() re-reads tensors used out of file order and compares them the same way."""
    from bmmstream.sources.hub import HubSource

    src = HubSource("org/expert_0", cache_dir=tmp_path / "c")
    names = sorted(src.tensor_infos(), key=lambda n: src._loc[n][1])
    first, last = names[0], names[-1]
    src.get(first)
    hub.set_faults(bitflip=1)
    with pytest.raises(BmmError) as e:
        src.get(first)
    where = f"Hub repo 'org/expert_0' at revision {src.revision}, file '{ST}'"
    assert str(e.value) == (f"{where}: tensor '{first}' read twice with different bytes (corrupted in transit or "
                            f"changed on the server); rerun to fetch it again")
    hub.set_faults(bitflip=1)
    src.get(last)  # out of file order, flipped: verify() fetches it again, clean, and compares
    with pytest.raises(BmmError) as e:
        src.verify()
    assert str(e.value) == (f"{where}: tensor '{last}' read twice with different bytes (corrupted in transit or "
                            f"changed on the server); rerun to fetch it again")
    src.close()
    clean = HubSource("org/expert_0", cache_dir=tmp_path / "c2")
    clean.get(last)
    clean.verify()  # nothing wrong: passes, having fetched the rest of the file once
    clean.close()
