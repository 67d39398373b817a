import json
import os

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.sources import open_source
from bmmstream.sources.base import AUX_FILES, TensorInfo, TensorSource
from bmmstream.sources.local import LocalSource


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(2, 6, generator=g).to(torch.float16),
        "ids": torch.arange(7, dtype=torch.int64),
    }


def test_single_file_folder(tmp_path, st_folder):
    ts = _tensors()
    st_folder(tmp_path / "m", ts, config={"model_type": "llama", "hidden_size": 3})
    src = LocalSource(tmp_path / "m")
    assert isinstance(src, TensorSource)
    assert src.revision is None and src.id == str(tmp_path / "m")
    assert src.tensor_infos() == {
        "a.weight": TensorInfo((4, 3), "F32"),
        "b.weight": TensorInfo((5,), "BF16"),
        "c.weight": TensorInfo((2, 6), "F16"),
        "ids": TensorInfo((7,), "I64"),
    }
    for name, t in ts.items():
        got = src.get(name)
        assert got.dtype == t.dtype and got.device.type == "cpu"
        assert torch.equal(got, t)
    assert src.config() == {"model_type": "llama", "hidden_size": 3}
    src.close()


def test_indexed_shards_and_loose_shards(tmp_path, st_folder):
    ts = _tensors()
    shards = [["a.weight", "ids"], ["b.weight"], ["c.weight"]]
    st_folder(tmp_path / "idx", ts, shards=shards)
    st_folder(tmp_path / "loose", ts, shards=shards, index=False)
    for folder in ("idx", "loose"):
        src = LocalSource(tmp_path / folder)
        assert set(src.tensor_infos()) == set(ts)
        assert src.shard_of("b.weight").name == "model-00002-of-00003.safetensors"
        for name, t in ts.items():
            assert torch.equal(src.get(name), t)
        assert src.config() == {}


def test_open_source_dispatches_to_local(tmp_path, st_folder):
    st_folder(tmp_path / "m", _tensors())
    assert isinstance(open_source(str(tmp_path / "m")), LocalSource)


def test_shards_are_opened_lazily(tmp_path, st_folder):
    """Infos come from headers alone; a shard is mapped only when one of its tensors is read."""
    ts = _tensors()
    st_folder(tmp_path / "m", ts, shards=[["a.weight", "ids"], ["b.weight"], ["c.weight"]])
    src = LocalSource(tmp_path / "m")
    assert src._handles == {}
    src.get("b.weight")
    assert [p.name for p in src._handles] == ["model-00002-of-00003.safetensors"]
    # bytes of another shard may even be damaged without affecting this one
    other = tmp_path / "m" / "model-00003-of-00003.safetensors"
    other.write_bytes(other.read_bytes()[:-8] + b"\xff" * 8)
    assert torch.equal(src.get("a.weight"), ts["a.weight"])
    assert not torch.equal(src.get("c.weight"), ts["c.weight"])


def test_aux_files(tmp_path, st_folder):
    st_folder(tmp_path / "m", _tensors())
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    (tmp_path / "m" / "generation_config.json").write_text("{}")
    (tmp_path / "m" / "random.txt").write_text("x")
    src = LocalSource(tmp_path / "m")
    assert src.aux_files() == ["tokenizer.json", "generation_config.json"]
    assert all(f in AUX_FILES for f in src.aux_files())
    assert src.aux_path("tokenizer.json") == tmp_path / "m" / "tokenizer.json"
    with pytest.raises(BmmError, match="no file vocab.txt"):
        src.aux_path("vocab.txt")


