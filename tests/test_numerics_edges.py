"""BMM's numerical edge cases (issue 11) against dense float64 references, and its one-line refusals.

Low-rank (LoRA-like) float32 task vectors at small rho, in the merge and in a search trial; absolute
lam mappings that leave a group out; zero task vectors; the Cholesky retry; hybrid endpoints; the
limits lam -> inf (the anchor) and T = 1 with U0 = U_1 (that task vector)."""
from __future__ import annotations

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import ModuleInput, get_method
from bmmstream.plan.layout import ModuleSpec
from bmmstream.search.run import _apply, _Batch
from bmmstream.solve.closed_form import bmm_solve, dense_reference, lam_from_rho
from bmmstream.solve.spectral import prepare

D_OUT, D_IN, T = 48, 64, 3
TA = ("task_arithmetic", {"scale": 0.3})
TIES = ("ties", {"threshold": "per_tensor", "density": 0.2})  # not in the experts' span


def _lora(rank: int, seed: int, tasks: int = T) -> torch.Tensor:
    """float32 task vectors of exact rank `rank` (B A products, as LoRA-derived experts)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(tasks, D_OUT, rank, generator=g, dtype=torch.float64)
    A = torch.randn(tasks, rank, D_IN, generator=g, dtype=torch.float64)
    return (1e-3 * B @ A).float()


def _inp(name: str, deltas: torch.Tensor, group: str = "attn_in", grams=None) -> ModuleInput:
    spec = ModuleSpec(name, tuple(deltas.shape[1:]), "linear", group, 0, 0, 1)
    return ModuleInput(spec, torch.zeros(deltas.shape[1:], dtype=deltas.dtype), deltas, grams)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _stats64(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = deltas.double()
    return sum(u.T @ u for u in d), sum(u @ u.T @ u for u in d)


def _reference(deltas: torch.Tensor, anchor: tuple, rho: float) -> torch.Tensor:
    """Everything in float64 from the same (float32-valued) task vectors: anchor, G, C, lam, solve."""
    d = deltas.double()
    U0 = get_method(anchor[0], anchor[1]).merge_unit([_inp("m", d)])["m"]
    G, C = _stats64(d)
    return dense_reference(G, C, U0, rho * G.trace() / G.shape[0])


# -- defect 1: float32 on low-rank task vectors --------------------------------------------------
@pytest.mark.parametrize("anchor", [TA, TIES], ids=["ta", "ties"])
@pytest.mark.parametrize("rho", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_float32_merge_of_low_rank_experts_matches_float64(rank, rho, anchor):
    d = _lora(rank, seed=rank)
    m = get_method("bmm", {"anchor": anchor[0], "anchor_parameters": anchor[1], "rho": rho})
    out = m.merge_unit([_inp("m", d)])["m"]
    assert out.dtype == torch.float32
    assert _rel(out, _reference(d, anchor, rho)) < 1e-3
    assert "damping" not in m.solve_records[0]


@pytest.mark.parametrize("rho", [1e-4, 1e-6])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_search_trial_is_the_written_merge_on_low_rank_experts(rank, rho):
    """search/run.py's trial (spectral re-solve from the merge's own statistics) vs float64 and vs the merge."""
    d = _lora(rank, seed=100 + rank)
    m = get_method("bmm", {"anchor": TIES[0], "anchor_parameters": TIES[1], "rho": rho})
    inp = _inp("m", d)
    merged = m.merge_unit([inp])["m"]
    st = m.module_statistics(inp)
    U0 = m.anchor.merge_unit([inp])["m"]
    batch = _Batch(names=["m"], blocks=[0], groups=["attn_in"], W_pre=torch.zeros(1, D_OUT, D_IN),
                   spectral=prepare(st["G"][None], st["C"][None], U0[None]))
    params = {"m": torch.zeros(D_OUT, D_IN)}
    _apply({"blocks": [{"rho": {"attn_in": rho}, "scale": 1.0}]}, [batch], params, "rho", 0.5)
    assert _rel(params["m"], _reference(d, TIES, rho)) < 1e-3
    assert _rel(params["m"], merged) < 1e-5


# -- limits ----------------------------------------------------------------------------------------
def test_large_rho_gives_the_anchor_on_low_rank_float32():
    d = _lora(2, seed=7)
    m = get_method("bmm", {"anchor": TIES[0], "anchor_parameters": TIES[1], "rho": 1e12})
    U0 = m.anchor.merge_unit([_inp("m", d)])["m"]
    assert _rel(m.merge_unit([_inp("m", d)])["m"], U0) < 1e-6


@pytest.mark.parametrize("rho", [1e-2, 1e-6])
def test_single_task_with_its_own_anchor_is_that_task_float32(rho):
    d = _lora(1, seed=8, tasks=1)
    m = get_method("bmm", {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 1.0}, "rho": rho})
    assert _rel(m.merge_unit([_inp("m", d)])["m"], d[0]) < 1e-6


# -- defect 3: absolute lam per group --------------------------------------------------------------
def test_absolute_lam_mapping_missing_group_takes_default_rho():
    g = torch.Generator().manual_seed(3)
    U = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)  # G of rank 6 in 9 dims: singular
    V = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    m = get_method("bmm", {"lam": {"attn_in": 0.5}})
    out = m.merge_unit([_inp("pooler", U, group="other"), _inp("q", V)])
    G, C = _stats64(U)
    assert _rel(out["pooler"], dense_reference(G, C, 0.3 * U.sum(0), 0.01 * G.trace() / 9)) < 1e-10
    Gq, Cq = _stats64(V)
    assert _rel(out["q"], dense_reference(Gq, Cq, 0.3 * V.sum(0), 0.5)) < 1e-10
    rec = {r["module"]: r for r in m.solve_records}
    assert rec["pooler"]["lam_mode"] == "relative rho=0.01 (default: group 'other' not in lam)"
    assert rec["pooler"]["lam"] == pytest.approx(float(0.01 * G.trace() / 9), rel=1e-14)
    assert rec["q"]["lam_mode"] == "absolute" and rec["q"]["lam"] == 0.5
    assert "damping" not in rec["pooler"]
    # null, as a search's best point writes an unlisted group, is the same as missing
    m2 = get_method("bmm", {"lam": [{"attn_in": 0.5, "other": None}]})
    out2 = m2.merge_unit([_inp("pooler", U, group="other"), _inp("q", V)])
    assert all(torch.equal(out[k], out2[k]) for k in out)


def test_search_trial_with_lam_mapping_missing_group_matches_merge():
    d = _lora(3, seed=9)
    m = get_method("bmm", {"lam": {"attn_in": 1e-6}})
    inp = _inp("pooler", d, group="other")
    merged = m.merge_unit([inp])["pooler"]
    st = m.module_statistics(inp)
    U0 = m.anchor.merge_unit([inp])["pooler"]
    batch = _Batch(names=["pooler"], blocks=[0], groups=["other"], W_pre=torch.zeros(1, D_OUT, D_IN),
                   spectral=prepare(st["G"][None], st["C"][None], U0[None]))
    params = {"pooler": torch.zeros(D_OUT, D_IN)}
    _apply({"blocks": [{"lam": {"attn_in": 1e-6}, "scale": 1.0}]}, [batch], params, "lam", 0.5)
    assert _rel(params["pooler"], merged) < 1e-5


# -- defect 4: zero task vectors -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_task_vectors_return_the_anchor(dtype):
    U0 = torch.randn(2, 5, 4, dtype=dtype)
    G, C = torch.zeros(2, 4, 4, dtype=dtype), torch.zeros(2, 5, 4, dtype=dtype)
    U, damped = bmm_solve(G, C, U0, lam_from_rho(G, torch.tensor([0.01, 0.0], dtype=dtype)))
    assert torch.equal(U, U0) and U.dtype == dtype
    assert damped == []


# -- defect 5: the Cholesky retry stays on the formula (lam + delta, toward the anchor) ------------
def test_failed_cholesky_damps_toward_the_anchor():
    g = torch.Generator().manual_seed(4)
    U = torch.randn(1, 2, 9, generator=g, dtype=torch.float64)  # G of rank 2 in 9 dims
    G, C = _stats64(U)
    U0 = torch.randn(2, 9, generator=g, dtype=torch.float64)  # has a component outside span(G)
    out, damped = bmm_solve(G[None], C[None], U0[None], torch.zeros(1, dtype=torch.float64))
    assert [d.index for d in damped] == [0] and damped[0].added > 0
    assert _rel(out[0], dense_reference(G, C, U0, damped[0].added)) < 1e-6
    P = torch.eye(9, dtype=torch.float64) - torch.linalg.pinv(U[0]) @ U[0]  # projector onto null(G)
    assert _rel(out[0] @ P, U0 @ P) < 1e-6
    # through the method: lam 0 is damped, recorded, and the result is the formula at lam + damping
    m = get_method("bmm", {"lam": 0.0, "anchor": TIES[0], "anchor_parameters": TIES[1]})
    res = m.merge_unit([_inp("m", U)])["m"]
    rec = m.solve_records[0]
    assert rec["damping"] > 0 and rec["damping_attempts"] >= 1
    U0m = m.anchor.merge_unit([_inp("m", U)])["m"]
    assert _rel(res, dense_reference(G, C, U0m, rec["damping"])) < 1e-6


# -- defect 6: hybrid endpoints --------------------------------------------------------------------
def test_hybrid_endpoints_are_data_free_and_data_assisted():
    g = torch.Generator().manual_seed(5)
    d = _lora(4, seed=10)
    X = torch.randn(T, D_IN, 20, generator=g)
    grams = X @ X.transpose(1, 2) / 20
    inp = _inp("m", d, grams=grams)

    def stats(**p):
        return get_method("bmm", p).module_statistics(inp)

    h0, h1 = stats(statistics="hybrid", eps=0.0), stats(statistics="hybrid", eps=1.0)
    df, da = stats(statistics="data_free"), stats(statistics="data_assisted")
    for k in ("G", "C"):
        assert torch.equal(h0[k], df[k]) and torch.equal(h1[k], da[k])
    # the middle is the plain convex combination of the per-task Grams
    h = stats(statistics="hybrid", eps=0.25)
    d64, g64 = d.double(), grams.double()
    Gt = 0.25 * g64 + 0.75 * d64.transpose(1, 2) @ d64
    assert _rel(h["G"], Gt.sum(0)) < 1e-12 and _rel(h["C"], sum(d64[t] @ Gt[t] for t in range(T))) < 1e-12
    # hybrid_rescale: each side at unit mean eigenvalue first
    r = stats(statistics="hybrid", eps=0.0, hybrid_rescale=True)
    df_t = d64.transpose(1, 2) @ d64
    df_t = df_t / (df_t.diagonal(dim1=1, dim2=2).sum(-1) / D_IN)[:, None, None]
    assert _rel(r["G"], df_t.sum(0)) < 1e-12


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
def test_hybrid_search_trial_is_the_written_merge(eps, rescale):
    """search/run.py keeps the merge's statistics at eps = 1 and eps = 0 and mixes them per trial."""
    g = torch.Generator().manual_seed(6)
    d = _lora(4, seed=14)
    X = torch.randn(T, D_IN, 20, generator=g)
    inp = _inp("m", d, grams=X @ X.transpose(1, 2) / 20)
    m = get_method("bmm", {"statistics": "hybrid", "eps": eps, "hybrid_rescale": rescale, "rho": 1e-5})
    merged = m.merge_unit([inp])["m"]
    one, zero = m.module_statistics(inp, eps=1.0), m.module_statistics(inp, eps=0.0)
    U0 = m.anchor.merge_unit([inp])["m"]
    batch = _Batch(names=["m"], blocks=[0], groups=["attn_in"], W_pre=torch.zeros(1, D_OUT, D_IN),
                   ends=(one["G"][None], zero["G"][None], one["C"][None], zero["C"][None], U0[None]))
    params = {"m": torch.zeros(D_OUT, D_IN)}
    _apply({"blocks": [{"rho": {"attn_in": 1e-5}, "scale": 1.0}], "eps": eps}, [batch], params, "rho", 0.5)
    assert _rel(params["m"], merged) < 1e-6


