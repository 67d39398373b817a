"""External anchor: U = W_ext - W_pre from a safetensors folder, with clear errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from bmmstream.errors import BmmError
from bmmstream.methods import get_method
from bmmstream.methods.registry import ModuleInput
from bmmstream.plan.layout import ModuleSpec


def _inp(name, base, T=2, kind="linear"):
    deltas = torch.zeros((T, *base.shape), dtype=base.dtype)
    return ModuleInput(ModuleSpec(name, tuple(base.shape), kind, "other", 0, 0, 1), base, deltas)


def test_task_vector_of_external_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 12, generator=g)
    b = torch.randn(12, generator=g)
    save_file({"layers.0.w": w.bfloat16(), "layers.0.b": b}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    m = get_method("external", {"path": str(tmp_path)})
    base_w = torch.randn(16, 12, generator=g, dtype=torch.float64)
    base_b = torch.randn(12, generator=g, dtype=torch.float64)
    u = m.merge(_inp("layers.0.w", base_w))
    assert u.dtype == torch.float64
    assert torch.equal(u, w.bfloat16().double() - base_w)  # read in file dtype, math in compute dtype
    assert torch.equal(m.merge(_inp("layers.0.b", base_b, kind="vector")), b.double() - base_b)
    with pytest.raises(BmmError, match="has no tensor 'layers.1.w'"):
        m.merge(_inp("layers.1.w", base_w))
    with pytest.raises(BmmError, match=r"shape \[16, 12\], the base model has \[12, 16\]"):
        m.merge(_inp("layers.0.w", base_w.T.contiguous()))
    m.close()


def test_path_required():
    with pytest.raises(BmmError, match="parameter 'path'"):
        get_method("external")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_external_checkpoint_is_refused(tmp_path, bad):
    """A NaN/Inf in the external merge would pass into the merged weight (BMM's anchor): refused by name."""
    w = torch.ones(4, 3)
    w[2, 1] = bad
    save_file({"layers.0.w": w}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    m = get_method("external", {"path": str(tmp_path)})
    with pytest.raises(BmmError, match=rf"^{tmp_path}: tensor 'layers.0.w' contains NaN or Inf values$"):
        m.merge(_inp("layers.0.w", torch.zeros(4, 3)))
    m.close()