def test_pickle_only_folder_is_refused(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (d / "config.json").write_text("{}")
    with pytest.raises(BmmError) as e:
        LocalSource(d)
    assert str(e.value).startswith(
        f"{d}: only pickle weights (pytorch_model.bin); bmmstream reads safetensors only and never unpickles"
    )
    assert "convert with" in str(e.value)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(BmmError, match="no such file or folder"):
        LocalSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(BmmError) as e:
        LocalSource(tmp_path / "empty")
    assert str(e.value) == f"{tmp_path / 'empty'}: no weights found (no *.safetensors file)"


def test_index_naming_missing_shard(tmp_path, st_folder):
    ts = _tensors()
    st_folder(tmp_path / "m", ts, shards=[["a.weight", "ids"], ["b.weight", "c.weight"]])
    os.remove(tmp_path / "m" / "model-00002-of-00002.safetensors")
    with pytest.raises(BmmError) as e:
        LocalSource(tmp_path / "m")
    assert str(e.value) == (
        f"{tmp_path / 'm' / 'model.safetensors.index.json'}: names shard(s) that are missing "
        f"from the folder: model-00002-of-00002.safetensors"
    )


def test_index_mapping_tensor_to_wrong_shard(tmp_path, st_folder):
    ts = _tensors()
    st_folder(tmp_path / "m", ts, shards=[["a.weight", "ids"], ["b.weight", "c.weight"]])
    idx = tmp_path / "m" / "model.safetensors.index.json"
    obj = json.loads(idx.read_text())
    obj["weight_map"]["a.weight"] = "model-00002-of-00002.safetensors"
    idx.write_text(json.dumps(obj))
    with pytest.raises(BmmError, match="maps tensor 'a.weight' to model-00002-of-00002.safetensors"):
        LocalSource(tmp_path / "m")


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[:5], "file is only 5 bytes"),
        (lambda b: (10**7).to_bytes(8, "little") + b[8:], "declared header length 10000000"),
        (lambda b: b[:8] + b"x" + b[9:], "corrupt safetensors header (Expecting value"),
    ],
)
def test_corrupt_header_names_file(tmp_path, st_folder, damage, why):
    st_folder(tmp_path / "m", _tensors())
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(BmmError) as e:
        LocalSource(tmp_path / "m")
    msg = str(e.value)
    assert msg.startswith(f"{f}: corrupt safetensors header")
    assert why in msg
    assert "\n" not in msg


def test_truncated_data_is_detected_from_header(tmp_path, st_folder):
    st_folder(tmp_path / "m", {"w": torch.zeros(100)})
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(BmmError, match=r"tensor 'w' data_offsets \[0, 400\] lie outside the 360-byte"):
        LocalSource(tmp_path / "m")


def test_unknown_tensor(tmp_path, st_folder):
    st_folder(tmp_path / "m", _tensors())
    src = LocalSource(tmp_path / "m", id="my/model")
    with pytest.raises(BmmError, match="my/model: no tensor 'nope'"):
        src.get("nope")


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    "entry, why",
    [
        ({"dtype": "F8_E5M2", "shape": [4], "data_offsets": [0, 4]}, "tensor 'w' has dtype F8_E5M2, which bmmstream cannot read"),
        ({"dtype": "F32", "shape": [1]}, "corrupt safetensors header entry for tensor 'w'"),
    ],
)
def test_bad_header_entry_is_refused_at_open_naming_tensor(tmp_path, entry, why):
    (tmp_path / "m").mkdir()
    f = tmp_path / "m" / "model.safetensors"
    _raw_safetensors(f, {"w": entry}, bytes(4))
    with pytest.raises(BmmError) as e:
        LocalSource(tmp_path / "m")
    assert str(e.value) == f"{f}: {why}"


def test_header_larger_than_probe_is_read_whole(tmp_path):
    """A header past the first 100 kB read (many tensors, long metadata) parses like a small one."""
    (tmp_path / "m").mkdir()
    f = tmp_path / "m" / "model.safetensors"
    header = {"__metadata__": {"note": "x" * 150_000}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _raw_safetensors(f, header, torch.tensor([1.5, -2.0]).numpy().tobytes())
    src = LocalSource(tmp_path / "m")
    assert torch.equal(src.get("w"), torch.tensor([1.5, -2.0]))
