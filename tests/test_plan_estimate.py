"""`bmm plan`'s statistics size equals what a run that keeps its statistics actually stores."""
from __future__ import annotations

import math

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


def test_plan_counts_no_statistics_on_disk_for_a_run_that_keeps_none(tiny_llama_suite):
    """Without keep_statistics, search or calibration the statistics store is transient (issue 17)."""
    rep = bmmstream.plan_merge(_config(tiny_llama_suite, keep_statistics=False), device="cpu")
    assert rep["estimate"]["stats_disk_bytes"] == 0


def test_bmm_flops_and_unit_memory_model():
    from bmmstream.plan.estimate import bmm_unit_bytes, module_flops
    from bmmstream.statistics.grams import datafree_flops

    # data-free: the SYRK + cheaper-association statistics, then R = C - U0 G, Cholesky, two solves
    for d_out, d_in in ((4096, 14336), (14336, 4096), (1024, 4096)):
        solve = 4.0 * d_out * d_in**2 + d_in**3 / 3.0
        assert module_flops(d_out, d_in, 5, "bmm") == pytest.approx(datafree_flops(d_out, d_in, 5) + solve, rel=1e-12)
    assert module_flops(8, 8, 5, "ties") == 0.0
    # one Llama-3.1-8B layer, T = 5, float32 inputs, float64 statistics: module by module the down
    # projection's working set; unit by unit every input and every module's statistics
    h, i, kv = 4096, 14336, 1024
    shapes = [((h, h), True), ((kv, h), True), ((kv, h), True), ((h, h), True), ((i, h), True), ((i, h), True),
              ((h, i), True), ((h,), False), ((h,), False)]
    unit = bmm_unit_bytes(shapes, 5, 4, 8, module_stream=False)
    stream = bmm_unit_bytes(shapes, 5, 4, 8, module_stream=True)
    params = 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h
    assert unit > 6 * params * 4 + sum((s[-1] ** 2 + s[0] * s[-1]) * 8 for s, lin in shapes if lin)
    down = 6 * h * i * 4 + (i * i + h * i) * 8
    assert down < stream < down + 4 * h * i * 8


@pytest.mark.parametrize("stats_dtype, nbytes", [("float64", 8), ("compute", 4)])
def test_plan_counts_the_calibration_grams_the_run_stores(tiny_llama_suite, tmp_path, stats_dtype, nbytes):
    """Data-assisted BMM also stores one input Gram per expert and input site, float64 with float64
    statistics (statistics/data_assisted.gram_dtype)."""
    import json

    cfg = _config(tiny_llama_suite, statistics="data_assisted", statistics_dtype=stats_dtype)
    for t, m in enumerate(cfg["models"]):
        p = tmp_path / f"calib{t}.jsonl"
        p.write_text("".join(json.dumps({"input_ids": [(7 * t + j) % 100 for j in range(9)]}) + "\n" for _ in range(3)))
        m["calibration"] = {"path": str(p), "samples": 3, "max_len": 8, "batch_size": 2}
    rep = bmmstream.plan_merge(cfg, device="cpu")
    bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    import numpy as np
    import zarr

    root = zarr.open_group(str(next((tmp_path / "r").rglob("*.zarr"))), mode="r")
    stored = grams = 0
    for path, arr in root.members(max_depth=None):
        name = path.rsplit("/", 1)[-1]
        if isinstance(arr, zarr.Array) and name in ("G", "C", "S"):
            assert arr.dtype == (np.float64 if nbytes == 8 else np.float32), path
            stored += arr.nbytes
            grams += arr.nbytes if name == "S" else 0
    assert grams > 0
    assert stored == rep["estimate"]["stats_disk_bytes"]


def test_plan_memory_follows_how_the_method_streams(tiny_llama_suite):
    """Non-BMM methods: the fused raw path holds outputs (and the method's raw scratch), the general
    path one tensor's base + T task vectors + the method's working copies (bmm plan vs measured on
    the 0.35B suite: bench/perf_vs_mergekit.py)."""
    from bmmstream.methods.registry import get_method
    from bmmstream.plan.estimate import MERGE_RUNTIME_BYTES, STREAM_FUSED, STREAM_TENSOR, stream_unit_bytes

    s = tiny_llama_suite
    T = len(s.experts)

    def peak(method, **params):
        cfg = {"base_model": str(s.base), "models": [{"model": str(e)} for e in s.experts], "merge_method": method,
               "parameters": params, "dtype": "float32", "out_dtype": "bfloat16"}
        rep = bmmstream.plan_merge(cfg, device="cpu")
        return rep, rep["estimate"]["peak_ram_bytes"] - MERGE_RUNTIME_BYTES

    rep, ta = peak("task_arithmetic", scale=0.5)
    sizes = {m["name"]: m["shape"] for m in rep["modules"]}
    n_max = max(int(torch.tensor(sh).prod()) for sh in sizes.values())
    assert get_method("task_arithmetic").fuses_raw() and not get_method("ties", {"threshold": "per_tensor"}).fuses_raw()
    assert get_method("ties").fuses_raw() and get_method("ties").raw_scratch_bytes(T) == 4
    # fused_merge keeps a float32 running sum between its passes over 4 experts
    assert [get_method("task_arithmetic").raw_scratch_bytes(t) for t in (4, 5, 15, 16)] == [0, 4, 4, 0]
    _, ties_global = peak("ties", density=0.5)
    _, ties_pt = peak("ties", density=0.5, threshold="per_tensor")
    # the fused paths hold no compute-dtype copy of the inputs (TIES: its float32 signs beside them);
    # the per-tensor TIES holds base + T task vectors + T + 4 working copies of its largest tensor
    assert ta < ties_global < ties_pt
    assert ties_pt >= (2 * T + 5) * n_max * 4
    units = [(10, 2, 0), (30, 2, 0)]  # (elements, output bytes per element, the method's extra bytes)
    assert stream_unit_bytes(units, 3, 4, STREAM_FUSED) == 2 * 80
    assert stream_unit_bytes(units, 3, 4, STREAM_FUSED, scratch=4) == 2 * 80 + 30 * 4
    assert stream_unit_bytes(units, 3, 4, STREAM_TENSOR) == 2 * 80 + 6 * 30 * 4
    assert stream_unit_bytes(units, 3, 4, STREAM_TENSOR, working=7) == 2 * 80 + 11 * 30 * 4
    assert stream_unit_bytes([(10, 2, 10**6), (30, 2, 0)], 3, 4, STREAM_TENSOR) == 2 * 80 + 6 * 10 * 4 + 10**6
    # RegMean holds its T input Grams and their working copies beside the task vectors
    rm = get_method("regmean")
    assert rm.extra_bytes((6, 8), "linear", 3) == 9 * 64 * 4 and rm.extra_bytes((8,), "vector", 3) == 0
    assert get_method("dare_ties").working_copies(4) > get_method("dare_linear").working_copies(4) > 2


