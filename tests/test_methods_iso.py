"""Iso-C / Iso-CTS: flat spectra, f = 1 equals Iso-C, T = 1, and a loop-by-loop float64 reference."""
from __future__ import annotations

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.methods import get_method
from bmmstream.methods.iso import iso_cts_sizes
from bmmstream.methods.registry import ModuleInput
from bmmstream.plan.layout import ModuleSpec


def _inp(name: str, deltas: torch.Tensor, kind: str = "linear") -> ModuleInput:
    shape = tuple(deltas.shape[1:])
    return ModuleInput(ModuleSpec(name, shape, kind, "other", 0, 0, 1), torch.zeros(shape, dtype=deltas.dtype), deltas)


def _rand(seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _polar_ref(x):
    w, q = torch.linalg.eigh(x.T @ x)
    return x @ (q @ torch.diag(w.rsqrt()) @ q.T)


def _iso_cts_ref(tvs, f):
    # the reference's steps, one task at a time
    T = len(tvs)
    m, n = tvs[0].shape
    r = min(m, n)
    common = int(r * f)
    common = r - round((r - common) / T) * T
    per = (r - common) // T
    u, s, vh = torch.linalg.svd(sum(tvs), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vh[:common]
    U, S, V = [], [], []
    for tv in tvs:
        resid = tv - uc @ uc.T @ tv
        ut, st, vt = torch.linalg.svd(resid, full_matrices=False)
        U.append(ut[:, :per]), S.append(st[:per]), V.append(vt[:per])
    U, S, V = torch.cat(U + [uc], 1), torch.cat(S + [sc]), torch.cat(V + [vc], 0)
    return _polar_ref(U) @ (S.mean() * _polar_ref(V.T).T)


@pytest.mark.parametrize("shape", [(16, 12), (12, 16)])
def test_iso_c_flat_spectrum_and_definition(shape):
    d = _rand(0, 3, *shape)
    out = get_method("iso_c", {"alpha": 1.5}).merge(_inp("w", d))
    s_sum = torch.linalg.svdvals(d.sum(0))
    s_out = torch.linalg.svdvals(out)
    assert torch.allclose(s_out, torch.full_like(s_out, 1.5 * float(s_sum.mean())), rtol=1e-12, atol=0)
    u, s, vh = torch.linalg.svd(d.sum(0), full_matrices=False)
    assert torch.allclose(out, 1.5 * s.mean() * u @ vh, atol=1e-12)


def test_iso_c_single_task_is_its_flat_spectrum_version():
    d = _rand(1, 1, 16, 12)
    out = get_method("iso_c").merge(_inp("w", d))
    u, s, vh = torch.linalg.svd(d[0], full_matrices=False)
    assert torch.allclose(out, s.mean() * u @ vh, atol=1e-12)
    # when the task's spectrum is already flat, T = 1 returns the task vector itself
    flat = (u @ vh).unsqueeze(0) * 0.3
    assert torch.allclose(get_method("iso_c").merge(_inp("w", flat)), flat[0], atol=1e-12)


@pytest.mark.parametrize("shape,f", [((16, 12), 0.8), ((12, 16), 0.5), ((16, 12), 0.0)])
def test_iso_cts_flat_spectrum_and_reference(shape, f):
    d = _rand(2, 3, *shape)
    out = get_method("iso_cts", {"common_space_fraction": f}).merge(_inp("w", d))
    s_out = torch.linalg.svdvals(out)
    assert torch.allclose(s_out, s_out[:1].expand_as(s_out), rtol=1e-10, atol=0)
    assert torch.allclose(out, _iso_cts_ref(list(d), f), atol=1e-10, rtol=0)
    # it really differs from Iso-C when there is a task-specific part
    if iso_cts_sizes(min(shape), 3, f)[1] > 0:
        assert not torch.allclose(out, get_method("iso_c").merge(_inp("w", d)), atol=1e-3)


def test_iso_cts_with_f_one_equals_iso_c():
    d = _rand(3, 4, 16, 12)
    a = get_method("iso_cts", {"common_space_fraction": 1.0, "alpha": 1.2}).merge(_inp("w", d))
    b = get_method("iso_c", {"alpha": 1.2}).merge(_inp("w", d))
    assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_sizes_follow_reference_rounding():
    assert iso_cts_sizes(12, 3, 0.8) == (9, 1)  # int(9.6)=9, round(3/3)=1 -> 12-3
    assert iso_cts_sizes(12, 5, 0.8) == (7, 1)  # int(9.6)=9, round(0.6)=1 -> 12-5
    assert iso_cts_sizes(4096, 8, 0.8) == (3280, 102)
    assert iso_cts_sizes(12, 3, 1.0) == (12, 0)
    assert iso_cts_sizes(12, 5, 0.0) == (2, 2)  # never more task dims than r // T


def test_other_kinds_mean_and_batched_unit():
    m = get_method("iso_cts", {"alpha": 0.5})
    v, e, a, b = _rand(4, 2, 12), _rand(5, 2, 30, 8), _rand(6, 2, 16, 12), _rand(7, 2, 16, 12)
    out = m.merge_unit([_inp("v", v, "vector"), _inp("e", e, "embedding"), _inp("a", a), _inp("b", b)])
    assert torch.allclose(out["v"], 0.5 * v.mean(0)) and torch.allclose(out["e"], 0.5 * e.mean(0))
    assert torch.allclose(out["a"], 0.5 * _iso_cts_ref(list(a), 0.8), atol=1e-10)
    assert torch.allclose(out["b"], 0.5 * _iso_cts_ref(list(b), 0.8), atol=1e-10)
    with pytest.raises(BmmError, match="common_space_fraction must be in"):
        get_method("iso_cts", {"common_space_fraction": 1.5})


_REAL_SVD = torch.linalg.svd


def _failing_svd(fails):
    """torch.linalg.svd that raises LAPACK's non-convergence error where fails(matrix) holds,
    the way float32 gesdd does on some real stacked bases (SmolLM2, see methods/tsv.svd)."""
    def fake(x, full_matrices=True):
        mats = x.reshape(-1, *x.shape[-2:])
        if any(fails(m) for m in mats):
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return _REAL_SVD(x, full_matrices=full_matrices)
    return fake


def test_svd_failure_redoes_only_that_matrix_in_float64(monkeypatch):
    from bmmstream.methods.tsv import svd

    x = _rand(8, 3, 6, 5).float()
    x[1, 0, 0] = 7.0  # the one LAPACK "cannot" do in float32
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd(lambda m: m.dtype == torch.float32 and m[0, 0] == 7.0))
    u, s, vh = svd(x)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    for i in (0, 2):  # batch-mates keep their own float32 result, bit for bit
        for got, want in zip((u[i], s[i], vh[i]), _REAL_SVD(x[i], full_matrices=False)):
            assert torch.equal(got, want)
    for got, want in zip((u[1], s[1], vh[1]), _REAL_SVD(x[1].double(), full_matrices=False)):
        assert torch.equal(got, want.float())


def test_iso_cts_survives_float32_svd_failure_and_names_tensor_when_float64_fails(monkeypatch):
    m = get_method("iso_cts", {"alpha": 1.0})
    a = _rand(9, 3, 16, 12)
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd(lambda mat: mat.dtype == torch.float32))
    out = m.merge_unit([_inp("layers.0.q.weight", a.float())])["layers.0.q.weight"]
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), _iso_cts_ref(list(a), 0.8), atol=1e-5)
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd(lambda mat: True))
    with pytest.raises(BmmError) as e:
        m.merge_unit([_inp("layers.0.q.weight", a.float())])
    assert str(e.value) == ("tensor(s) layers.0.q.weight: SVD did not converge even in float64 "
                            "(linalg.svd: The algorithm failed to converge)")
