"""RegMean: limits (T=1, identical Grams), dense float64 reference, shrinkage, fallbacks, errors."""
from __future__ import annotations

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.methods import get_method
from bmmstream.methods.registry import ModuleInput
from bmmstream.methods.regmean import shrink_offdiag
from bmmstream.plan.layout import ModuleSpec

D_OUT, D_IN = 5, 4


def _spec(kind="linear", shape=(D_OUT, D_IN)):
    return ModuleSpec("model.layers.0.mlp.up_proj.weight", shape, kind, "mlp_in", 0, 0, 1)


def _gram(gen, n=12, d=D_IN, dtype=torch.float64):
    x = torch.randn(n, d, generator=gen, dtype=dtype) * torch.linspace(0.5, 2.0, d, dtype=dtype)
    return x.T @ x / n


def _inp(t, gen, grams=None, dtype=torch.float64):
    base = torch.randn(D_OUT, D_IN, generator=gen, dtype=dtype)
    deltas = torch.randn(t, D_OUT, D_IN, generator=gen, dtype=dtype)
    if grams is None:
        grams = torch.stack([_gram(gen, dtype=dtype) for _ in range(t)])
    return ModuleInput(_spec(), base, deltas, grams)


def test_single_expert_returns_the_expert():
    g = torch.Generator().manual_seed(0)
    inp = _inp(1, g)
    for alpha in (1.0, 0.9, 0.3):
        u = get_method("regmean", {"alpha": alpha}).merge(inp)
        torch.testing.assert_close(u, inp.deltas[0], rtol=1e-10, atol=1e-10)


def test_identical_grams_give_the_average():
    g = torch.Generator().manual_seed(1)
    gram = _gram(g)
    inp = _inp(3, g, grams=gram.expand(3, D_IN, D_IN).clone())
    u = get_method("regmean").merge(inp)
    torch.testing.assert_close(u, inp.deltas.mean(0), rtol=1e-10, atol=1e-10)


def test_equals_dense_float64_reference_in_weight_space():
    g = torch.Generator().manual_seed(2)
    inp = _inp(3, g)
    alpha = 0.7
    u = get_method("regmean", {"alpha": alpha}).merge(inp)
    # reference written in weight space, the paper's formula, with an explicit inverse
    ws = inp.base + inp.deltas
    gt = []
    for gr in inp.grams:
        off = gr - torch.diag(torch.diag(gr))
        gt.append(torch.diag(torch.diag(gr)) + alpha * off)
    w = sum(wt @ gti for wt, gti in zip(ws, gt)) @ torch.linalg.inv(sum(gt))
    torch.testing.assert_close(u, w - inp.base, rtol=1e-9, atol=1e-9)
    # and it is not simply the average (the test compares something real)
    assert (u - inp.deltas.mean(0)).norm() > 1e-3


def test_alpha_zero_is_per_input_dimension_weighted_average():
    g = torch.Generator().manual_seed(3)
    inp = _inp(2, g)
    u = get_method("regmean", {"alpha": 0.0}).merge(inp)
    d = torch.diagonal(inp.grams, dim1=-2, dim2=-1)  # [T, d_in]
    expect = (inp.deltas * d[:, None, :]).sum(0) / d.sum(0)
    torch.testing.assert_close(u, expect, rtol=1e-10, atol=1e-10)


def test_shrink_offdiag():
    gr = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    torch.testing.assert_close(shrink_offdiag(gr, 0.25), torch.tensor([[4.0, 0.5], [0.5, 9.0]]))


def test_no_grams_vectors_embeddings_use_simple_average():
    g = torch.Generator().manual_seed(4)
    inp = _inp(3, g)
    m = get_method("regmean")
    no_grams = ModuleInput(inp.spec, inp.base, inp.deltas, None)
    torch.testing.assert_close(m.merge(no_grams), inp.deltas.mean(0))
    vec = ModuleInput(_spec("vector", (D_OUT,)), inp.base[0], inp.deltas[:, 0], None)
    torch.testing.assert_close(m.merge(vec), inp.deltas[:, 0].mean(0))
    emb = ModuleInput(_spec("embedding"), inp.base, inp.deltas, inp.grams)
    torch.testing.assert_close(m.merge(emb), inp.deltas.mean(0))


def test_singular_sum_is_damped_and_recorded():
    g = torch.Generator().manual_seed(5)
    gr = _gram(g)
    gr[:, 0] = 0
    gr[0, :] = 0  # input dimension 0 never active in any task
    inp = _inp(2, g, grams=torch.stack([gr, gr * 2]))
    m = get_method("regmean", {"alpha": 1.0})
    u = m.merge(inp)
    assert torch.isfinite(u).all()
    assert inp.spec.name in m.describe()["damped"]
    # the active dimensions still get the exact RegMean answer: G_2 = 2 G_1 -> (U_1 + 2 U_2) / 3
    expect = (inp.deltas[0] + 2 * inp.deltas[1]) / 3
    torch.testing.assert_close(u[:, 1:], expect[:, 1:], rtol=1e-6, atol=1e-6)


def test_float32_inputs_and_dtype_preserved():
    g = torch.Generator().manual_seed(6)
    inp = _inp(3, g, dtype=torch.float32)
    u = get_method("regmean").merge(inp)
    assert u.dtype == torch.float32
    ref = get_method("regmean").merge(
        ModuleInput(inp.spec, inp.base.double(), inp.deltas.double(), inp.grams.double())
    )
    assert (u.double() - ref).norm() / ref.norm() < 1e-5


def test_errors():
    g = torch.Generator().manual_seed(7)
    inp = _inp(2, g)
    bad = ModuleInput(inp.spec, inp.base, inp.deltas, inp.grams[:1])
    with pytest.raises(BmmError, match=r"up_proj.weight: input Grams have shape \(1, 4, 4\), expected \(2, 4, 4\)"):
        get_method("regmean").merge(bad)
    with pytest.raises(BmmError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        get_method("regmean", {"alpha": 1.5})
    with pytest.raises(BmmError, match=r"unknown parameter\(s\) \['a'\]"):
        get_method("regmean", {"a": 0.5})
