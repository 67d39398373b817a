"""`bmm plan`: what a merge will do and cost, from the headers alone, before any heavy work.

Time is estimated from a measured matmul throughput on the chosen device and an assumed read
bandwidth (local disk 1 GB/s; say so in the report, as it varies most). Runs that need calibration
Grams add one forward of each expert over its calibration data, counted at its upper bound
(samples x max_len tokens, as padded batches run every position).
"""
from __future__ import annotations

import math
import time
from collections import Counter

import torch

from bmmstream.plan.layout import Plan, split_blocks
from bmmstream.sources.base import TensorInfo


def c_via_outer(d_out: int, d_in: int) -> bool:
    """True when C_t = (U_t U_t^T) U_t is cheaper than U_t (U_t^T U_t) (statistics/grams.py computes C by the cheaper one)."""
    return 3 * d_out < 2 * d_in


def datafree_flops(d_out: int, d_in: int, T: int) -> float:
    """FLOPs of datafree_stats for T dense tasks (the association it picks; SYRK counted as d_out d_in^2)."""
    if c_via_outer(d_out, d_in):
        return float(T) * (d_out * d_in**2 + d_in * d_out**2 + 2.0 * d_out**2 * d_in)
    return float(T) * 3.0 * d_out * d_in**2


READ_BANDWIDTH = 1e9  # bytes/s assumed for local safetensors reads


