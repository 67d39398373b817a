"""The BMM closed form against dense float64 references and its limits."""
import pytest
import torch

from bmmstream.methods.registry import ModuleInput, get_method
from bmmstream.plan.layout import ModuleSpec
from bmmstream.solve.closed_form import bmm_solve, dense_reference, lam_from_rho
from bmmstream.statistics.grams import combine, datafree_grams, datafree_stats, hybrid_grams


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _tasks(T=3, d_out=12, d_in=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, d_out, d_in, generator=g, dtype=dtype)


def test_datafree_stats_match_definition():
    U = _tasks()
    G, C = datafree_stats(U)
    G_ref = sum(u.T @ u for u in U)
    C_ref = sum(u @ u.T @ u for u in U)
    assert _rel(G, G_ref) < 1e-14 and _rel(C, C_ref) < 1e-14
    G2, C2 = combine(U, datafree_grams(U))
    assert _rel(G2, G_ref) < 1e-14 and _rel(C2, C_ref) < 1e-14


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_batched_solve_equals_dense_reference(dtype, tol):
    Us = [_tasks(seed=s, dtype=dtype) for s in range(4)]
    U0 = torch.stack([u.sum(0) * 0.3 for u in Us])
    G, C = map(torch.stack, zip(*[datafree_stats(u) for u in Us]))
    lam = lam_from_rho(G, torch.tensor([0.01, 0.1, 1.0, 0.0], dtype=dtype))
    U, damped = bmm_solve(G, C, U0, lam)
    assert damped == []
    for i in range(4):
        ref = dense_reference(G[i], C[i], U0[i], lam[i])
        assert _rel(U[i], ref) < tol


def test_lambda_to_infinity_gives_anchor():
    U = _tasks()
    G, C = datafree_stats(U)
    U0 = 0.3 * U.sum(0)
    out, _ = bmm_solve(G[None], C[None], U0[None], torch.tensor([1e12], dtype=torch.float64))
    assert _rel(out[0], U0) < 1e-9


def test_single_task_with_its_own_anchor_is_that_task():
    U = _tasks(T=1)
    G, C = datafree_stats(U)
    for lam in (0.0, 1e-3, 1.0, 1e3):
        out, _ = bmm_solve(G[None], C[None], U[0][None], torch.tensor([lam], dtype=torch.float64))
        assert _rel(out[0], U[0]) < 1e-8, lam


