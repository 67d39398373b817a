import logging
from pathlib import Path

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.sources.base import TensorInfo
from bmmstream.sources.local import LocalSource
from bmmstream.sources.validate import validate_sources


class FakeSource:
    """Headers and config only: validation must not need tensor bytes."""

    revision = None

    def __init__(self, id, infos, config=None):
        self.id = id
        self._infos = {k: TensorInfo(tuple(s), d) for k, (s, d) in infos.items()}
        self._config = config or {}

    def tensor_infos(self):
        return dict(self._infos)

    def config(self):
        return dict(self._config)

    def get(self, name):
        raise AssertionError("validation must not read tensor data")


BASE = {
    "lm_head.weight": ((128, 48), "BF16"),
    "model.layers.0.mlp.up_proj.weight": ((64, 48), "BF16"),
    "model.layers.0.input_layernorm.weight": ((48,), "BF16"),
    "model.position_ids": ((1, 512), "I64"),
}
CFG = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 64, "vocab_size": 128,
       "num_hidden_layers": 1, "torch_dtype": "bfloat16"}


def _with(changes=(), drop=(), add=None):
    d = {k: v for k, v in BASE.items() if k not in drop}
    d.update(dict(changes))
    d.update(add or {})
    return d


def test_matching_inputs_pass_and_float_dtype_differences_are_only_noted(caplog):
    base = FakeSource("path/base", BASE, CFG)
    same = FakeSource("path/a", BASE, {**CFG, "torch_dtype": "float32", "_name_or_path": "x"})
    f32 = FakeSource("path/f32", _with({"lm_head.weight": ((128, 48), "F32"),
                                         "model.layers.0.mlp.up_proj.weight": ((64, 48), "F16")}), CFG)
    with caplog.at_level(logging.INFO, logger="bmmstream.sources.validate"):
        validate_sources(base, [same, f32])
    assert "expert 'path/f32': 2 floating tensor(s) stored in another dtype" in caplog.text
    validate_sources(base, [])


def test_all_problems_in_one_line():
    base = FakeSource("path/base", BASE, CFG)
    b = FakeSource("path/b", _with({"model.layers.0.mlp.up_proj.weight": ((64, 32), "BF16")}), CFG)
    c = FakeSource("path/c", _with(drop=["lm_head.weight"]), {**CFG, "hidden_size": 32})
    d = FakeSource("path/d", _with({"model.position_ids": ((1, 512), "I32")},
                                   add={"extra.bias": ((3,), "F32")}), {**CFG, "model_type": "mistral"})
    anchor = FakeSource("runs/anchor", _with({"model.layers.0.input_layernorm.weight": ((49,), "BF16")}), {})
    with pytest.raises(BmmError) as e:
        validate_sources(base, [b, c, d], extra=[anchor])
    assert str(e.value) == (
        "7 problems in the inputs: "
        "expert 'path/b': tensor 'model.layers.0.mlp.up_proj.weight' has shape (64, 32), base has (64, 48); "
        "expert 'path/c': config.json hidden_size is 32, base has 48; "
        "expert 'path/c': missing tensor 'lm_head.weight'; "
        "expert 'path/d': config.json model_type is 'mistral', base has 'llama'; "
        "expert 'path/d': unexpected tensor 'extra.bias'; "
        "expert 'path/d': tensor 'model.position_ids' has dtype I32, base has I64; "
        "input 'runs/anchor': tensor 'model.layers.0.input_layernorm.weight' has shape (49,), base has (48,)"
    )


def test_single_problem_and_cap():
    base = FakeSource("b", BASE, CFG)
    one = FakeSource("x", _with(drop=["lm_head.weight"]), CFG)
    with pytest.raises(BmmError) as e:
        validate_sources(base, [one])
    assert str(e.value) == "1 problem in the inputs: expert 'x': missing tensor 'lm_head.weight'"

    many = {f"t{i:02d}": ((2,), "F32") for i in range(25)}
    with pytest.raises(BmmError) as e:
        validate_sources(FakeSource("b", many, CFG), [FakeSource("y", {})])
    msg = str(e.value)
    assert msg.startswith("25 problems in the inputs: expert 'y': missing tensor 't00'; ")
    assert msg.endswith("expert 'y': missing tensor 't19'; ... and 5 more")
    assert "t20" not in msg and "\n" not in msg


def test_with_local_folders(tmp_path, st_folder):
    w = torch.zeros(4, 3)
    st_folder(tmp_path / "base", {"a.weight": w, "b.weight": w}, config={"model_type": "llama"})
    st_folder(tmp_path / "e1", {"a.weight": w, "b.weight": w.to(torch.bfloat16)}, config={"model_type": "llama"})
    st_folder(tmp_path / "e2", {"a.weight": torch.zeros(3, 4)}, config={"model_type": "llama"})
    base, e1, e2 = (LocalSource(tmp_path / n) for n in ("base", "e1", "e2"))
    validate_sources(base, [e1])
    with pytest.raises(BmmError) as e:
        validate_sources(base, [e1, e2])
    p = tmp_path / "e2"
    assert str(e.value) == (
        f"2 problems in the inputs: expert '{p}': tensor 'a.weight' has shape (3, 4), base has (4, 3); "
        f"expert '{p}': missing tensor 'b.weight'"
    )
