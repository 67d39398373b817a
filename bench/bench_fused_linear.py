"""Fused task-arithmetic kernel vs the general float32 path vs a warm read of the same bytes.

    python bench/bench_fused_linear.py [--experts 4] [--numel 50000000] [--threads 1 2] [--repeat 3]
                                       [--hugepages on|off|both] [--skip-general]
    (prints a line per thread count: warm read, fused kernel, general path, and whether the bytes agree;
    with --hugepages both, the fused merge with its output on 4 KiB pages and on huge pages, alternated)

Inputs are bf16 safetensors files (base + experts) in a temporary folder, memory-mapped like the
pipeline's sources; times are medians. "warm read" touches every input byte of the mapped files
with read() into one buffer (page cache warm), the floor of a merge that reads its inputs once.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import sys

import numba
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout without `pip install -e .`
from bmmstream.methods import hugepages
from bmmstream.methods.registry import ModuleInput, RawModule, get_method

HP_MIN = hugepages.MIN_BYTES
from bmmstream.plan.layout import ModuleSpec


def general(method, raw: RawModule, out_dtype):
    """The pipeline's path: float32 base and T task vectors (as _unit_inputs), merge, W, cast."""
    base = raw.base.to(torch.float32)
    assert bool(torch.isfinite(base).all())
    deltas = torch.empty((len(raw.experts), *base.shape), dtype=torch.float32)
    for t, e in enumerate(raw.experts):
        deltas[t].copy_(e)
        assert bool(torch.isfinite(deltas[t]).all())
        deltas[t] -= base
    return (base + method.merge(ModuleInput(raw.spec, base, deltas))).to(out_dtype)


def warm_read(paths, buf: bytearray) -> int:
    """Read every input file into one reused buffer (page cache warm): the issue's "warm read"."""
    got = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while (k := f.readinto(buf)) > 0:
                got += k
    return got


def timed(fn, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--numel", type=int, default=50_000_000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-general", action="store_true")
    ap.add_argument("--hugepages", choices=["on", "off", "both"], default="on",
                    help="outputs on huge-page-advised mappings (bmmstream.methods.hugepages), on 4 KiB pages "
                         "(off), or both side by side (alternated, --repeat each)")
    a = ap.parse_args()
    name = "model.layers.0.mlp.down_proj.weight"
    spec = ModuleSpec(name=name, shape=(a.numel,), kind="linear", group="mlp", layer=0, block=0, unit=1)
    with tempfile.TemporaryDirectory() as d:
        g = torch.Generator().manual_seed(0)
        base = (torch.randn(a.numel, generator=g) * 0.02).to(torch.bfloat16)
        paths = [Path(d) / "base.safetensors"]
        save_file({name: base}, paths[0])
        for i in range(a.experts):
            e = (base.float() + torch.randn(a.numel, generator=g) * 1e-3).to(torch.bfloat16)
            paths.append(Path(d) / f"e{i}.safetensors")
            save_file({name: e}, paths[-1])
            del e
        del base
        handles = [safe_open(str(p), framework="pt") for p in paths]
        ts = [h.get_tensor(name) for h in handles]
        raw = RawModule(spec, ts[0], ts[1:], [p.stem for p in paths])
        m = get_method("task_arithmetic", {"scale": 0.3})
        m.merge_raw(raw, torch.bfloat16)  # compile / load the cached kernel
        buf = bytearray(64 << 20)
        warm_read(paths, buf)
        gb = sum(t.numel() * t.element_size() for t in ts) / 1e9
        print(f"{a.experts} experts x {a.numel / 1e6:g}M bf16 elements: {gb:.2f} GB of input; medians of {a.repeat}")
        for th in a.threads:
            torch.set_num_threads(th)
            numba.set_num_threads(th)
            t_read = timed(lambda: warm_read(paths, buf), a.repeat)
            modes = ["off", "on"] if a.hugepages == "both" else [a.hugepages]
            t_fused = {mode: [] for mode in modes}
            for _ in range(a.repeat):  # alternated, so that both see the same machine
                for mode in modes:
                    hugepages.MIN_BYTES = HP_MIN if mode == "on" else 1 << 62
                    t_fused[mode].append(timed(lambda: m.merge_raw(raw, torch.bfloat16), 1))
            hugepages.MIN_BYTES = HP_MIN
            line = f"threads {th}: warm read {t_read:.3f} s ({gb / t_read:.1f} GB/s)"
            for mode in modes:
                t = statistics.median(t_fused[mode])
                line += f", fused (huge pages {mode}) {t:.3f} s ({t / t_read:.2f}x read)"
            t_fused = statistics.median(t_fused[modes[-1]])
            if not a.skip_general:
                t_gen = timed(lambda: general(m, raw, torch.bfloat16), a.repeat)
                same = torch.equal(m.merge_raw(raw, torch.bfloat16).view(torch.int16),
                                   general(m, raw, torch.bfloat16).view(torch.int16))
                line += f", general {t_gen:.3f} s ({t_gen / t_fused:.1f}x fused), bytes equal: {same}"
            print(line, flush=True)
        print(f"numba threading layer {numba.threading_layer()}")


if __name__ == "__main__":
    main()