def test_zero_lambda_data_assisted_is_regmean():
    T, d_out, d_in = 3, 7, 5
    g = torch.Generator().manual_seed(1)
    W_pre = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(T, d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(T, d_in, 40, generator=g, dtype=torch.float64)
    grams = X @ X.transpose(1, 2)
    G, C = combine(W - W_pre, grams)
    U, _ = bmm_solve(G[None], C[None], torch.zeros(1, d_out, d_in, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    regmean = torch.linalg.solve(grams.sum(0), sum(W[t] @ grams[t] for t in range(T)).T).T
    assert _rel(W_pre + U[0], regmean) < 1e-10


def test_failed_cholesky_is_damped_for_that_module_only():
    good = _tasks(T=3, d_out=12, d_in=9, seed=2)
    bad = _tasks(T=1, d_out=2, d_in=9, seed=3)  # rank 2 Gram in 9 dims
    bad = torch.cat([bad, torch.zeros(2, 2, 9, dtype=torch.float64)])
    bad = torch.nn.functional.pad(bad, (0, 0, 0, 10))
    G, C = map(torch.stack, zip(datafree_stats(good), datafree_stats(bad)))
    U0 = torch.zeros_like(C)
    U, damped = bmm_solve(G, C, U0, torch.zeros(2, dtype=torch.float64))
    assert [d.index for d in damped] == [1]
    assert damped[0].added > 0
    ref = dense_reference(G[0], C[0], U0[0], 0.0)
    assert _rel(U[0], ref) < 1e-8
    assert torch.isfinite(U[1]).all()


def test_hybrid_limits():
    """Plain convex combination (issue 11): eps = 1 is exactly the data-assisted Grams, eps = 0
    exactly the data-free ones; `rescale` (bmm's hybrid_rescale) first scales each side to unit
    mean eigenvalue, the rule that used to be the default."""
    U = _tasks()
    X = torch.randn(3, 9, 30, dtype=torch.float64)
    few = X @ X.transpose(1, 2)
    df = datafree_grams(U)
    assert torch.equal(hybrid_grams(U, few, 1.0), few)
    assert torch.equal(hybrid_grams(U, few, 0.0), df)
    assert _rel(hybrid_grams(U, few, 0.3), 0.3 * few + 0.7 * df) < 1e-15
    h1 = hybrid_grams(U, few, 1.0, rescale=True)
    h0 = hybrid_grams(U, few, 0.0, rescale=True)
    for t in range(3):
        assert _rel(h1[t], few[t] / (few[t].trace() / 9)) < 1e-14
        assert _rel(h0[t], df[t] / (df[t].trace() / 9)) < 1e-14
    with pytest.raises(ValueError, match="eps must be in"):
        hybrid_grams(U, few, 1.5)


def _inp(name, deltas, group="attn_in", block=0):
    spec = ModuleSpec(name, tuple(deltas.shape[1:]), "linear", group, 0, block, 1)
    return ModuleInput(spec, torch.zeros(deltas.shape[1:], dtype=deltas.dtype), deltas)


def test_bmm_method_per_group_rho_and_block_scale():
    U = _tasks(T=3, d_out=6, d_in=6)
    V = _tasks(T=3, d_out=6, d_in=6, seed=5)
    m = get_method("bmm", {"rho": {"attn_in": 0.05, "mlp_out": 2.0}, "scale": [1.0, 1.2], "blocks": 2,
                           "anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.5}})
    out = m.merge_unit([_inp("a", U, "attn_in", 0), _inp("b", V, "mlp_out", 1)])
    for name, D, rho, s in (("a", U, 0.05, 1.0), ("b", V, 2.0, 1.2)):
        G, C = datafree_stats(D)
        lam = rho * G.trace() / 6
        ref = dense_reference(G, C, 0.5 * D.sum(0), lam)
        assert _rel(out[name], s * ref) < 1e-10
    assert {r["module"] for r in m.solve_records} == {"a", "b"}


def test_bmm_parameter_errors_are_one_line():
    from bmmstream.errors import BmmError

    with pytest.raises(BmmError, match=r"^bmm: parameter 'rho' has unknown group\(s\) \['attn'\]"):
        get_method("bmm", {"rho": {"attn": 1.0}})
    with pytest.raises(BmmError, match=r"^bmm: scale lists 3 values but blocks is 2$"):
        get_method("bmm", {"scale": [1, 1, 1], "blocks": 2})
    with pytest.raises(BmmError, match=r"^unknown merge method 'nope'"):
        get_method("bmm", {"anchor": "nope"})


def test_bmm_rho_per_block_and_group():
    U = _tasks(T=2, d_out=5, d_in=5, seed=7)
    m = get_method("bmm", {"rho": [{"attn_in": 0.1}, {"attn_in": 3.0}], "blocks": 2, "anchor": "pretrained"})
    out = m.merge_unit([_inp("a", U, "attn_in", 0), _inp("b", U, "attn_in", 1)])
    G, C = datafree_stats(U)
    for name, rho in (("a", 0.1), ("b", 3.0)):
        ref = dense_reference(G, C, torch.zeros(5, 5, dtype=torch.float64), rho * G.trace() / 5)
        assert _rel(out[name], ref) < 1e-10
    from bmmstream.errors import BmmError

    with pytest.raises(BmmError, match=r"^bmm: rho lists 1 values but blocks is 2$"):
        get_method("bmm", {"rho": [0.1], "blocks": 2})


def test_task_normalised_datafree_stats():
    U = _tasks(T=3, d_out=8, d_in=6, seed=11)
    U = U * torch.tensor([1.0, 0.2, 3.0], dtype=torch.float64)[:, None, None]
    G, C = datafree_stats(U, normalize_tasks=True)
    sq = torch.tensor([float(u.norm() ** 2) for u in U], dtype=torch.float64)
    w = sq.mean() / sq
    assert _rel(G, sum(w[t] * U[t].T @ U[t] for t in range(3))) < 1e-13
    assert _rel(C, sum(w[t] * U[t] @ U[t].T @ U[t] for t in range(3))) < 1e-13
    # every task's weighted Gram has the same trace
    tr = [float((w[t] * U[t].T @ U[t]).trace()) for t in range(3)]
    assert max(tr) / min(tr) < 1 + 1e-12
    # equal norms: identical to the raw sum; T = 1: its own task vector at any lam
    V = U / U.flatten(1).norm(dim=1)[:, None, None]
    for a, b in zip(datafree_stats(V, True), datafree_stats(V)):
        assert _rel(a, b) < 1e-13
    G1, C1 = datafree_stats(U[:1], True)
    out, _ = bmm_solve(G1[None], C1[None], U[:1], torch.tensor([0.5], dtype=torch.float64))
    assert _rel(out[0], U[0]) < 1e-10
