"""Cauchy PoE: T = 1, monotone objective, and a stationary point of J at convergence."""
from __future__ import annotations

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.methods import get_method
from bmmstream.methods.poe_cauchy import cauchy_objective, poe_cauchy_merge
from bmmstream.methods.registry import ModuleInput
from bmmstream.plan.layout import ModuleSpec


def _inp(name: str, deltas: torch.Tensor, kind: str = "linear") -> ModuleInput:
    shape = tuple(deltas.shape[1:])
    return ModuleInput(ModuleSpec(name, shape, kind, "other", 0, 0, 1), torch.zeros(shape, dtype=deltas.dtype), deltas)


def _rand(seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _j(u, tvs, eps):
    # J written independently of the implementation, differentiable
    return sum(torch.log((t.T @ (u - t)).pow(2).sum() + eps * t.pow(2).sum()) for t in tvs)


def test_single_task_returns_task_vector():
    for shape in ((16, 12), (12, 16)):
        tvs = _rand(0, 1, *shape)
        out = get_method("poe_cauchy").merge(_inp("w", tvs))
        assert torch.allclose(out, tvs[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("shape", [(16, 12), (12, 16)])
def test_objective_never_increases_and_reaches_a_stationary_point(shape):
    tvs = _rand(1, 4, *shape)
    tvs[3] *= 8.0  # one loud expert: the heavy tail matters
    eps = 1e-3
    obj: list[float] = []
    u = poe_cauchy_merge(tvs, eps=eps, tol=1e-12, max_iter=400, objective=obj)
    assert len(obj) >= 3
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(obj, obj[1:])), obj
    assert obj[-1] < obj[0] - 1e-3
    assert abs(obj[-1] - cauchy_objective(u, tvs, eps)) < 1e-9 * abs(obj[-1]) + 1e-9
    assert abs(obj[-1] - float(_j(u, tvs, eps))) < 1e-9 * abs(obj[-1]) + 1e-9

    def grad_at(v):
        v = v.clone().requires_grad_()
        _j(v, tvs, eps).backward()
        return v.grad

    g0, g1 = grad_at(tvs.sum(0)).norm(), grad_at(u).norm()
    assert g1 < 1e-5 * g0, (float(g0), float(g1))


def test_default_tolerance_stops_early():
    tvs = _rand(2, 3, 16, 12)
    obj: list[float] = []
    poe_cauchy_merge(tvs, objective=obj)
    assert 2 <= len(obj) < 52


def test_other_kinds_take_the_mean():
    m = get_method("poe_cauchy")
    v, e = _rand(3, 3, 12), _rand(4, 3, 40, 8)
    assert torch.equal(m.merge(_inp("v", v, "vector")), v.mean(0))
    assert torch.equal(m.merge(_inp("e", e, "embedding")), e.mean(0))


def test_zero_task_is_ignored_and_float32_works():
    tvs = _rand(5, 3, 16, 12)
    tvs[1] = 0.0
    out = get_method("poe_cauchy").merge(_inp("w", tvs.float()))
    ref = poe_cauchy_merge(tvs[[0, 2]])
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-4)


def test_bad_parameters():
    with pytest.raises(BmmError, match="eps, ridge, tol must be > 0"):
        get_method("poe_cauchy", {"eps": 0})