def test_compute_statistics_dtype_is_float32():
    d = _lora(16, seed=11)
    m = get_method("bmm", {"statistics_dtype": "compute", "rho": 0.1})
    assert m.module_statistics(_inp("m", d))["G"].dtype == torch.float32
    assert get_method("bmm").module_statistics(_inp("m", d))["G"].dtype == torch.float64


# -- refusals, one line each -----------------------------------------------------------------------
REFUSED = [
    ({"rho": -0.1}, "bmm: parameter 'rho' must be a finite number >= 0, got -0.1"),
    ({"rho": float("nan")}, "bmm: parameter 'rho' must be a finite number >= 0, got nan"),
    ({"rho": {"attn_in": -1}}, "bmm: parameter 'rho' must be a finite number >= 0, got -1.0"),
    ({"rho": [0.1, float("inf")], "blocks": 2}, "bmm: parameter 'rho' must be a finite number >= 0, got inf"),
    ({"rho": "0.01"}, "bmm: parameter 'rho' must be a number or a mapping group -> number, got '0.01'"),
    ({"lam": -1e-3}, "bmm: parameter 'lam' must be a finite number >= 0, got -0.001"),
    ({"lam": float("nan")}, "bmm: parameter 'lam' must be a finite number >= 0, got nan"),
    ({"lam": {"mlp_out": float("nan")}}, "bmm: parameter 'lam' must be a finite number >= 0, got nan"),
    ({"scale": -1.0}, "bmm: parameter 'scale' must be a finite number >= 0, got -1.0"),
    ({"scale": float("inf")}, "bmm: parameter 'scale' must be a finite number >= 0, got inf"),
    ({"scale": float("nan")}, "bmm: parameter 'scale' must be a finite number >= 0, got nan"),
    ({"scale": 1e7}, "bmm: parameter 'scale' must be at most 1e+06, got 10000000.0"),
    ({"scale": "1.0"}, "bmm: parameter 'scale' must be a number or a list of numbers (one per block), got '1.0'"),
    ({"scale": "1e309"}, "bmm: parameter 'scale' must be a number or a list of numbers (one per block), got '1e309'"),
    ({"scale": [1.0, -2.0], "blocks": 2}, "bmm: parameter 'scale' must be a finite number >= 0, got -2.0"),
    ({"scale": True}, "bmm: parameter 'scale' must be a number or a list of numbers (one per block), got True"),
    ({"blocks": 0}, "bmm: blocks must be an integer >= 1, got 0"),
    ({"blocks": 1.5}, "bmm: blocks must be an integer >= 1, got 1.5"),
    ({"blocks": "2"}, "bmm: blocks must be an integer >= 1, got '2'"),
    ({"statistics": "hybrid", "eps": 1.5}, "bmm: parameter 'eps' must be a number in [0, 1], got 1.5"),
    ({"hybrid_rescale": "yes"}, "bmm: parameter 'hybrid_rescale' must be true or false, got 'yes'"),
    ({"statistics_dtype": "float16"}, "bmm: statistics_dtype must be one of ['float64', 'compute'], got 'float16'"),
]


