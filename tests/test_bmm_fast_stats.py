"""Issue 17: BMM statistics by SYRK + the cheaper association, the in-place solve, the transient
statistics store, module-by-module merging: same results as dense float64 references."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bmmstream
from bmmstream.methods.registry import ModuleInput, get_method
from bmmstream.plan.layout import ModuleSpec
from bmmstream.solve.closed_form import bmm_solve, dense_reference, lam_from_rho
from bmmstream.statistics.grams import (
    c_via_outer, datafree_flops, datafree_grams, datafree_stats, fill_upper_, syrk_lower_, task_weights,
)
from bmmstream.statistics.store import StatsStore


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _dense(D: torch.Tensor, normalize: bool):
    D = D.double()
    w = task_weights(D, torch.float64) if normalize else torch.ones(D.shape[0], dtype=torch.float64)
    G = sum(w[t] * D[t].T @ D[t] for t in range(D.shape[0]))
    C = sum(w[t] * D[t] @ D[t].T @ D[t] for t in range(D.shape[0]))
    return G, C


@pytest.fixture(params=["scipy-blas", "torch-gemm"])
def stats_backend(request, monkeypatch):
    """CPU statistics through scipy's SYRK/SYMM and through torch's blocked GEMMs (the path taken when
    scipy's OpenBLAS was loaded before bmmstream and keeps its threads spinning: blas_env)."""
    import bmmstream.statistics.blas_env as be
    import bmmstream.statistics.grams as gr

    monkeypatch.setattr(be, "scipy_blas_fits", lambda: request.param == "scipy-blas")
    calls = []
    real = gr._scipy_syrk
    monkeypatch.setattr(gr, "_scipy_syrk", lambda dtype: calls.append(dtype) or real(dtype))
    return request.param, calls


@pytest.mark.parametrize("shape", [(4, 30, 20), (4, 10, 40), (3, 9, 9), (2, 1, 5)])
@pytest.mark.parametrize("dtype,sdt,tol", [(torch.float32, torch.float64, 1e-14), (torch.float64, None, 1e-14),
                                           (torch.float32, None, 1e-6)])
@pytest.mark.parametrize("normalize", [False, True])
def test_datafree_stats_equal_dense_float64(shape, dtype, sdt, tol, normalize, stats_backend):
    g = torch.Generator().manual_seed(sum(shape))
    D = torch.randn(*shape, generator=g, dtype=dtype)
    D[0] *= 5.0  # unequal norms: the task weights matter
    G, C = datafree_stats(D, normalize, sdt)
    backend, scipy_calls = stats_backend
    assert bool(scipy_calls) == (backend == "scipy-blas")  # the path the fixture chose is the one that ran
    Gr, Cr = _dense(D, normalize)
    assert G.dtype == (sdt or dtype) and C.dtype == (sdt or dtype)
    assert torch.equal(G, G.T)  # both triangles, exactly mirrored
    assert _rel(G, Gr) < tol and _rel(C, Cr) < tol


def test_both_associations_are_used_and_counted():
    assert c_via_outer(10, 40) and not c_via_outer(30, 20) and not c_via_outer(9, 9)
    # Llama-3.1-8B down_proj (4096 x 14336) takes (U U^T) U, gate_proj (14336 x 4096) U (U^T U)
    assert c_via_outer(4096, 14336) and not c_via_outer(14336, 4096)
    assert datafree_flops(30, 20, 4) == 4 * 3 * 30 * 20**2
    assert datafree_flops(10, 40, 4) == 4 * (10 * 40**2 + 40 * 10**2 + 2 * 10**2 * 40)


def test_zero_task_and_non_contiguous_deltas():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(3, 40, 12, generator=g, dtype=torch.float64)[:, ::2]  # rows strided: not contiguous
    D[1] = 0.0
    for normalize in (False, True):
        G, C = datafree_stats(D, normalize)
        Gr, Cr = _dense(D, normalize)
        assert _rel(G, Gr) < 1e-14 and _rel(C, Cr) < 1e-14


def test_datafree_grams_per_task():
    D = torch.randn(3, 17, 11, dtype=torch.float32)
    Gt = datafree_grams(D, torch.float64)
    ref = torch.stack([d.double().T @ d.double() for d in D])
    assert Gt.dtype == torch.float64 and _rel(Gt, ref) < 1e-15
    assert torch.equal(Gt, Gt.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_syrk_lower_in_place_both_layouts(dtype, stats_backend):
    """CPU float32/64: scipy's SYRK writes into `out` itself; other dtypes (and stats_backend torch-gemm):
    the blocked torch path."""
    A = torch.randn(23, 9).to(dtype)
    for X in (A, A.T.contiguous().T):  # C- and F-contiguous views of the same values
        out = torch.full((9, 9), 7.0, dtype=dtype)
        ptr = out.data_ptr()
        r = syrk_lower_(X, out, alpha=2.0)
        assert r is out and out.data_ptr() == ptr
        ref = 2.0 * A.double().T @ A.double()
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        assert _rel(out.double().tril(), ref.tril()) < tol
        fill_upper_(out)
        assert torch.equal(out, out.T) and _rel(out.double(), ref) < tol
    # beta = 1 accumulates into the lower triangle
    out = torch.zeros(9, 9, dtype=dtype)
    syrk_lower_(A, out)
    syrk_lower_(A, out, beta=1.0)
    assert _rel(out.double().tril(), (2.0 * A.double().T @ A.double()).tril()) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_fill_upper_blocked(monkeypatch):
    import bmmstream.statistics.grams as gr

    monkeypatch.setattr(gr, "FILL_BLOCK", 4)  # several blocks, a ragged last one
    S = torch.randn(11, 11, dtype=torch.float64)
    L = S.tril()
    fill_upper_(S)
    assert torch.equal(S, L + L.tril(-1).T)


def test_openblas_threads_sleep_unless_scipy_was_loaded_first():
    """blas_env: bmmstream sets OPENBLAS_THREAD_TIMEOUT before scipy's BLAS loads (so its spinning
    threads do not slow the MKL solve), keeps a user's value, and avoids scipy's BLAS for the
    statistics when scipy.linalg was loaded before it (the setting cannot take effect then)."""
    import os
    import subprocess
    import sys

    probe = "import os; from bmmstream.statistics import blas_env; print(os.environ['OPENBLAS_THREAD_TIMEOUT'], blas_env.scipy_blas_fits())"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}

    root = Path(__file__).resolve().parents[1]

    def run(code, **extra):
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                              check=True, cwd=root).stdout.split()

    assert run(probe) == ["4", "True"]
    assert run("import scipy.linalg; " + probe) == ["4", "False"]
    assert run("import scipy.linalg; " + probe, OPENBLAS_THREAD_TIMEOUT="30") == ["30", "True"]


