"""The out-of-core search (issue 12): every module's factors live in the run's Zarr store and are
streamed unit by unit in each trial; it chooses the point and writes the model the in-core search
does (float64, 1e-6), resumes without refactoring, and holds at most two units' factors at once."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bmmstream
from bmmstream.search import run as search_run
from bmmstream.search.run import FactorOptions, choose_rank, module_factors, plan_search, search_merge
from bmmstream.solve.spectral import solve_dense, solve_eigen_truncated
from bmmstream.statistics.store import factor_key

ROOT = Path(__file__).resolve().parent.parent

SCORER = textwrap.dedent(
    """
    def score(model):
        sd = model.state_dict()
        return -sum(float((v.double() - 0.01).norm()) for k, v in sd.items() if k.endswith("proj.weight"))
    """
)


@pytest.fixture(scope="module")
def suite4(tmp_path_factory):
    """4 layers (so two units' factors are half of all of them), hidden 32, 2 experts."""
    from bmmstream.demo import make_llama_suite

    return make_llama_suite(tmp_path_factory.mktemp("ooc4"), num_experts=2, hidden=32, intermediate=64, layers=4,
                            heads=4, kv_heads=2, vocab=64, rank=2)


@pytest.fixture
def scorer(tmp_path, monkeypatch):
    (tmp_path / "ooc_scorer.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ooc_scorer", None)
    return tmp_path


def _cfg(suite, **search):
    s = {"optimizer": "NGOpt", "budget": 5, "seed": 3, "rho_range": [1e-3, 1.0], "scale_range": [0.8, 1.3],
         "scorer": {"callable": "ooc_scorer:score"}, "full_top_k": 0}
    s.update(search)
    return {"base_model": str(suite.base), "models": [{"model": str(e)} for e in suite.experts],
            "merge_method": "bmm", "dtype": "float64", "out_dtype": "float32",
            "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "rho": 0.01, "blocks": 2},
            "search": s}


def _history(run: Path) -> list[dict]:
    (h,) = list((run / "search").glob("*/history.jsonl"))
    return [json.loads(l) for l in h.read_text().splitlines()]


def _weights(folder: Path) -> dict:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_out_of_core_equals_in_core(suite4, scorer):
    d = scorer
    ooc = search_merge(_cfg(suite4, keep_base=True), run_dir=d / "ooc", device="cpu", progress=False)
    ref = search_merge(_cfg(suite4, in_core=True), run_dir=d / "inc", device="cpu", progress=False)
    assert ooc["best_params"] == ref["best_params"]
    assert ooc["best_score"] == pytest.approx(ref["best_score"], rel=1e-9)
    for a, b in zip(_history(d / "ooc"), _history(d / "inc")):
        assert a["params"] == b["params"] and a["score"] == pytest.approx(b["score"], rel=1e-9)
    wa, wb = _weights(d / "ooc" / "model"), _weights(d / "inc" / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].double(), wb[k].double(), rtol=0, atol=1e-6), k
    # the per-trial time split is recorded, one line per evaluation
    costs = json.loads((d / "ooc" / "search-report" / "trial_costs.json").read_text())
    assert costs["evaluations"] == ooc["evaluations"] == 5 and costs["keep_base"] is True
    assert set(costs["mean"]) == {"stream_s", "resolve_s", "assemble_s", "score_s"}


