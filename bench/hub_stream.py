"""Hub streaming throughput against a plain download, and how much download time prefetch hides.

Serves a synthetic Llama-shaped checkpoint from tools/hub_server.py (a separate process, so server and
client do not share a GIL) on 127.0.0.1 and measures:

1. sequential: `hf_hub_download(force_download=True)` of model.safetensors (one GET of the whole file);
2. stream: HubSource reading unit by unit (prefetch next unit, get, release) under --max-disk, no compute;
   ratio = stream throughput / sequential throughput (same tensor bytes);
3. hiding: the same loop with simulated compute (sleep) per unit, once without prefetch ahead (each unit
   is queued only when it is needed, so every get waits for its bytes; same coalesced requests) and
   once with the next unit prefetched while the current one computes;
   hidden = 1 - wait_with_prefetch / wait_without_prefetch, where wait is the time spent inside get().

    nice python bench/hub_stream.py --size-mb 96 --layers 8 [--bandwidth-mbps 100]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

MB = 1 << 20


def make_model(folder: Path, size_mb: int, layers: int) -> None:
    """Llama-named fp32 tensors: embed + per layer q,k,v,o,gate,up,down + norms, about size_mb in all."""
    folder.mkdir(parents=True, exist_ok=True)
    # per layer: 4 h^2 (attn) + 3 h*i (mlp) with i = 2h  -> 10 h^2 floats; embed = vocab x h
    vocab = 1024
    h = int(((size_mb * MB / 4) / (10 * layers)) ** 0.5) // 8 * 8
    i = 2 * h
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.rand(vocab, h, generator=g)}
    for li in range(layers):
        p = f"model.layers.{li}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = torch.rand(h, h, generator=g)
        t[p + "mlp.gate_proj.weight"] = torch.rand(i, h, generator=g)
        t[p + "mlp.up_proj.weight"] = torch.rand(i, h, generator=g)
        t[p + "mlp.down_proj.weight"] = torch.rand(h, i, generator=g)
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
    t["model.norm.weight"] = torch.ones(h)
    save_file(t, folder / "model.safetensors")
    cfg = {"model_type": "llama", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
           "vocab_size": vocab}
    (folder / "config.json").write_text(json.dumps(cfg))


def start_server(root: Path, bandwidth: float) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(ROOT / "tools" / "hub_server.py"), "--root", str(root), "--port", "0"]
    if bandwidth:
        cmd += ["--bandwidth", str(bandwidth)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    return proc, url


def stream(spec: str, endpoint: str, spool: Path, max_disk: int | None, compute_s: float, prefetch: bool):
    """One pass over all units; returns (seconds, seconds waiting in get(), bytes, high water)."""
    from bmmstream.plan.layout import build_plan
    from bmmstream.sources.hub import HubSource

    src = HubSource(spec, endpoint=endpoint, cache_dir=spool, max_disk=max_disk, hf_cache_dir=spool / "hf")
    units = [u for u in build_plan(src.config(), src.tensor_infos()).units if u]
    before = src.bytes_downloaded
    wait = 0.0
    t0 = time.perf_counter()
    for k, names in enumerate(units):
        if not prefetch:
            src.prefetch(names)  # same coalesced requests, but nothing runs ahead of the consumer
        elif k + 1 < len(units):
            src.prefetch(units[k + 1])
        for n in names:
            w = time.perf_counter()
            src.get(n)
            wait += time.perf_counter() - w
        if compute_s:
            time.sleep(compute_s)
        src.release(names)
    total = time.perf_counter() - t0
    nbytes, hw = src.bytes_downloaded - before, src.high_water_bytes
    src.close()
    return total, wait, nbytes, hw, len(units)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=96)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bandwidth-mbps", type=float, default=0.0, help="server-side cap per response, MB/s")
    ap.add_argument("--max-disk-mb", type=float, default=None, help="default: a third of the model")
    ap.add_argument("--repeat", type=int, default=2, help="take the best of N runs of each measurement")
    a = ap.parse_args()

    from huggingface_hub import hf_hub_download

    work = Path(tempfile.mkdtemp(prefix="bmm-bench-hub-"))
    proc = None
    try:
        make_model(work / "root" / "bench" / "model", a.size_mb, a.layers)
        size = (work / "root" / "bench" / "model" / "model.safetensors").stat().st_size
        max_disk = int(a.max_disk_mb * MB) if a.max_disk_mb else size // 3
        proc, url = start_server(work / "root", a.bandwidth_mbps * MB)

        seq = []
        for r in range(a.repeat):
            t0 = time.perf_counter()
            hf_hub_download("bench/model", "model.safetensors", endpoint=url, cache_dir=work / f"seq{r}",
                            force_download=True)
            seq.append(time.perf_counter() - t0)
            shutil.rmtree(work / f"seq{r}")
        t_seq = min(seq)

        runs = [stream("bench/model", url, work / f"s{r}", max_disk, 0.0, True) for r in range(a.repeat)]
        t_stream, _, nbytes, hw, n_units = min(runs)
        compute = t_stream / n_units  # per-unit compute matched to per-unit download time
        serial = min(stream("bench/model", url, work / f"n{r}", max_disk, compute, False) for r in range(a.repeat))
        overlap = min(stream("bench/model", url, work / f"o{r}", max_disk, compute, True) for r in range(a.repeat))

        print(f"model file: {size / MB:.1f} MiB, {n_units} units, max_disk {max_disk / MB:.1f} MiB, "
              f"server bandwidth cap: {a.bandwidth_mbps or 'none'} MB/s")
        print(f"sequential download : {t_seq:6.3f} s  {size / MB / t_seq:8.1f} MiB/s")
        print(f"stream (no compute) : {t_stream:6.3f} s  {nbytes / MB / t_stream:8.1f} MiB/s  "
              f"high water {hw / MB:.1f} MiB")
        print(f"throughput ratio stream/sequential: {(nbytes / t_stream) / (size / t_seq):.2f}")
        print(f"simulated compute {compute * 1000:.1f} ms/unit ({n_units * compute:.3f} s in all)")
        print(f"  no prefetch ahead: total {serial[0]:6.3f} s, waiting in get() {serial[1]:6.3f} s")
        print(f"  prefetch next    : total {overlap[0]:6.3f} s, waiting in get() {overlap[1]:6.3f} s, "
              f"high water {overlap[3] / MB:.1f} MiB")
        print(f"download time hidden behind compute: {100 * (1 - overlap[1] / serial[1]):.0f}%")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
