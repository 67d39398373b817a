"""End-to-end streaming merges: exactness against a dense float64 solve, transformers loading,
resume after SIGKILL in each phase, input safety and error reporting."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bmmstream
from bmmstream.solve.closed_form import dense_reference
from bmmstream.sources.local import LocalSource

ROOT = Path(__file__).resolve().parent.parent


def _config(suite, **params):
    p = {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "statistics": "data_free", "rho": 0.01}
    p.update(params)
    return {
        "base_model": str(suite.base),
        "models": [{"model": str(e)} for e in suite.experts],
        "merge_method": "bmm",
        "parameters": p,
        "dtype": "float64",
        "out_dtype": "float32",
        "shard_size": "60KB",
    }


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_merge_matches_dense_float64_reference(tiny_llama_suite, tmp_path):
    suite = tiny_llama_suite
    rho = {"attn_in": 0.01, "attn_out": 0.1, "mlp_in": 0.03, "mlp_out": 1.0}
    out = bmmstream.merge(_config(suite, rho=rho, blocks=2, scale=[1.0, 1.2]), out=tmp_path / "m",
                          run_dir=tmp_path / "r", device="cpu", progress=False)
    merged = _load_dir(out)
    base = LocalSource(suite.base)
    experts = [LocalSource(e) for e in suite.experts]
    from bmmstream.plan.layout import build_plan

    plan = build_plan(base.config(), base.tensor_infos(), blocks=2)
    n_linear = 0
    for m in plan.modules:
        W0 = base.get(m.name).double()
        U = torch.stack([e.get(m.name).double() - W0 for e in experts])
        U0 = 0.3 * U.sum(0)
        if m.kind != "linear":
            assert torch.equal(merged[m.name], (W0 + U0).float()), m.name
            continue
        n_linear += 1
        G = sum(u.T @ u for u in U)
        C = sum(u @ u.T @ u for u in U)
        lam = rho[m.group] * G.trace() / G.shape[0]
        s = [1.0, 1.2][m.block]
        ref = s * dense_reference(G, C, U0, lam)
        got = merged[m.name].double() - W0
        assert _rel(got, ref) < 1e-5, m.name
    assert n_linear == 7 * plan.num_layers
    card = (out / "README.md").read_text()
    assert "bmm" in card and str(suite.experts[0]) in card
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_output_loads_in_transformers(tiny_llama_suite, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _config(tiny_llama_suite)
    cfg["out_dtype"] = "bfloat16"
    out = bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    assert (out / "model.safetensors.index.json").exists()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    merged = _load_dir(out)
    sd = model.state_dict()
    for k, v in merged.items():
        assert torch.equal(sd[k].to(v.dtype), v), k


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import bmmstream, bmmstream.pipeline as P, bmmstream.statistics.store as S, bmmstream.output.writer as W
    import bmmstream.methods.bmm as B
    phase, k = sys.argv[1], int(sys.argv[2])
    calls = {"n": 0}
    def dying(orig):
        def f(*a, **kw):
            calls["n"] += 1
            if calls["n"] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(*a, **kw)
        return f
    if phase == "stats":
        S.StatsStore.put = dying(S.StatsStore.put)
    elif phase == "solve":
        B.bmm_solve = dying(B.bmm_solve)
    elif phase == "write":
        W.ShardWriter.write = dying(W.ShardWriter.write)
    import json
    cfg = json.loads(sys.argv[3])
    bmmstream.merge(cfg, out=sys.argv[4], run_dir=sys.argv[5], device="cpu", progress=False)
    """
)


@pytest.mark.parametrize("phase,k", [("stats", 9), ("solve", 4), ("write", 17), ("write", 1)])
def test_sigkill_then_resume_is_bit_identical(tiny_llama_suite, tmp_path, phase, k):
    cfg = _config(tiny_llama_suite, blocks=2)
    cfg["dtype"] = "float32"
    cfg["out_dtype"] = "bfloat16"
    ref = bmmstream.merge(cfg, out=tmp_path / "ref", run_dir=tmp_path / "ref-run", device="cpu", progress=False)
    out, run = tmp_path / "out", tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, phase, str(k), json.dumps(cfg), str(out), str(run)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not out.exists()  # nothing presented as output
    assert not bmmstream.status(run)["complete"]
    r = subprocess.run([sys.executable, "-m", "bmmstream.cli", "resume", str(run), "--device", "cpu", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert bmmstream.status(run)["complete"]
    assert _digest(out) == _digest(ref)


def test_inputs_are_never_written(tiny_llama_suite, tmp_path):
    folders = [tiny_llama_suite.base, *tiny_llama_suite.experts]
    before = {str(f): _digest(f) for f in folders}
    mtimes = {str(p): p.stat().st_mtime_ns for f in folders for p in f.iterdir()}
    bmmstream.merge(_config(tiny_llama_suite), out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    assert {str(f): _digest(f) for f in folders} == before
    assert {str(p): p.stat().st_mtime_ns for f in folders for p in f.iterdir()} == mtimes


def test_cli_reports_mismatch_naming_the_tensor(tiny_llama_suite, tmp_path, st_folder):
    bad = tmp_path / "bad"
    src = LocalSource(tiny_llama_suite.experts[0])
    tensors = {n: src.get(n) for n in src.tensor_infos()}
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    st_folder(bad, tensors, config=src.config())
    cfg = _config(tiny_llama_suite)
    cfg["models"][1] = {"model": str(bad)}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "bmmstream.cli", "merge", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"),
                        "--run-dir", str(tmp_path / "r"), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert name in err[0] and str(bad) in err[0]
    assert not (tmp_path / "o").exists()


def test_status_plan_and_rerun_of_complete_run(tiny_llama_suite, tmp_path):
    cfg = _config(tiny_llama_suite, blocks=2)
    out = bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    st = bmmstream.status(tmp_path / "r")
    assert st["complete"] and st["output"] == str(out)
    again = bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    assert again == out
    rep = bmmstream.plan_merge(cfg, device="cpu")
    assert rep["family"] == "llama" and rep["blocks"] == [[0, 0], [1, 1]]
    assert rep["counts"]["groups"] == {"attn_in": 6, "attn_out": 2, "mlp_in": 4, "mlp_out": 2}
    assert rep["estimate"]["flops"] > 0 and rep["estimate"]["peak_ram_bytes"] > 0
    other = dict(cfg, parameters=dict(cfg["parameters"], rho=0.5))
    with pytest.raises(bmmstream.errors.BmmError, match="run directory holds a different merge"):
        bmmstream.merge(other, run_dir=tmp_path / "r", device="cpu", progress=False)