def test_factors_live_in_the_store_and_two_units_at_most_are_held(suite4, scorer, monkeypatch):
    d = scorer
    held = {}
    orig = search_run.StreamedTrials.apply

    def spy(self, point):
        cost = orig(self, point)
        # between trials the streamer holds no tensor but the model's own parameters (views) and
        # the re-solve's scratch buffer (one module's A diag(inv) and U)
        own = {id(p) for p in self.params.values()}
        held["tensors"] = [k for k, v in vars(self).items() if isinstance(v, torch.Tensor) and id(v) not in own]
        held["scratch"] = self._scratch.numel()
        held["base"] = self.base
        held["peak"] = self.peak_factor_bytes
        held["units"] = self.units
        held["store_bytes"] = sum(self.store.nbytes(k) for k in self.store.keys())
        held["stored"] = {m.name: self.store.get(factor_key(m.name)) if self.store.has(factor_key(m.name)) else None
                          for mods in self.units for m in mods}
        return cost

    monkeypatch.setattr(search_run.StreamedTrials, "apply", spy)
    cfg = _cfg(suite4, budget=2)
    search_merge(cfg, run_dir=d / "r", device="cpu", progress=False)
    # `bmm plan`'s store size for the search is what the run stored (G, C and the factors)
    assert plan_search(cfg, device="cpu")["search"]["stats_disk_bytes"] == held["store_bytes"]
    assert held["tensors"] == ["_scratch"] and held["base"] is None
    per_unit = []
    for mods in held["units"]:
        nb = 0
        for m in mods:
            f = held["stored"][m.name]
            assert f is not None, m.name
            assert set(f) == {"e", "Q", "A", "U0", "trace_over_d"}
            # default storage "compute": this run computes in float64, so Q and A are float64 (trial == written model)
            assert f["Q"].dtype == f["A"].dtype == torch.float64 and f["U0"].dtype == torch.float64
            nb += sum(t.numel() * 8 for t in f.values())  # held in the compute dtype, float64
        per_unit.append(nb)
    pairs = max(a + b for a, b in zip(per_unit, per_unit[1:]))
    assert held["scratch"] == max(f["A"].numel() + f["U0"].numel() for f in held["stored"].values())
    assert len(per_unit) == 4 and 0 < held["peak"] <= pairs < sum(per_unit)


KILLER = textwrap.dedent(
    """
    import os, signal, sys, json
    sys.path.insert(0, sys.argv[4])
    import ooc_scorer
    orig = ooc_scorer.score
    n = {"k": 0}
    def dying(model):
        n["k"] += 1
        if n["k"] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(model)
    ooc_scorer.score = dying
    from bmmstream.search.run import search_merge
    search_merge(json.loads(sys.argv[1]), run_dir=sys.argv[2], device="cpu", progress=False)
    """
)