def measure_flops(device: torch.device, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Matmul FLOP/s on `device` in `dtype`, the best of a few n x n products (a short, rough
    measurement; n = 2048 because BMM's products are that large or larger, and 1024 read 0.5-0.8x
    the rate the merge reached on an 8B layer)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    best, reps, t_end = 0.0, 0, time.perf_counter() + 0.3
    while reps < 2 or (time.perf_counter() < t_end and reps < 8):
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        reps += 1
    return best


def numel_of(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


def sort_work(elements: int, length: int) -> float:
    """compute_work's "sort" count: `elements` sorted in runs of `length` (n log2 of the run)."""
    return float(elements) * math.log2(max(2, length))


def svd_flops(m: int, n: int) -> float:
    """FLOPs of a thin SVD with both factors, 4 M N^2 + 8 N^3 (M >= N; LAPACK's gesdd, roughly)."""
    big, small = max(m, n), min(m, n)
    return 4.0 * big * small * small + 8.0 * small**3


WORK_KINDS = ("task_vectors", "sort", "sort_unstable", "random", "svd")


def measure_rates(device: torch.device, kinds: set[str]) -> dict[str, float]:
    """Work per second for each kind of method work (MergeMethod.compute_work), each from short runs
    of that very operation at sizes like a merge's (about 1 s in all, only for the kinds a method
    does): a merge's selection, draws and SVDs cost 10-100x its reads (bench/perf_vs_mergekit.py
    --only plan), so a time estimate without them is no estimate. "task_vectors": float32 task
    vectors built from bf16 weights (the general path)."""
    import numpy as np

    def best(fn, work: float, reps: int) -> float:
        return work / max(min(_timed(fn) for _ in range(reps)), 1e-9)

    n = 1 << 22
    rates = {}
    if "task_vectors" in kinds:
        b = torch.randn(n, device=device).to(torch.bfloat16)
        e = torch.randn(n, device=device).to(torch.bfloat16)
        rates["task_vectors"] = best(lambda: _sync(e.float() - b.float()), n, 3)
    if "sort" in kinds:
        x = torch.randn(n, device=device)
        rates["sort"] = best(lambda: _sync(torch.sort(x.abs(), stable=True).indices), sort_work(n, n), 2)
    if "sort_unstable" in kinds:  # 1.45x faster than the stable one here
        x = torch.randn(n, device=device)
        rates["sort_unstable"] = best(lambda: _sync(torch.argsort(x.abs(), descending=True)), sort_work(n, n), 2)
    if "random" in kinds:  # DARE's and DELLA's masks: numpy Philox draws on the CPU, kept entries rescaled
        x = torch.randn(n)

        def draw() -> torch.Tensor:
            u = np.random.Generator(np.random.Philox(key=1)).random(n, dtype=np.float32)
            return torch.where(torch.from_numpy(u < np.float32(0.5)), x / 0.5, torch.zeros((), dtype=x.dtype))

        rates["random"] = best(draw, n, 2)
    if "svd" in kinds:
        a = torch.randn(1024, 2048, device=device)
        rates["svd"] = best(lambda: _sync(torch.linalg.svd(a, full_matrices=False)[0]), svd_flops(1024, 2048), 2)
    return rates


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _sync(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    return t


def module_flops(d_out: int, d_in: int, T: int, method: str, statistics: str = "data_free") -> float:
    """BMM's FLOPs for one module: statistics as statistics/grams.py computes them (data-free: SYRK
    and the cheaper association for C; otherwise a SYRK per task Gram where data-free Grams are mixed
    in, and C = sum_t U_t G_t as GEMMs), then R = C - U0 G, the Cholesky and the two triangular solves."""
    if method != "bmm":
        return 0.0
    if statistics == "data_free":
        stats = datafree_flops(d_out, d_in, T)
    else:
        stats = (T * d_out * d_in * d_in if statistics != "data_assisted" else 0.0) + 2.0 * T * d_out * d_in * d_in
    return stats + 2.0 * d_out * d_in * d_in + d_in**3 / 3.0 + 2.0 * d_in * d_in * d_out


# anonymous memory of the merge process beyond the tensors the estimates count: python + torch +
# bmmstream + numba imported hold 176 MiB private (bench/perf_vs_mergekit.py), plus the allocator's and
# the writer's slack. bench/rss_depth.py --llama8b-layer measured 4.12 GiB private peak for a model of
# 3.90 GiB + this (T = 5, float32 statistics) before `bmm` fixed glibc's mmap threshold (cli.py).
MERGE_RUNTIME_BYTES = 192 * 2**20

# how a non-BMM method's tensors reach it (pipeline._merge_stream), for the memory estimate
STREAM_FUSED = "fused"  # merge_raw: read from the mapped files, written in the output dtype
STREAM_TENSOR = "tensor"  # one tensor's base and T task vectors in the compute dtype at a time
STREAM_UNIT = "unit"  # merge_unit overridden: a whole unit's inputs at once


def stream_unit_bytes(sizes: list[tuple[int, int, int]], T: int, cb: int, stream: str, scratch: int = 0,
                      working: float = 2.0) -> int:
    """Peak bytes of a non-BMM method's tensors while one unit is merged; `sizes`: (elements, output
    bytes per element, the method's extra_bytes) per tensor. The write-behind may still hold the
    previous unit's output, counted as one more unit's output. fused: each tensor's output plus `scratch`
    bytes per element (the method's raw_scratch_bytes); tensor: base + T task vectors + `working` more
    copies (the method's working_copies) of a tensor in the compute dtype + its extra bytes, the largest
    such; unit: that for every tensor at once."""
    if not sizes:
        return 0
    out = sum(n * ob for n, ob, _ in sizes)
    if stream == STREAM_FUSED:
        return 2 * out + max(n * scratch for n, _, _ in sizes)
    copies = T + 1 + working
    if stream == STREAM_TENSOR:
        return int(2 * out + max(copies * n * cb + x for n, _, x in sizes))
    return int(2 * out + sum(copies * n * cb + x for n, _, x in sizes))


def bmm_unit_bytes(shapes: list[tuple[tuple[int, ...], bool]], T: int, cb: int, sb: int, module_stream: bool,
                   gb: int = 0) -> int:
    """Peak bytes of BMM's tensors while one unit is merged; `shapes`: (shape, is_linear) per tensor.

    Per module: base + T task vectors in the compute dtype ((T+1) n cb), the anchor U0 (n cb), G and
    C in the statistics dtype, and the larger of the statistics' temporaries (one task vector cast
    to the statistics dtype, one d x d Gram, d the smaller side by the association grams.py picks) and
    the in-place solve's (U0 in the statistics dtype and the result). `module_stream`: the pipeline
    hands BMM one module at a time (merges_by_module), so one module's inputs are resident; else the
    whole unit's inputs and every module's statistics are (the statistics are all computed before
    the solves start). `gb`: bytes per element of the T per-task calibration Grams a data-assisted
    module holds (0: data-free)."""
    def parts(shape, linear):
        n = 1
        for x in shape:
            n *= x
        inputs = (T + 1) * n * cb
        if not linear:
            return inputs, 0, 2 * n * cb  # the anchor's value and the weight built from it
        d_out, d_in = shape[0], n // shape[0]
        stats = (d_in * d_in + d_out * d_in) * sb + T * d_in * d_in * gb
        cast = d_out * d_in * sb if sb != cb else 0
        gram = (d_out * d_out if c_via_outer(d_out, d_in) else d_in * d_in) * sb
        temps = d_out * d_in * cb + max(cast + gram, d_out * d_in * (sb + cb))
        return inputs, stats, temps

    ps = [parts(sh, lin) for sh, lin in shapes]
    if not ps:
        return 0
    if module_stream:
        return max(i + s + t for i, s, t in ps)
    return sum(i for i, _, _ in ps) + sum(s for _, s, _ in ps) + max(t for _, _, t in ps)


def calibration_flops(layer_params: int, site_dims: list[int], tokens: int) -> float:
    """One expert's calibration forward: 2 FLOP per weight per token through the layer stack, plus
    the X^T X accumulation at each input site (attention scores are left out: short sequences)."""
    return 2.0 * layer_params * tokens + sum(2.0 * tokens * d * d for d in site_dims)


def estimate_report(
    plan: Plan,
    infos: dict[str, TensorInfo],
    *,
    experts: int,
    compute_bytes: int,
    statistics_bytes: int,
    method: str,
    method_description: dict,
    statistics: str,
    needs_prepass: bool,
    out_bytes: int,
    calibration_tokens: list[int] | None,
    keep_statistics: bool,
    device: torch.device,
    module_stream: bool = True,
    stream: str = STREAM_UNIT,
    out_element_bytes: dict[str, int] | None = None,
    raw_scratch_bytes: int = 0,
    working_copies: float = 2.0,
    extra_bytes: dict[str, int] | None = None,
    work: dict[str, dict[str, float]] | None = None,
    rates: dict[str, float] | None = None,
) -> dict:
    """The `bmm plan` report from the plan and the headers: no weight is read.

    `calibration_tokens` holds each expert's calibration token budget (samples x max_len) when the
    method needs data-assisted Grams, else None. `module_stream`: the pipeline merges BMM one module
    at a time (BMM declares merges_by_module, pipeline._merge_stream honours it; see bmm_unit_bytes). BMM's FLOPs are timed at the statistics dtype's matmul rate.
    `stream`, `out_element_bytes` and `extra_bytes` (per tensor name), `raw_scratch_bytes` and
    `working_copies`: how any other method merges (stream_unit_bytes). `work`: per tensor name, the
    method's compute_work; the general path's task vectors are added here; timed at `rates` (work per
    second by kind; measured by measure_rates when None)."""
    T = experts
    cb, sb = compute_bytes, statistics_bytes
    # calibration Grams: float64 with BMM's float64 statistics (statistics/data_assisted.gram_dtype)
    gb = 0 if calibration_tokens is None else 8 if method == "bmm" and sb == 8 else 4
    by_name = plan.by_name()
    peak_ram = stats_peak = stats_total = flops = 0.0
    for names in plan.units:
        params = sum(infos[n].numel for n in names)
        stats = sum(
            (by_name[n].matrix_shape[1] ** 2 + by_name[n].matrix_shape[0] * by_name[n].matrix_shape[1]) * sb
            for n in names
            if by_name[n].kind == "linear"
        ) if method == "bmm" else 0
        if method == "bmm":
            shapes = [(tuple(infos[n].shape if by_name[n].kind != "linear" else by_name[n].matrix_shape),
                       by_name[n].kind == "linear") for n in names]
            unit = MERGE_RUNTIME_BYTES + bmm_unit_bytes(shapes, T, cb, sb, module_stream, gb)
        else:
            sizes = [(infos[n].numel, (out_element_bytes or {}).get(n, cb), (extra_bytes or {}).get(n, 0))
                     for n in names]
            unit = MERGE_RUNTIME_BYTES + stream_unit_bytes(sizes, T, cb, stream, raw_scratch_bytes, working_copies)
        peak_ram = max(peak_ram, unit)
        stats_peak = max(stats_peak, stats)
        stats_total += stats
        flops += sum(
            module_flops(*by_name[n].matrix_shape, T, method, statistics) for n in names if by_name[n].kind == "linear"
        )
    in_bytes = sum(i.nbytes for i in infos.values())
    passes = 2 if needs_prepass else 1
    read_bytes = (T + 1) * in_bytes * passes
    calib_flops = gram_disk = 0.0
    if calibration_tokens is not None:
        layer_params = sum(infos[m.name].numel for m in plan.modules if m.layer is not None)
        sites = {(m.layer, m.group): m.matrix_shape[1] for m in plan.modules if m.layer is not None and m.kind == "linear"}
        for tokens in calibration_tokens:
            calib_flops += calibration_flops(layer_params, list(sites.values()), tokens)
        gram_disk = T * sum(d * d for d in sites.values()) * (gb or 4)  # one Gram per expert and input site
        read_bytes += T * in_bytes
    fps = measure_flops(device, dtype=torch.float64 if method == "bmm" and sb == 8 else torch.float32)
    totals = dict.fromkeys(WORK_KINDS, 0.0)
    for name, w in (work or {}).items():
        for kind, amount in w.items():
            totals[kind] += amount
    if method != "bmm" and stream != STREAM_FUSED:  # the general path builds T float32 task vectors per tensor
        totals["task_vectors"] += float(T * sum(i.numel for i in infos.values()))
    needed = {k for k, v in totals.items() if v > 0}
    rates = dict(rates) if rates is not None else measure_rates(device, needed)
    work_seconds = {k: totals[k] / rates[k] for k in sorted(needed)}
    return {
        "family": plan.family,
        "layers": plan.num_layers,
        "blocks": [[r.start, r.stop - 1] for r in split_blocks(plan.num_layers, plan.num_blocks)] if plan.num_layers else [],
        "experts": T,
        "method": method_description,
        "counts": {
            "kinds": dict(Counter(m.kind for m in plan.modules)),
            "groups": dict(Counter(m.group for m in plan.modules if m.kind == "linear")),
        },
        "modules": [
            {"name": m.name, "shape": list(m.shape), "kind": m.kind, "group": m.group, "layer": m.layer, "block": m.block}
            for m in plan.modules
        ],
        "estimate": {
            "device": str(device),
            "peak_ram_bytes": int(peak_ram),
            "output_bytes": int(out_bytes),
            # a run that reads no statistics back keeps none (statistics/store.py StatsStore.for_run)
            "stats_disk_bytes": int((stats_total if keep_statistics else stats_peak if calibration_tokens is not None else 0)
                                    + gram_disk),
            "read_bytes": int(read_bytes),
            "flops": float(flops + calib_flops),
            "calibration_flops": float(calib_flops),
            "measured_flops_per_s": fps,
            "assumed_read_bytes_per_s": READ_BANDWIDTH,
            "method_work": {k: totals[k] for k in sorted(needed)},
            "measured_work_per_s": {k: rates[k] for k in sorted(needed)},
            "method_work_seconds": work_seconds,
            "seconds": (flops + calib_flops) / fps + read_bytes / READ_BANDWIDTH + sum(work_seconds.values()),
        },
    }


# -- `bmm search` (issue 12): out-of-core search memory, statistics store and time per trial -------
# python + torch + transformers + zarr + nevergrad (470 MiB after imports) plus what the statistics pass
# holds beyond the terms below: peak RSS minus them at hidden 512, 4 and 16 layers (bench/search_memory.py)
RUNTIME_BYTES = 700 * 2**20
FACTOR_READ_BANDWIDTH = 1.5e9  # bytes/s reading factors back from the Zarr store (page cache; measured, hidden 512)
# bytes/s of the assembly's elementwise passes, first touch of W_pre's mapped pages included (cpu: measured
# 0.5-1.4e9 on 2 shared cores at hidden 512 while the prefetch thread competes, 13e9 at hidden 2048;
# cuda: assumed H100-class)
MEMORY_BANDWIDTH = {"cpu": 2.0e9, "cuda": 1.5e12}


def search_estimate(
    plan: Plan,
    infos: dict[str, TensorInfo],
    *,
    experts: int,
    compute_bytes: int,
    statistics_bytes: int,
    factor_bytes: int,
    keep_base: bool,
    device: torch.device,
    flops_per_s: float,
    rank_fraction: float = 1.0,
    hybrid: bool = False,
    proxy_flops: float = 0.0,
) -> dict:
    """Estimates for the out-of-core search (search/run.py): what the statistics store holds on disk
    (G and C, plus every module's factors e, Q_k, A_k, U0), the peak host and device memory (one
    resident model + the larger of the statistics pass's unit working set and a trial's two units of
    factors), and the seconds per trial (factor reads + one matmul per module + the elementwise
    assembly + the proxy evaluation, counted without overlap). `rank_fraction` is k / d_in (1: exact
    factors; an energy target only lowers k, so 1 is an upper bound)."""
    T, cb, sb, fb = experts, compute_bytes, statistics_bytes, factor_bytes
    by_name = plan.by_name()
    model_bytes = sum(i.numel for i in infos.values()) * cb
    base_bytes = stats_disk = factor_disk = 0
    resolve_flops = assemble_bytes = 0.0
    unit_factors, stats_ws = [], 0
    for names in plan.units:
        lin = [by_name[n] for n in names if by_name[n].kind == "linear"]
        params = sum(infos[n].numel for n in names)
        held = 0
        big = 0
        for m in lin:
            d_out, d_in = m.matrix_shape[0], m.matrix_shape[-1]
            k = max(1, min(d_in, int(round(rank_fraction * d_in))))
            base_bytes += d_out * d_in * cb
            stats_disk += (d_in * d_in + d_out * d_in) * sb
            if hybrid:
                fdisk = 2 * (d_in * d_in + d_out * d_in) * sb + d_out * d_in * cb
                fmem = fdisk
                resolve_flops += d_in**3 / 3.0 + 2.0 * d_in * d_in * d_out
            else:
                fdisk = 8 * (k + 1) + (d_in * k + d_out * k) * fb + d_out * d_in * cb
                fmem = 8 * (k + 1) + (d_in * k + d_out * k + d_out * d_in) * cb
                resolve_flops += 2.0 * d_out * k * d_in
            factor_disk += fdisk
            held += fmem
            assemble_bytes += 5.0 * d_out * d_in * cb  # A diag(inv), U0 +, s U, W_pre +, copy into the model
            # factoring one module: G, C, U0 in the statistics dtype, Q, A and their products
            big = max(big, (3 * d_in * d_in + 4 * d_out * d_in) * sb)
        stats_ws = max(stats_ws, (T + 3) * params * cb + big)
        if lin:
            unit_factors.append((held, sum(infos[m.name].numel for m in lin) * cb,
                                 max(m.matrix_shape[0] * m.matrix_shape[-1] for m in lin) * cb))
    trial_ws = 0
    for i, (held, unit_base, big) in enumerate(unit_factors):
        nxt = unit_factors[i + 1][0] if i + 1 < len(unit_factors) else 0
        trial_ws = max(trial_ws, held + nxt + (0 if keep_base else 2 * unit_base) + 3 * big)
    resident = model_bytes + (base_bytes if keep_base else 0)
    working = max(stats_ws, trial_ws)
    on_device = device.type != "cpu"
    stream = factor_disk / FACTOR_READ_BANDWIDTH + (0 if keep_base else base_bytes / READ_BANDWIDTH)
    bandwidth = MEMORY_BANDWIDTH.get(device.type, MEMORY_BANDWIDTH["cpu"])
    seconds = {"stream": stream, "resolve": resolve_flops / flops_per_s, "assemble": assemble_bytes / bandwidth,
               "score": proxy_flops / flops_per_s}
    return {
        "keep_base": keep_base,
        "stats_disk_bytes": int(stats_disk + factor_disk),
        "factor_disk_bytes": int(factor_disk),
        "model_bytes": int(model_bytes),
        "peak_host_bytes": int(RUNTIME_BYTES + (0 if on_device else resident + working)),
        "peak_device_bytes": int(resident + working) if on_device else None,
        "trial_seconds": seconds,
        "trial_seconds_total": float(sum(seconds.values())),
        "assumed": {"runtime_bytes": RUNTIME_BYTES, "factor_read_bytes_per_s": FACTOR_READ_BANDWIDTH,
                    "memory_bytes_per_s": bandwidth, "flops_per_s": flops_per_s},
    }
