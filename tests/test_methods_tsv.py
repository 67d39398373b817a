"""TSV-Merge: T = 1 identity, orthogonal tasks sum, and equality with a loop-by-loop float64 reference."""
from __future__ import annotations

import torch

from bmmstream.methods import get_method
from bmmstream.methods.registry import ModuleInput
from bmmstream.plan.layout import ModuleSpec


def _inp(name: str, deltas: torch.Tensor, kind: str = "linear") -> ModuleInput:
    shape = tuple(deltas.shape[1:])
    return ModuleInput(ModuleSpec(name, shape, kind, "other", 0, 0, 1), torch.zeros(shape, dtype=deltas.dtype), deltas)


def _rand(seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _polar_ref(x):
    # X (X^T X)^{-1/2}: an independent route to the orthogonal polar factor (full column rank x)
    w, q = torch.linalg.eigh(x.T @ x)
    return x @ (q @ torch.diag(w.rsqrt()) @ q.T)


def _tsv_ref(tvs):
    T = len(tvs)
    m, n = tvs[0].shape
    k = min(m, n) // T
    us, ss, vs = [], [], []
    for tv in tvs:
        u, s, vh = torch.linalg.svd(tv, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k, :])
    U, S, V = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)
    return _polar_ref(U) @ torch.diag(S) @ _polar_ref(V.T).T


def test_single_task_returns_task_vector():
    for shape in ((16, 12), (12, 16)):
        d = _rand(0, 1, *shape)
        out = get_method("tsv").merge(_inp("w", d))
        assert torch.allclose(out, d[0], atol=1e-12, rtol=0)


def test_orthogonal_low_rank_tasks_sum():
    # 3 tasks of rank 4 = floor(12 / 3) on mutually orthogonal column and row spaces
    q_left, _ = torch.linalg.qr(_rand(1, 16, 16))
    q_right, _ = torch.linalg.qr(_rand(2, 12, 12))
    tvs = []
    for t in range(3):
        a = q_left[:, 4 * t : 4 * t + 4]
        b = q_right[:, 4 * t : 4 * t + 4]
        tvs.append(a @ torch.diag(torch.rand(4, dtype=torch.float64) + 0.5) @ b.T)
    d = torch.stack(tvs)
    out = get_method("tsv").merge(_inp("w", d))
    assert torch.allclose(out, d.sum(0), atol=1e-12, rtol=0)


def test_matches_reference_on_generic_tasks():
    d = _rand(3, 3, 16, 12)
    out = get_method("tsv", {"alpha": 0.7}).merge(_inp("w", d))
    ref = 0.7 * _tsv_ref(list(d))
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)
    assert not torch.allclose(out, 0.7 * d.sum(0), atol=1e-2)  # interference really is removed


def test_vectors_and_embeddings_take_the_mean_and_batching_is_exact():
    m = get_method("tsv", {"alpha": 2.0})
    v, e = _rand(4, 3, 12), _rand(5, 3, 20, 8)
    a, b, c = _rand(6, 3, 16, 12), _rand(7, 3, 16, 12), _rand(8, 3, 12, 16)
    inputs = [_inp("v", v, "vector"), _inp("e", e, "embedding"), _inp("a", a), _inp("b", b), _inp("c", c)]
    out = m.merge_unit(inputs)
    assert list(out) == ["v", "e", "a", "b", "c"]
    assert torch.allclose(out["v"], 2.0 * v.mean(0), atol=1e-15)
    assert torch.allclose(out["e"], 2.0 * e.mean(0), atol=1e-15)
    for name, d in (("a", a), ("b", b), ("c", c)):
        assert torch.allclose(out[name], 2.0 * _tsv_ref(list(d)), atol=1e-10, rtol=0)


def test_float32_and_bfloat16_inputs():
    d = _rand(9, 2, 16, 12)
    ref = _tsv_ref(list(d))
    out32 = get_method("tsv").merge(_inp("w", d.float()))
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), ref, atol=1e-4)
    out16 = get_method("tsv").merge(_inp("w", d.bfloat16()))
    assert out16.dtype == torch.bfloat16
    assert torch.allclose(out16.double(), ref, atol=0.1)
