"""`bmm plan`'s statistics size equals what a run that keeps its statistics actually stores."""
from __future__ import annotations

import pytest
import torch

import bmmstream
from bmmstream.statistics.store import StatsStore


def _config(suite, **params):
    p = {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "rho": 0.01, "keep_statistics": True}
    p.update(params)
    return {"base_model": str(suite.base), "models": [{"model": str(e)} for e in suite.experts],
            "merge_method": "bmm", "parameters": p, "dtype": "float32"}


@pytest.mark.parametrize("stats_dtype, nbytes", [("float64", 8), ("compute", 4)])
def test_plan_counts_the_statistics_the_run_stores(tiny_llama_suite, tmp_path, stats_dtype, nbytes):
    cfg = _config(tiny_llama_suite, statistics_dtype=stats_dtype)
    rep = bmmstream.plan_merge(cfg, device="cpu")
    bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    store = StatsStore(next((tmp_path / "r").rglob("*.zarr"), tmp_path / "r" / "stats.zarr"))
    stored = 0
    for key in store.keys():
        for name, t in store.get(key).items():
            if name in ("G", "C"):
                assert t.dtype == (torch.float64 if nbytes == 8 else torch.float32), (key, name)
                stored += t.numel() * t.element_size()
    linear = [m for m in rep["modules"] if m["kind"] == "linear"]
    expected = sum((m["shape"][1] ** 2 + m["shape"][0] * m["shape"][1]) * nbytes for m in linear)
    assert stored == expected == rep["estimate"]["stats_disk_bytes"]


def test_plan_refuses_blocks_beyond_the_layers_like_the_merge(tiny_llama_suite):
    cfg = _config(tiny_llama_suite, blocks=5)
    expected = f"parameters.blocks is 5, but {tiny_llama_suite.base} has 2 layer(s) to cut into blocks"
    with pytest.raises(bmmstream.errors.BmmError) as e:
        bmmstream.plan_merge(cfg, device="cpu")
    assert str(e.value) == expected
