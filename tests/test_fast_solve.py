import pytest
import torch

from bmmstream.solve.spectral import (
    eigen_factor,
    lam_from_rho,
    prepare,
    solve_dense,
    solve_eigen,
    solve_eigen_truncated,
    truncation_error,
    truncation_errors,
)


def _stats(batch, d_out, d_in, n, dtype, seed=0, rank=None):
    """Data-assisted-like statistics: G = X X^T, C = U X X^T with U a random task vector."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, d_in, n, generator=g, dtype=torch.float64)
    if rank is not None:
        X = torch.randn(batch, d_in, rank, generator=g, dtype=torch.float64) @ torch.randn(
            batch, rank, n, generator=g, dtype=torch.float64
        )
    G = X @ X.transpose(-1, -2) / n
    U = torch.randn(batch, d_out, d_in, generator=g, dtype=torch.float64)
    C = U @ G
    U0 = torch.randn(batch, d_out, d_in, generator=g, dtype=torch.float64)
    return G.to(dtype), C.to(dtype), U0.to(dtype)


def _reference(G, C, U0, lam):
    """Dense float64 solve of (G + lam I) U^T = (C + lam U0)^T."""
    G, C, U0 = G.double(), C.double(), U0.double()
    lam = torch.as_tensor(lam, dtype=torch.float64)
    lam = lam.reshape(lam.shape + (1, 1)) if lam.dim() else lam
    eye = torch.eye(G.shape[-1], dtype=torch.float64)
    return torch.linalg.solve(G + lam * eye, (C + lam * U0).transpose(-1, -2)).transpose(-1, -2)


def _rel(a, b):
    return (torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double())).max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_solve_eigen_matches_dense_reference(dtype, tol):
    G, C, U0 = _stats(3, 5, 8, 32, dtype)
    e, Q = eigen_factor(G)
    CQ, U0Q = C @ Q, U0 @ Q
    mean_e = G.double().diagonal(dim1=-2, dim2=-1).mean().item()
    for rho in (1e-3, 1e-2, 0.1, 1.0, 10.0):
        lam = rho * mean_e
        U = solve_eigen(CQ, U0Q, e, Q, lam)
        assert U.dtype == dtype and U.shape == C.shape
        assert _rel(U, _reference(G, C, U0, lam)) < tol


def test_truncated_form_with_full_rank_is_exact():
    G, C, U0 = _stats(2, 4, 6, 24, torch.float64, seed=1)
    st = prepare(G, C, U0, k=6)
    for lam in (1e-3, 0.5, 20.0):
        assert _rel(st.solve(lam), _reference(G, C, U0, lam)) < 1e-10


def test_per_module_lam_and_rho():
    G, C, U0 = _stats(3, 4, 6, 24, torch.float64, seed=2)
    st = prepare(G, C, U0)
    rho = torch.tensor([1e-3, 0.1, 1.0], dtype=torch.float64)
    lam = st.lam(rho)
    expected_lam = rho * G.diagonal(dim1=-2, dim2=-1).mean(-1)
    assert torch.allclose(lam, expected_lam, rtol=1e-12)
    assert torch.allclose(lam_from_rho(st.e, rho), expected_lam, rtol=1e-12)
    U = st.solve(lam)
    for i in range(3):
        assert _rel(U[i : i + 1], _reference(G[i : i + 1], C[i : i + 1], U0[i : i + 1], lam[i].item())) < 1e-10
    assert _rel(solve_dense(G, C, U0, lam), _reference(G, C, U0, lam)) < 1e-10


def test_large_lam_gives_anchor():
    G, C, U0 = _stats(2, 4, 6, 24, torch.float64, seed=3)
    st = prepare(G, C, U0)
    errs = [_rel(st.solve(lam), U0) for lam in (1e2, 1e4, 1e6, 1e8)]
    assert errs[-1] < 1e-7
    assert all(b < a for a, b in zip(errs, errs[1:]))  # converges monotonically, O(1/lam)
    st_k = prepare(G, C, U0, k=2)
    assert _rel(st_k.solve(1e10), U0) < 1e-8


def test_truncation_exact_for_low_rank_gram():
    # G of rank 3 in d_in = 10, C = U G lies in range(G): the top-3 truncation is exact.
    G, C, U0 = _stats(2, 5, 10, 40, torch.float64, seed=4, rank=3)
    for lam in (1e-4, 0.1, 10.0):
        err = truncation_error(G, C, U0, 3, lam)
        assert err.shape == (2,)
        assert err.max().item() < 1e-9
        U_k = prepare(G, C, U0, k=3).solve(lam)
        assert _rel(U_k, _reference(G, C, U0, lam)) < 1e-9
    # one eigenpair fewer than the rank is not exact
    assert truncation_error(G, C, U0, 2, 0.1).min().item() > 1e-3


def test_truncation_error_decreases_with_k():
    G, C, U0 = _stats(1, 6, 12, 48, torch.float64, seed=5)
    lam = 0.05 * G.diagonal(dim1=-2, dim2=-1).mean().item()
    errs = [truncation_error(G, C, U0, k, lam).item() for k in range(1, 13)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-12
    assert errs[0] > 1e-2


def test_truncated_functional_form():
    G, C, U0 = _stats(1, 3, 5, 20, torch.float64, seed=6)
    e, Q = eigen_factor(G)
    k = 5
    A = C @ Q[..., :k] - (U0 @ Q[..., :k]) * e[..., :k].unsqueeze(-2)
    U = solve_eigen_truncated(U0, A, e[..., :k], Q[..., :k], 0.3)
    assert _rel(U, _reference(G, C, U0, 0.3)) < 1e-10


def test_eigen_factor_descending_and_reconstructs():
    G, _, _ = _stats(2, 1, 7, 30, torch.float64, seed=7)
    e, Q = eigen_factor(G)
    assert (e[..., :-1] >= e[..., 1:]).all()
    assert torch.allclose(Q @ torch.diag_embed(e) @ Q.transpose(-1, -2), G, atol=1e-12)


def test_bad_rank_rejected():
    G, C, U0 = _stats(1, 2, 4, 8, torch.float64)
    with pytest.raises(ValueError, match=r"rank k=5 must be in \[1, 4\]"):
        prepare(G, C, U0, k=5)


def test_truncation_errors_table_matches_single_calls():
    G, C, U0 = _stats(2, 4, 8, 32, torch.float64, seed=8)
    ks, lams = [1, 3, 8], [1e-3, 0.5]
    table = truncation_errors(G, C, U0, ks, lams)
    assert table.shape == (2, 3, 2)
    for i, lam in enumerate(lams):
        for j, k in enumerate(ks):
            assert torch.allclose(table[i, j], truncation_error(G, C, U0, k, lam), rtol=1e-9, atol=1e-14)
    assert table[:, -1].max() < 1e-12


@pytest.mark.parametrize("rho", [1e-2, 1e-4, 1e-6])
def test_exact_prepare_of_low_rank_statistics_is_float64_accurate_in_float32(rho):
    """The exact re-solve uses the residual form U0 + A diag(1/(e+lam)) Q^T with A from a float64
    eigh (issue 11). As a search holds them: G, C float64 (the statistics' dtype), the anchor U0 in
    the float32 compute dtype, outside span(G) (rank 3): a trial is one float32 matmul and matches
    the float64 solve; lam is the written merge's, bit for bit."""
    from bmmstream.solve.closed_form import lam_from_rho as merge_lam

    G, C, U0 = _stats(2, 6, 24, 48, torch.float64, seed=9, rank=3)
    U0 = U0.float()
    st = prepare(G, C, U0)
    assert st.k is None and st.A.dtype == st.Q.dtype == torch.float32 and st.e.dtype == torch.float64
    lam = st.lam(rho)
    assert torch.equal(lam, merge_lam(G, rho))
    U = st.solve(lam)
    assert U.dtype == torch.float32
    assert _rel(U, _reference(G, C, U0, lam)) < 1e-5
