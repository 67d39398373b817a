"""Build a synthetic Llama suite (base + T experts) on disk, e.g. for benchmarks.

    python tools/make_checkpoints.py --out /tmp/suite8 --layers 8 --hidden 512 --intermediate 1408 -T 5
    python tools/make_checkpoints.py --out /tmp/suite32 --layers 32 --hidden 512 --intermediate 1408 -T 5

Equal --hidden/--intermediate/--heads give equal layer shapes, so runs differing only in --layers
measure how cost scales with depth. Tensors are generated and written one at a time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bmmstream.demo import DTYPES, make_llama_suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder to create base/ and expert_*/ in")
    p.add_argument("-T", "--experts", type=int, default=3, help="number of experts (default 3)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--rank", type=int, default=4, help="rank of each expert's task vector per weight")
    p.add_argument("--noise", type=float, default=0.01,
                   help="dense noise std as a fraction of --delta-scale (default 0.01)")
    p.add_argument("--delta-scale", type=float, default=0.005,
                   help="entry RMS of the low-rank task vector (init std is 0.02)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=float, default=2048.0, help="max shard size in MiB")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    suite = make_llama_suite(
        a.out, num_experts=a.experts, hidden=a.hidden, intermediate=a.intermediate, layers=a.layers,
        heads=a.heads, kv_heads=a.kv_heads, vocab=a.vocab, rank=a.rank, noise=a.noise,
        delta_scale=a.delta_scale, dtype=a.dtype, seed=a.seed, shard_bytes=int(a.shard_mb * 2**20),
    )
    size = sum(f.stat().st_size for f in suite.base.glob("*.safetensors"))
    print(f"base:    {suite.base}  ({size / 2**20:.1f} MiB per model)")
    for e in suite.experts:
        print(f"expert:  {e}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
