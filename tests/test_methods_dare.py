"""DARE: unbiased in expectation, and the mask depends only on (seed, tensor name, task)."""
from __future__ import annotations

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.methods import get_method
from bmmstream.methods.dare import keep_mask
from bmmstream.methods.registry import ModuleInput
from bmmstream.methods.ties import elect_and_mean
from bmmstream.plan.layout import ModuleSpec


def _inp(name: str, deltas: torch.Tensor) -> ModuleInput:
    shape = tuple(deltas.shape[1:])
    return ModuleInput(ModuleSpec(name, shape, "linear", "other", 0, 0, 1), torch.zeros(shape, dtype=deltas.dtype), deltas)


def _deltas(seed=0, T=3, shape=(16, 12)):
    return torch.randn((T, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_unbiased_in_expectation():
    d = _deltas()
    density, n_seeds = 0.3, 600
    acc = torch.zeros(d.shape[1:], dtype=torch.float64)
    for s in range(n_seeds):
        acc += get_method("dare", {"density": density}, seed=s).merge(_inp("layers.0.w", d))
    mean = acc / n_seeds
    ta = d.sum(0)
    # one draw: Var = sum_t U_t^2 (1 - d) / d; mean over n_seeds draws
    sd = (d.pow(2).sum(0) * (1 - density) / density / n_seeds).sqrt()
    z = ((mean - ta).abs() / sd).max()
    assert z < 5.5, float(z)
    # and it is genuinely random: a single draw is far from TA
    one = get_method("dare", {"density": density}, seed=0).merge(_inp("layers.0.w", d))
    assert (one - ta).abs().max() > 1.0


def test_keep_fraction_and_rescale():
    d = torch.ones((2, 64, 64), dtype=torch.float64)
    out = get_method("dare", {"p": 0.75}, seed=1).merge(_inp("x", d))
    # each entry is 0, 4 or 8 (two tasks of 1/0.25); mean keep fraction near 0.25
    assert set(out.unique().tolist()) <= {0.0, 4.0, 8.0}
    frac = float(out.sum() / 4.0 / d.numel())
    assert abs(frac - 0.25) < 0.02


def test_same_mask_regardless_of_order_and_instance():
    a, b = _deltas(1), _deltas(2, shape=(12, 16))
    m1 = get_method("dare", {"density": 0.5}, seed=7)
    ua1, ub1 = m1.merge(_inp("a", a)), m1.merge(_inp("b", b))
    m2 = get_method("dare", {"density": 0.5}, seed=7)  # a "resumed" run, reversed order
    ub2, ua2 = m2.merge(_inp("b", b)), m2.merge(_inp("a", a))
    assert torch.equal(ua1, ua2) and torch.equal(ub1, ub2)
    # different name, seed or task -> different mask
    assert not torch.equal(keep_mask(7, "a", 0, (16, 12), 0.5), keep_mask(7, "b", 0, (16, 12), 0.5))
    assert not torch.equal(keep_mask(7, "a", 0, (16, 12), 0.5), keep_mask(8, "a", 0, (16, 12), 0.5))
    assert not torch.equal(keep_mask(7, "a", 0, (16, 12), 0.5), keep_mask(7, "a", 1, (16, 12), 0.5))


def test_ties_combine_and_density_one():
    d = _deltas(3)
    assert torch.equal(get_method("dare", {"density": 1.0, "scale": 0.5}).merge(_inp("w", d)), 0.5 * d.sum(0))
    assert torch.equal(get_method("dare", {"density": 1.0, "combine": "ties"}).merge(_inp("w", d)), elect_and_mean(d))
    m = get_method("dare", {"density": 0.5, "combine": "ties"}, seed=3)
    ta = get_method("dare", {"density": 0.5}, seed=3)
    # same mask, different combination: ties = disjoint mean of the same sparse vectors
    sparse_sum = ta.merge(_inp("w", d))
    out = m.merge(_inp("w", d))
    assert not torch.equal(out, sparse_sum)
    assert out.abs().max() <= (d.abs() / 0.5).max() + 1e-12


def test_parameters():
    assert get_method("dare").density == pytest.approx(0.1)
    assert get_method("dare", {"p": 0.2}).density == pytest.approx(0.8)
    with pytest.raises(BmmError, match="disagree"):
        get_method("dare", {"p": 0.2, "density": 0.5})
    with pytest.raises(BmmError, match="combine must be one of"):
        get_method("dare", {"combine": "mean"})


def test_mergekit_names():
    d = _deltas(11)
    a = get_method("dare_ties", {"density": 0.5}, seed=2).merge(_inp("w", d))
    b = get_method("dare", {"density": 0.5, "combine": "ties"}, seed=2).merge(_inp("w", d))
    assert torch.equal(a, b)
    a = get_method("dare_linear", {"density": 0.5}, seed=2).merge(_inp("w", d))
    b = get_method("dare", {"density": 0.5}, seed=2).merge(_inp("w", d))
    assert torch.equal(a, b)