def test_killed_out_of_core_search_resumes_from_the_stored_factors(suite4, scorer, monkeypatch):
    from bmmstream.methods.task_arithmetic import TaskArithmetic

    d = scorer
    cfg = _cfg(suite4, budget=4)
    linear_anchors = {"n": 0}  # the anchor merged for a regressed module: statistics pass or final write
    orig_merge = TaskArithmetic.merge

    def counted(self, inp):
        linear_anchors["n"] += inp.spec.kind == "linear"
        return orig_merge(self, inp)

    monkeypatch.setattr(TaskArithmetic, "merge", counted)
    ref = search_merge(cfg, run_dir=d / "ref", device="cpu", progress=False)
    ref_anchors, linear_anchors["n"] = linear_anchors["n"], 0
    r = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg), str(d / "run"), "3", str(d)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]

    def refused(*a, **k):
        raise AssertionError("factors recomputed on resume")

    monkeypatch.setattr(search_run, "module_factors", refused)  # every module's factors are in the store
    res = search_merge(cfg, run_dir=d / "run", device="cpu", progress=False)
    assert res["best_params"] == ref["best_params"] and res["best_score"] == ref["best_score"]
    # each regressed module's anchor is merged once, by the first statistics pass; the resumed pass and
    # both final writes take it from the stored factors
    n_regressed = sum(1 for k in _weights(d / "ref" / "model") if k.endswith("proj.weight"))
    assert n_regressed > 0 and ref_anchors == n_regressed and linear_anchors["n"] == 0
    strip = lambda h: [{k: v for k, v in t.items() if k not in ("seconds", "time", "wall")} for t in h]
    assert strip(_history(d / "run")) == strip(_history(d / "ref"))
    wa, wb = _weights(d / "run" / "model"), _weights(d / "ref" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_factor_storage_options_against_the_exact_resolve():
    """float64 all-pairs factors are the exact solve; float32 / bfloat16 / energy truncation stay
    within their rounding and the dropped energy (low-rank + noise task vectors, as the suites)."""
    g = torch.Generator().manual_seed(0)
    d_out, d_in, T = 24, 16, 3
    U = torch.stack([torch.randn(d_out, 2, generator=g, dtype=torch.float64) @ torch.randn(2, d_in, generator=g,
                     dtype=torch.float64) + 0.01 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
                     for _ in range(T)])
    G = sum(u.T @ u for u in U)
    C = sum(u @ u.T @ u for u in U)
    U0 = 0.3 * U.sum(0)
    lam = 0.01 * float(G.diagonal().mean())
    exact = solve_dense(G, C, U0, lam)

    def resolve(opts):
        f, attrs = module_factors(G, C, U0, opts)
        U_ = solve_eigen_truncated(f["U0"], f["A"].double(), f["e"], f["Q"].double(), lam)
        return float((U_ - exact).norm() / exact.norm()), attrs["k"]

    err, k = resolve(FactorOptions(dtype="compute"))
    assert err < 1e-12 and k == d_in
    assert resolve(FactorOptions(dtype="float32"))[0] < 1e-6
    assert resolve(FactorOptions(dtype="bfloat16"))[0] < 2e-2
    err, k = resolve(FactorOptions(energy=0.999))
    assert k < d_in and err < 0.05
    e = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert [choose_rank(e, x) for x in (None, 1.0, 0.4, 0.41, 0.7, 0.95)] == [4, 4, 1, 2, 2, 4]


def test_factor_option_errors(suite4, tmp_path):
    cfg = _cfg(suite4, factors={"dtype": "float16"})
    with pytest.raises(bmmstream.errors.BmmError,
                       match=r"^search.factors.dtype must be one of \['bfloat16', 'compute', 'float32'\], got 'float16'$"):
        search_merge(cfg, run_dir=tmp_path / "r", device="cpu", progress=False)
    cfg = _cfg(suite4, keep_base="sometimes")
    with pytest.raises(bmmstream.errors.BmmError, match=r"^search.keep_base must be auto, true or false, got 'sometimes'$"):
        search_merge(cfg, run_dir=tmp_path / "r2", device="cpu", progress=False)


def test_hybrid_out_of_core_equals_in_core(tiny_llama_suite, scorer):
    """Hybrid statistics: the two ends of G and C in eps are streamed; each trial mixes and solves."""
    import random

    d = scorer
    models = []
    for t, e in enumerate(tiny_llama_suite.experts):
        rng, p = random.Random(t), d / f"calib_{t}.jsonl"
        p.write_text("".join(json.dumps({"input_ids": [rng.randrange(128) for _ in range(rng.randint(3, 12))]}) + "\n"
                             for _ in range(7)))
        models.append({"model": str(e), "calibration": {"path": str(p), "samples": 7, "max_len": 10, "batch_size": 3}})

    def cfg(**extra):
        c = _cfg(tiny_llama_suite, budget=3, optimizer="random", eps_range=[0.1, 0.9], **extra)
        c["models"] = models
        c["parameters"].update(statistics="hybrid", eps=0.3)
        return c

    a = search_merge(cfg(), run_dir=d / "ooc", device="cpu", progress=False)
    b = search_merge(cfg(in_core=True), run_dir=d / "inc", device="cpu", progress=False)
    assert a["best_params"] == b["best_params"] and "eps" in a["best_params"]
    for x, y in zip(_history(d / "ooc"), _history(d / "inc")):
        assert x["params"] == y["params"] and x["score"] == pytest.approx(y["score"], rel=1e-9)