def _case(d_out=12, d_in=20, T=3, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.stack([torch.randn(d_out, rank, generator=g, dtype=torch.float64)
                     @ torch.randn(rank, d_in, generator=g, dtype=torch.float64) for _ in range(T)])
    G, C = datafree_stats(D)
    return D, G, C, D.mean(0)


@pytest.fixture(params=["torch-lapack", "scipy"])
def lapack_backend(request, monkeypatch):
    """The in-place solve through torch's own LAPACK (ctypes) and through scipy's (the fallback)."""
    import bmmstream.solve.closed_form as cf

    if request.param == "scipy":
        monkeypatch.setattr(cf, "_lapack_table", lambda: {})
    else:
        assert cf._torch_lapack(torch.float64) is not None  # this torch exports potrf/potrs
    return request.param


@pytest.mark.parametrize("rho,dtype", [(1e-2, torch.float64), (1e-6, torch.float64), (1e-2, torch.float32)])
def test_in_place_solve_equals_batched_and_dense(rho, dtype, lapack_backend):
    """Within the conditioning (~1/rho on these rank-2 statistics) times the dtype's epsilon."""
    _, G, C, U0 = _case()
    G, C, U0 = G.to(dtype), C.to(dtype), U0.to(dtype)
    lam = lam_from_rho(G[None], rho)
    ref, d_ref = bmm_solve(G[None], C[None], U0[None], lam, dtype=dtype)
    Gc, Cc = G.clone()[None], C.clone()[None]
    U, d = bmm_solve(Gc, Cc, U0[None], lam, dtype=dtype, overwrite=True)
    assert d == d_ref == []
    tol = (1e-14 if dtype == torch.float64 else 1e-6) / rho
    assert _rel(U[0], ref[0]) < tol
    assert _rel(U[0], dense_reference(G, C, U0, float(lam[0]))) < tol
    assert U.dtype == dtype


def test_in_place_solve_damps_like_the_batched_one(lapack_backend):
    """lam = 0 on a rank-deficient G: the factorisation fails; the retried lam and count are the same,
    and the upper triangle restored from the untouched lower one gives the same answer."""
    _, G, C, U0 = _case(rank=1)
    lam = torch.zeros(1, dtype=torch.float64)
    ref, d_ref = bmm_solve(G[None], C[None], U0[None], lam)
    U, d = bmm_solve(G.clone()[None], C.clone()[None], U0[None], lam, overwrite=True)
    assert len(d_ref) == len(d) == 1
    assert d[0].added == d_ref[0].added and d[0].attempts == d_ref[0].attempts
    assert _rel(U[0], ref[0]) < 1e-6  # conditioning ~ 1/1.5e-8 (the first damping) times 1e-16


def test_in_place_solve_zero_statistics_give_the_anchor():
    U0 = torch.randn(1, 5, 4, dtype=torch.float64)
    U, d = bmm_solve(torch.zeros(1, 4, 4, dtype=torch.float64), torch.zeros(1, 5, 4, dtype=torch.float64), U0,
                     torch.zeros(1, dtype=torch.float64), overwrite=True)
    assert torch.equal(U, U0) and d == []


def _inp(name, D, group="attn_in", kind="linear"):
    spec = ModuleSpec(name=name, shape=tuple(D.shape[1:]), kind=kind, group=group, layer=0, block=0, unit=1)
    return ModuleInput(spec, torch.zeros(D.shape[1:], dtype=D.dtype), D)


def test_merge_unit_is_the_union_of_single_module_merges():
    """merges_by_module: a unit merged at once equals its modules merged one at a time, bit for bit."""
    g = torch.Generator().manual_seed(3)
    D = {n: torch.randn(3, *s, generator=g) * 1e-2 for n, s in (("q", (16, 16)), ("k", (8, 16)), ("v", (8, 16)),
                                                               ("down", (16, 40)))}
    m = get_method("bmm", {"anchor": "ties", "anchor_parameters": {"density": 0.5, "threshold": "per_tensor"}})
    assert m.merges_by_module
    whole = m.merge_unit([_inp(n, d) for n, d in D.items()] + [_inp("norm", torch.randn(3, 16), kind="vector")])
    for n, d in D.items():
        one = get_method("bmm", {"anchor": "ties", "anchor_parameters": {"density": 0.5, "threshold": "per_tensor"}})
        assert torch.equal(one.merge_unit([_inp(n, d)])[n], whole[n]), n
    # statistics handed in are consumed (popped) and give the same result as computed inside
    inp = _inp("q", D["q"])
    st = m.module_statistics(inp)
    given = {"q": st}
    assert torch.equal(m.merge_unit([inp], given)["q"], whole["q"]) and given == {}


def test_transient_store_keeps_nothing(tmp_path):
    s = StatsStore.for_run(tmp_path / "stats.zarr", needs_grams=False, keep_statistics=False, search=False)
    assert s.transient and not (tmp_path / "stats.zarr").exists()
    s.put("m", {"G": torch.ones(2, 2)})
    assert not s.has("m") and s.keys() == []
    s.drop("m")
    with pytest.raises(KeyError):
        s.get("m")
    for kw in ({"needs_grams": True}, {"keep_statistics": True}, {"search": True}):
        args = {"needs_grams": False, "keep_statistics": False, "search": False, **kw}
        z = StatsStore.for_run(tmp_path / f"z{len(kw)}{sorted(kw)[0]}.zarr", **args)
        assert not z.transient
        z.put("m", {"G": torch.ones(2, 2)})
        assert z.has("m") and torch.equal(z.get("m")["G"], torch.ones(2, 2))


def test_merge_without_keep_uses_no_zarr_and_writes_the_same_bytes(tiny_llama_suite, tmp_path, monkeypatch):
    cfg = {"base_model": str(tiny_llama_suite.base), "models": [{"model": str(e)} for e in tiny_llama_suite.experts],
           "merge_method": "bmm", "parameters": {"anchor": "task_arithmetic", "rho": 0.01, "keep_statistics": True},
           "dtype": "float32", "out_dtype": "float32"}
    kept = bmmstream.merge(cfg, out=tmp_path / "kept", run_dir=tmp_path / "kept-run", device="cpu", progress=False)
    import zarr

    def no_zarr(*a, **kw):
        raise AssertionError("a merge that reads no statistics back opened a Zarr store")

    monkeypatch.setattr(zarr, "open_group", no_zarr)
    cfg["parameters"]["keep_statistics"] = False
    out = bmmstream.merge(cfg, out=tmp_path / "out", run_dir=tmp_path / "run", device="cpu", progress=False)
    files = sorted(p.name for p in kept.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in out.glob("*.safetensors"))
    for f in files:
        assert (out / f).read_bytes() == (kept / f).read_bytes(), f
