"""WUDI: the Gram form equals the reference loss/gradient/Adam path, T = 1, monotone loss."""
from __future__ import annotations

import torch

from bmmstream.methods import get_method
from bmmstream.methods.registry import ModuleInput
from bmmstream.methods.wudi import wudi_merge, wudi_statistics
from bmmstream.plan.layout import ModuleSpec


def _inp(name: str, deltas: torch.Tensor, kind: str = "linear") -> ModuleInput:
    shape = tuple(deltas.shape[1:])
    return ModuleInput(ModuleSpec(name, shape, kind, "other", 0, 0, 1), torch.zeros(shape, dtype=deltas.dtype), deltas)


def _rand(seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_loss(u, tvs):
    # the reference's loss: sum_t ||(U - U_t) U_t^T||^2 / ||U_t||^2 (d_out x d_out products)
    l2 = tvs.reshape(tvs.shape[0], -1).norm(dim=1).pow(2)
    inner = (u.unsqueeze(0) - tvs) @ tvs.transpose(1, 2)
    return (inner.pow(2) / l2[:, None, None]).sum()


def ref_wudi(tvs, lr, steps):
    u = torch.nn.Parameter(tvs.sum(0).clone())
    opt = torch.optim.Adam([u], lr=lr, weight_decay=0)
    for _ in range(steps):
        loss = ref_loss(u, tvs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return u.detach()


def test_gram_gradient_equals_autograd_of_reference_loss():
    tvs = _rand(0, 3, 16, 12)
    a, b = wudi_statistics(tvs)
    u = _rand(1, 16, 12).requires_grad_()
    ref_loss(u, tvs).backward()
    assert torch.allclose(2 * (u.detach() @ a - b), u.grad, atol=1e-10, rtol=1e-10)


def test_matches_reference_adam_loop():
    tvs = _rand(2, 3, 16, 12)
    ours = wudi_merge(tvs, lr=1e-3, steps=40)
    ref = ref_wudi(tvs, lr=1e-3, steps=40)
    assert torch.allclose(ours, ref, atol=1e-9, rtol=0)
    assert (ours - tvs.sum(0)).abs().max() > 1e-3  # it moved


def test_single_task_returns_task_vector():
    tvs = _rand(3, 1, 16, 12)
    out = get_method("wudi").merge(_inp("w", tvs))
    assert torch.equal(out, tvs[0])
    out = get_method("wudi", {"lr": 1e-2, "steps": 50}).merge(_inp("w", tvs))
    assert torch.equal(out, tvs[0])


def test_loss_does_not_increase():
    tvs = _rand(4, 4, 16, 12)
    recorded: list[float] = []
    wudi_merge(tvs, lr=1e-5, steps=300, losses=recorded)
    assert len(recorded) == 301
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(recorded, recorded[1:]))
    # the same through the reference loss at a few step counts
    direct = [float(ref_loss(wudi_merge(tvs, 1e-5, s), tvs)) for s in (0, 1, 10, 100, 300)]
    assert all(b < a for a, b in zip(direct, direct[1:])), direct


def test_larger_steps_approach_the_minimum():
    tvs = _rand(5, 3, 16, 12)
    a, b = wudi_statistics(tvs)
    u_star = torch.linalg.solve(a, b.T).T  # L is quadratic: minimiser B A^-1
    l0, lmin = float(ref_loss(tvs.sum(0), tvs)), float(ref_loss(u_star, tvs))
    lend = float(ref_loss(wudi_merge(tvs, 1e-2, 2000), tvs))
    assert lend - lmin < 0.02 * (l0 - lmin), (l0, lend, lmin)


def test_vectors_and_embeddings_take_the_mean_and_batching_agrees():
    # FusionBench's wudi_merging (fusion_bench/method/wudi/wudi.py, lines 55-56): tensors it does not
    # optimise (non-2-D, excluded keys) get sum_t U_t / T, i.e. merged = W_pre + mean_t U_t
    m = get_method("wudi", {"lr": 1e-3, "steps": 20})
    v, e, x, y = _rand(6, 3, 12), _rand(7, 3, 30, 8), _rand(8, 3, 16, 12), _rand(9, 3, 16, 12)
    out = m.merge_unit([_inp("v", v, "vector"), _inp("e", e, "embedding"), _inp("x", x), _inp("y", y)])
    assert torch.allclose(out["v"], (v[0] + v[1] + v[2]) / 3, rtol=0, atol=1e-15)
    assert torch.allclose(out["e"], (e[0] + e[1] + e[2]) / 3, rtol=0, atol=1e-15)
    assert not torch.allclose(out["v"], v.sum(0))
    assert torch.allclose(out["x"], wudi_merge(x, 1e-3, 20), atol=1e-12)
    assert torch.allclose(out["y"], ref_wudi(y, 1e-3, 20), atol=1e-9)