def test_plan_times_the_work_each_method_declares(tiny_llama_suite):
    """`bmm plan`'s seconds: reads + BMM FLOPs + each kind of method work over its measured rate.
    Rates are injected here (no timing in tests); bench/perf_vs_mergekit.py --only plan checks the
    measured ones against real runs."""
    from bmmstream.methods.registry import get_method
    from bmmstream.plan.estimate import READ_BANDWIDTH, estimate_report, sort_work, svd_flops
    from bmmstream.plan.layout import build_plan

    T = 4
    ties_pt = get_method("ties", {"threshold": "per_tensor"})
    assert ties_pt.compute_work((6, 8), "linear", T) == {"sort_unstable": T * 48 * math.log2(48)}
    assert get_method("ties").compute_work((6, 8), "linear", T) == {}  # global: histograms, no sort
    assert get_method("task_arithmetic").compute_work((6, 8), "linear", T) == {}
    assert get_method("dare_ties").compute_work((6, 8), "linear", T) == {"random": T * 48.0}
    assert get_method("della").compute_work((6, 8), "linear", T) == {"sort": T * 48 * math.log2(8), "random": T * 48.0}
    assert get_method("breadcrumbs_ties").compute_work((6, 8), "linear", T) == {"sort": T * sort_work(48, 48)}
    assert get_method("tsv").compute_work((6, 8), "linear", T) == {"svd": (T + 2) * svd_flops(6, 8)}
    assert get_method("tsv").compute_work((8,), "vector", T) == {}
    assert get_method("iso_c").compute_work((6, 8), "linear", T) == {"svd": svd_flops(6, 8)}
    assert get_method("iso_cts").compute_work((6, 8), "linear", T) == {"svd": (3 + T) * svd_flops(8, 6)}
    assert svd_flops(6, 8) == 4 * 8 * 36 + 8 * 216

    from bmmstream.sources.local import LocalSource

    src = LocalSource(tiny_llama_suite.base)
    infos = src.tensor_infos()
    plan = build_plan(src.config(), infos)
    n_all = sum(i.numel for i in infos.values())
    rates = {"task_vectors": 1e6, "sort_unstable": 2e6, "random": 3e6, "svd": 4e9}
    common = dict(experts=T, compute_bytes=4, statistics_bytes=4, method_description={}, statistics="data_free",
                  needs_prepass=False, out_bytes=0, calibration_tokens=None, keep_statistics=False,
                  device=torch.device("cpu"), rates=rates)
    reads = (T + 1) * sum(i.nbytes for i in infos.values()) / READ_BANDWIDTH
    work = {m.name: ties_pt.compute_work(tuple(m.matrix_shape), m.kind, T) for m in plan.modules}
    est = estimate_report(plan, infos, method="ties", stream="tensor", work=work, **common)["estimate"]
    sort_total = sum(w["sort_unstable"] for w in work.values())
    assert est["method_work"] == {"sort_unstable": sort_total, "task_vectors": float(T * n_all)}
    assert est["seconds"] == pytest.approx(reads + sort_total / 2e6 + T * n_all / 1e6, rel=1e-12)
    # the fused path reads and writes only: no task vectors, no work
    fused = estimate_report(plan, infos, method="task_arithmetic", stream="fused", work={}, **common)["estimate"]
    assert fused["method_work"] == {} and fused["seconds"] == pytest.approx(reads, rel=1e-12)


def test_plan_command_prints_the_method_work(tiny_llama_suite, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from bmmstream.cli import app

    s = tiny_llama_suite
    cfg = {"base_model": str(s.base), "models": [{"model": str(e)} for e in s.experts], "merge_method": "della",
           "parameters": {"density": 0.5, "epsilon": 0.1}, "dtype": "float32"}
    path = tmp_path / "della.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["plan", str(path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if "of which the method's own work" in ln)
    assert "random" in line and "sort" in line and "task vectors" in line
    ta = dict(cfg, merge_method="task_arithmetic", parameters={"scale": 0.5}, out_dtype="bfloat16")
    path.write_text(yaml.safe_dump(ta))
    res = CliRunner().invoke(app, ["plan", str(path), "--device", "cpu"])
    assert res.exit_code == 0 and "of which the method's own work" not in res.output  # the fused path: reads only
