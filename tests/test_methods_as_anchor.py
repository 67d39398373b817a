"""Every method through the streaming pipeline, alone and as BMM's anchor (rho -> inf gives the anchor)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import bmmstream

METHODS = [
    ("task_arithmetic", {"scale": 0.3}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.2, "threshold": "per_tensor"}),
    ("dare", {"p": 0.5, "combine": "ties"}),
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {}),
    ("wudi", {"steps": 20}),
    ("poe_cauchy", {}),
    ("external", None),  # path filled in from the suite
]


def _load(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("method,params", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_method_alone_and_as_bmm_anchor(tmp_path, tiny_llama_suite, method, params):
    suite = tiny_llama_suite
    if params is None:
        params = {"path": str(suite.experts[1])}
    common = {
        "base_model": str(suite.base),
        "models": [{"model": str(e)} for e in suite.experts],
        "dtype": "float64",
        "out_dtype": "float32",
        "seed": 5,
    }
    alone = bmmstream.merge({**common, "merge_method": method, "parameters": params},
                            out=tmp_path / "alone", run_dir=tmp_path / "run_alone", progress=False)
    anchored = bmmstream.merge(
        {**common, "merge_method": "bmm",
         "parameters": {"anchor": method, "anchor_parameters": params, "lam": 1e12}},
        out=tmp_path / "bmm", run_dir=tmp_path / "run_bmm", progress=False)
    a, b, base = _load(alone), _load(anchored), _load(suite.base)
    assert set(a) == set(b) == set(base)
    moved = max(float((a[k].double() - base[k].double()).abs().max()) for k in a)
    assert moved > 1e-4  # the method really changed the model
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    if method == "external":
        ext = _load(suite.experts[1])
        for k in a:
            assert torch.equal(a[k], ext[k]), k
