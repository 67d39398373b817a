"""Peak memory and speed of the streaming calibration pass (bmmstream.statistics.capture) at two depths.

Two random Llama checkpoints with the same layer shape and 4x different depth are written to a temp
folder; each calibration runs in a fresh subprocess (so imports and allocator state do not leak
between them), which reports its peak RSS (VmHWM), its peak anonymous RSS (RssAnon sampled every
5 ms: the part that is not clean file-backed mmap pages of the checkpoint) and the tokens/s of the
pass. The streaming design must keep peak RSS at the deeper model within 1.15x of the shallow one.
`--full` adds, for contrast, the same statistics from one in-memory forward of the whole model
(transformers from_pretrained + hooks), which grows with depth.

    nice -n 10 python bench/calibration_memory.py            # 2 vs 8 layers, hidden 512
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LIMIT = 1.15


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _AnonPeak:
    """Samples RssAnon in a thread (the kernel keeps no high-water mark for it)."""

    def __init__(self, every: float = 0.005):
        self.peak = _status_kb("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("RssAnon"))
            time.sleep(every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status_kb("RssAnon"))


def _batches(args, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, args.samples, args.batch):
        b = min(args.batch, args.samples - start)
        ids = torch.randint(1, vocab, (b, args.seq), generator=g)
        mask = torch.ones(b, args.seq, dtype=torch.long)
        lens = torch.randint(args.seq // 2, args.seq + 1, (b,), generator=g)
        for r, n in enumerate(lens.tolist()):
            mask[r, n:] = 0
            ids[r, n:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def child(args) -> None:
    """Run one calibration pass and print a JSON line with its figures."""
    import torch

    torch.set_num_threads(args.threads)
    from bmmstream.statistics.capture import collect_input_grams
    from bmmstream.sources.local import LocalSource

    src = LocalSource(args.child)
    batches = _batches(args, src.config()["vocab_size"])
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    before = _status_kb("VmRSS")
    kept = {"layers": 0, "bytes": 0}

    def on_layer(i, grams):
        kept["layers"] += 1
        kept["bytes"] += sum(g.numel() * g.element_size() for g, _ in {id(v[0]): v for v in grams.values()}.values())

    with _AnonPeak() as anon:
        t0 = time.perf_counter()
        if args.mode == "stream":
            collect_input_grams(src, batches, dtype=torch.float32, on_layer=on_layer)
        else:
            _full_forward(args.child, batches)
        dt = time.perf_counter() - t0
    print(json.dumps({
        "mode": args.mode,
        "layers": src.config()["num_hidden_layers"],
        "rss_before_mb": before / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "peak_anon_mb": anon.peak / 1024,
        "tokens": tokens,
        "seconds": dt,
        "tokens_per_s": tokens / dt,
    }))


def _full_forward(folder: str, batches) -> None:
    """The non-streaming contrast: whole model in memory, hooks on every linear."""
    import torch
    from torch import nn
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    acc = {}
    cur = {}

    def hook(mod, inp, _o, name=None):
        x = inp[0].reshape(-1, inp[0].shape[-1])[cur["mask"].reshape(-1)]
        if name not in acc:
            acc[name] = torch.zeros(x.shape[1], x.shape[1])
        acc[name].addmm_(x.T, x)

    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
    with torch.no_grad():
        for b in batches:
            cur["mask"] = b["attention_mask"].bool()
            model(**b, use_cache=False)


def _make(folder: Path, layers: int, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(layers)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
        num_hidden_layers=layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=max(256, args.seq), pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs=2, default=[2, 8])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also measure a whole-model in-memory forward")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    shallow, deep = args.depths
    print(f"# Llama hidden={args.hidden} inter={args.inter} vocab={args.vocab}; "
          f"{args.samples} samples x <= {args.seq} tokens, batch {args.batch}, fp32, CPU, {args.threads} threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in (shallow, deep):
            _make(Path(tmp) / f"L{d}", d, args)
        modes = ["stream"] + (["full"] if args.full else [])
        for mode in modes:
            for d in (shallow, deep):
                cmd = [sys.executable, __file__, "--child", str(Path(tmp) / f"L{d}"), "--mode", mode]
                for k in ("hidden", "inter", "vocab", "samples", "seq", "batch", "threads"):
                    cmd += [f"--{k}", str(getattr(args, k))]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'mode':7} {'layers':>6} {'rss_before_MB':>13} {'peak_rss_MB':>11} {'peak_anon_MB':>12} {'tokens':>7} {'s':>7} {'tok/s':>8} {'tok*layers/s':>12}")
    for r in rows:
        print(f"{r['mode']:7} {r['layers']:6d} {r['rss_before_mb']:13.1f} {r['peak_rss_mb']:11.1f} "
              f"{r['peak_anon_mb']:12.1f} {r['tokens']:7d} {r['seconds']:7.2f} {r['tokens_per_s']:8.0f} {r['tokens_per_s'] * r['layers']:12.0f}")
    ok = True
    for mode in ("stream", "full"):
        rs = [r for r in rows if r["mode"] == mode]
        if len(rs) != 2:
            continue
        ratio = rs[1]["peak_rss_mb"] / rs[0]["peak_rss_mb"]
        anon = rs[1]["peak_anon_mb"] / rs[0]["peak_anon_mb"]
        print(f"{mode}: peak RSS ratio {deep}/{shallow} layers = {ratio:.3f}, peak anon ratio = {anon:.3f}"
              + (f" (limit {LIMIT})" if mode == "stream" else " (contrast, no limit)"))
        if mode == "stream" and ratio > LIMIT:
            ok = False
    if not ok:
        print(f"FAIL: streaming calibration peak RSS grows more than {LIMIT}x with 4x depth")
        sys.exit(1)


if __name__ == "__main__":
    main()
