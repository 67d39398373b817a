"""`bmm plan`: what a merge will do and cost, from the headers alone, before any heavy work.

Time is estimated from a measured matmul throughput on the chosen device and an assumed read
bandwidth (local disk 1 GB/s; say so in the report, as it varies most). Runs that need calibration
Grams add one forward of each expert over its calibration data, counted at its upper bound
(samples x max_len tokens, as padded batches run every position).
"""
from __future__ import annotations

import time
from collections import Counter

import torch

from bmmstream.plan.layout import Plan, split_blocks
from bmmstream.sources.base import TensorInfo

READ_BANDWIDTH = 1e9  # bytes/s assumed for local safetensors reads


def measure_flops(device: torch.device, n: int = 1024) -> float:
    """Sustained float32 matmul FLOP/s on `device` (a short, rough measurement)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    (a @ b).sum().item()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        (a @ b).sum().item()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def module_flops(d_out: int, d_in: int, T: int, method: str, statistics: str = "data_free") -> float:
    if method != "bmm":
        return 0.0
    grams = 2.0 * T * d_out * d_in * d_in if statistics != "data_assisted" else 0.0
    c = 2.0 * T * d_out * d_in * d_in
    chol = d_in**3 / 3.0
    solve = 2.0 * d_in * d_in * d_out
    return grams + c + chol + solve


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
    method: str,
    method_description: dict,
    statistics: str,
    needs_prepass: bool,
    out_bytes: int,
    calibration_tokens: list[int] | None,
    keep_statistics: bool,
    device: torch.device,
) -> dict:
    """The `bmm plan` report from the plan and the headers: no weight is read.

    `calibration_tokens` holds each expert's calibration token budget (samples x max_len) when the
    method needs data-assisted Grams, else None."""
    T = experts
    cb = compute_bytes
    by_name = plan.by_name()
    peak_ram = stats_peak = stats_total = flops = 0.0
    for names in plan.units:
        params = sum(infos[n].numel for n in names)
        stats = sum(
            (by_name[n].shape[1] ** 2 + by_name[n].shape[0] * by_name[n].shape[1]) * cb
            for n in names
            if by_name[n].kind == "linear"
        ) if method == "bmm" else 0
        peak_ram = max(peak_ram, (T + 3) * params * cb + stats)
        stats_peak = max(stats_peak, stats)
        stats_total += stats
        flops += sum(
            module_flops(*by_name[n].shape, T, method, statistics) for n in names if by_name[n].kind == "linear"
        )
    in_bytes = sum(i.nbytes for i in infos.values())
    passes = 2 if needs_prepass else 1
    read_bytes = (T + 1) * in_bytes * passes
    calib_flops = 0.0
    if calibration_tokens is not None:
        layer_params = sum(infos[m.name].numel for m in plan.modules if m.layer is not None)
        sites = {(m.layer, m.group): m.shape[1] for m in plan.modules if m.layer is not None and m.kind == "linear"}
        for tokens in calibration_tokens:
            calib_flops += calibration_flops(layer_params, list(sites.values()), tokens)
        read_bytes += T * in_bytes
    fps = measure_flops(device)
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
            "stats_disk_bytes": int(stats_total if keep_statistics else stats_peak),
            "read_bytes": int(read_bytes),
            "flops": float(flops + calib_flops),
            "calibration_flops": float(calib_flops),
            "measured_flops_per_s": fps,
            "assumed_read_bytes_per_s": READ_BANDWIDTH,
            "seconds": (flops + calib_flops) / fps + read_bytes / READ_BANDWIDTH,
        },
    }
