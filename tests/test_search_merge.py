"""`bmm search` end to end on a tiny Llama: resident in-place trials agree with the streamed merge
of the chosen parameters, repeated points cost nothing, a rerun is served from the history."""
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
from bmmstream.search.run import search_merge

ROOT = Path(__file__).resolve().parent.parent

SCORER = textwrap.dedent(
    """
    import json, os, torch
    CALLS = {"n": 0}
    TARGET = {}
    def score(model):
        CALLS["n"] += 1
        with open(os.environ["BMM_TEST_CALLS"], "a") as f:
            f.write("1\\n")
        sd = model.state_dict()
        if not TARGET:
            from safetensors.torch import load_file
            TARGET.update(load_file(os.environ["BMM_TEST_TARGET"]))
        return -sum(float((sd[k].double() - v.double()).norm()) for k, v in TARGET.items())
    """
)


def _cfg(suite, **search):
    s = {"optimizer": "random", "budget": 6, "seed": 0, "rho_range": [1e-3, 1.0], "scale_range": [1.0, 1.3],
         "scorer": {"callable": "bmm_test_scorer:score"}, "full_top_k": 2}
    s.update(search)
    return {
        "base_model": str(suite.base),
        "models": [{"model": str(e)} for e in suite.experts],
        "merge_method": "bmm",
        "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "rho": 0.01, "blocks": 2},
        "dtype": "float64",
        "out_dtype": "float32",
        "search": s,
    }