@pytest.mark.parametrize("params,message", REFUSED, ids=[m.split(", got ")[-1] + f"-{i}" for i, (_, m) in enumerate(REFUSED)])
def test_bmm_parameter_refusals_are_one_line(params, message):
    with pytest.raises(BmmError) as e:
        get_method("bmm", params)
    assert str(e.value) == message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_one_line_naming_the_module(bad):
    d = _lora(2, seed=12)
    d[1, 3, 5] = bad
    m = get_method("bmm", {"anchor": "pretrained"})
    with pytest.raises(BmmError) as e:
        m.merge_unit([_inp("model.layers.0.self_attn.q_proj.weight", d)])
    assert str(e.value) == ("bmm: module 'model.layers.0.self_attn.q_proj.weight': G holds NaN or Inf (from NaN/Inf "
                            "or overflowing values in the base or an expert); cannot solve")
    # statistics read back from a store: C alone non-finite
    G, C = _stats64(_lora(2, seed=13))
    C[0, 0] = bad
    with pytest.raises(BmmError, match=r"^bmm: module 'x': C holds NaN or Inf .*; cannot solve$"):
        m.merge_unit([_inp("x", _lora(2, seed=13))], {"x": {"G": G, "C": C}})


# -- acceptance: `bmm merge` float32 vs float64 on rank-1 experts at rho 1e-4 ----------------------
def test_merge_float32_equals_float64_on_rank1_experts(tiny_llama_suite, tmp_path, st_folder):
    import json

    import bmmstream
    from safetensors.torch import load_file

    base_dir = tiny_llama_suite.base
    base = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        base.update(load_file(f))
    config = json.loads((base_dir / "config.json").read_text())
    linears = [n for n, w in base.items() if w.dim() == 2 and n.endswith("proj.weight")]
    g = torch.Generator().manual_seed(0)
    experts = []
    for t in range(3):
        tensors = dict(base)
        for n in linears:
            w = base[n]
            u = torch.randn(w.shape[0], 1, generator=g, dtype=torch.float64) @ torch.randn(1, w.shape[1], generator=g, dtype=torch.float64)
            tensors[n] = (w.double() + 1e-3 * u).to(w.dtype)
        experts.append(st_folder(tmp_path / f"expert_{t}", tensors, config))
    merged = {}
    for dt in ("float32", "float64"):
        cfg = {"base_model": str(base_dir), "models": [{"model": str(e)} for e in experts], "merge_method": "bmm",
               "parameters": {"rho": 1e-4, "anchor": "ties", "anchor_parameters": {"threshold": "per_tensor"}},
               "dtype": dt, "out_dtype": dt}
        out = bmmstream.merge(cfg, out=tmp_path / f"m_{dt}", run_dir=tmp_path / f"r_{dt}", device="cpu", progress=False)
        merged[dt] = {}
        for f in out.glob("*.safetensors"):
            merged[dt].update(load_file(f))
    errs = {n: _rel(merged["float32"][n].double() - base[n].double(), merged["float64"][n] - base[n].double())
            for n in linears}
    assert len(errs) == 14 and max(errs.values()) <= 1e-3, errs