@pytest.fixture
def scorer_env(tmp_path, monkeypatch, tiny_llama_suite):
    (tmp_path / "bmm_test_scorer.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bmm_test_scorer", None)
    # the target: a merge with known per-block parameters; the search should move towards it
    target = {
        "base_model": str(tiny_llama_suite.base), "models": [{"model": str(e)} for e in tiny_llama_suite.experts],
        "merge_method": "bmm", "dtype": "float64", "out_dtype": "float32",
        "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "blocks": 2,
                       "rho": [{g: 0.05 for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")}] * 2, "scale": [1.1, 1.1]},
    }
    out = bmmstream.merge(target, out=tmp_path / "target", run_dir=tmp_path / "target-run", device="cpu", progress=False)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    keep = {k: v for k, v in tensors.items() if "layers." in k and k.endswith("proj.weight")}
    from safetensors.torch import save_file

    save_file(keep, tmp_path / "target.safetensors")
    monkeypatch.setenv("BMM_TEST_TARGET", str(tmp_path / "target.safetensors"))
    monkeypatch.setenv("BMM_TEST_CALLS", str(tmp_path / "calls.txt"))
    return tmp_path


def _calls(d: Path) -> int:
    p = d / "calls.txt"
    return len(p.read_text().splitlines()) if p.exists() else 0


def test_search_writes_the_best_point_as_the_streamed_merge_would(tiny_llama_suite, scorer_env):
    d = scorer_env
    cfg = _cfg(tiny_llama_suite)
    res = search_merge(cfg, out=d / "best", run_dir=d / "run", device="cpu", progress=False)
    assert res["evaluations"] == _calls(d) and res["evaluations"] >= 6
    best = res["best_params"]
    assert len(best["blocks"]) == 2
    # the written model is exactly an ordinary merge with the reported parameters
    from bmmstream.search.run import best_parameters

    plain = dict(cfg)
    plain.pop("search")
    plain["parameters"] = best_parameters(best, cfg["parameters"], "rho")
    ref = bmmstream.merge(plain, out=d / "plain", run_dir=d / "plain-run", device="cpu", progress=False)
    for f in sorted(p.name for p in ref.glob("*.safetensors")):
        a, b = load_file(ref / f), load_file(res["output"] / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    # and its score, recomputed from the written files, is the score the search recorded
    import bmm_test_scorer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(res["output"], dtype=torch.float64)
    assert bmm_test_scorer.score(model) == pytest.approx(res["best_score"], rel=1e-5)
    assert (d / "run" / "search-report" / "scores.png").exists()


def test_rerun_costs_no_evaluation(tiny_llama_suite, scorer_env):
    d = scorer_env
    cfg = _cfg(tiny_llama_suite, budget=4, full_top_k=1)
    search_merge(cfg, out=d / "best", run_dir=d / "run", device="cpu", progress=False)
    n = _calls(d)
    # same config, run directory complete: nothing is evaluated again
    again = search_merge(cfg, out=d / "best", run_dir=d / "run", device="cpu", progress=False)
    assert _calls(d) == n and again["evaluations"] == 0
    # a fresh run directory with the same search: the model state is rebuilt, cached scores are not shared,
    # but a point the optimiser repeats is never scored twice
    grid = _cfg(tiny_llama_suite, optimizer="grid", budget=3, scale_range=[1.0, 1.0], full_top_k=3)
    before = _calls(d)
    r = search_merge(grid, out=d / "best2", run_dir=d / "run2", device="cpu", progress=False)
    assert _calls(d) - before == r["evaluations"] == 3  # 3 grid points; the final top-3 are cache hits


def test_search_config_errors(tiny_llama_suite, tmp_path):
    cfg = _cfg(tiny_llama_suite)
    cfg["search"]["budgett"] = 3
    with pytest.raises(bmmstream.errors.BmmError, match=r"^search: unknown key\(s\) \['budgett'\]"):
        search_merge(cfg, run_dir=tmp_path / "r", device="cpu", progress=False)
    cfg = _cfg(tiny_llama_suite)
    cfg["merge_method"] = "ties"
    with pytest.raises(bmmstream.errors.BmmError, match=r"^search: merge_method must be bmm, got 'ties'$"):
        search_merge(cfg, run_dir=tmp_path / "r2", device="cpu", progress=False)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[4])
    import bmm_test_scorer
    orig = bmm_test_scorer.score
    n = {"k": 0}
    def dying(model):
        n["k"] += 1
        if n["k"] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(model)
    bmm_test_scorer.score = dying
    import json
    from bmmstream.search.run import search_merge
    search_merge(json.loads(sys.argv[1]), run_dir=sys.argv[2], device="cpu", progress=False)
    """
)


def test_killed_search_resumes_to_the_same_history_and_choice(tiny_llama_suite, scorer_env):
    d = scorer_env
    cfg = _cfg(tiny_llama_suite, optimizer="NGOpt", budget=5, full_top_k=2)
    ref = search_merge(cfg, run_dir=d / "ref", device="cpu", progress=False)
    import os

    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg), str(d / "run"), "4", str(d)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (d / "run" / "model").exists()
    res = search_merge(cfg, run_dir=d / "run", device="cpu", progress=False)
    assert res["best_params"] == ref["best_params"] and res["best_score"] == ref["best_score"]

    def history(run):
        (h,) = list((run / "search").glob("*/history.jsonl"))
        return [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "time", "wall")} for l in h.read_text().splitlines()]

    assert history(d / "run") == history(d / "ref")
    for f in sorted(p.name for p in (d / "ref" / "model").glob("*.safetensors")):
        assert (d / "ref" / "model" / f).read_bytes() == (d / "run" / "model" / f).read_bytes()


POOL_SCORER = textwrap.dedent(
    """
    def score(model):
        import torch
        sd = model.state_dict()
        return -float(sum(v.double().norm() for k, v in sd.items() if k.endswith("attention.self.query.weight")))
    """
)


def test_search_on_bert_keeps_untied_modules_at_the_config_rho(tmp_path, monkeypatch):
    """A BERT pooler is regressed but belongs to no searched group: it keeps parameters.rho, and the
    written model equals an ordinary merge with the reported parameters."""
    from bmmstream.demo import make_bert_suite
    from bmmstream.search.run import best_parameters

    suite = make_bert_suite(tmp_path / "bert", num_experts=2)
    (tmp_path / "pool_scorer.py").write_text(POOL_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {
        "base_model": str(suite.base), "models": [{"model": str(e)} for e in suite.experts],
        "merge_method": "bmm", "dtype": "float64", "out_dtype": "float32",
        "parameters": {"anchor": "task_arithmetic", "rho": {"other": 0.5}},
        "search": {"optimizer": "random", "budget": 3, "rho_range": [1e-3, 1.0], "full_top_k": 0,
                   "scorer": {"callable": "pool_scorer:score"}},
    }
    res = search_merge(cfg, run_dir=tmp_path / "run", device="cpu", progress=False)
    assert res["best_params"]["blocks"][0]["rho"]["other"] == 0.5
    plain = {k: v for k, v in cfg.items() if k != "search"}
    plain["parameters"] = best_parameters(res["best_params"], cfg["parameters"], "rho")
    ref = bmmstream.merge(plain, out=tmp_path / "plain", run_dir=tmp_path / "plain-run", device="cpu", progress=False)
    a, b = load_file(ref / "model.safetensors"), load_file(res["output"] / "model.safetensors")
    assert any("pooler" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_search_without_search_section_fails_cleanly(tiny_llama_suite, tmp_path):
    cfg = _cfg(tiny_llama_suite)
    cfg.pop("search")
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "bmmstream.cli", "search", str(tmp_path / "c.yaml"), "--run-dir",
                        str(tmp_path / "r"), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: search: the config has no 'search:' section"]
    assert not (tmp_path / "r").exists()
