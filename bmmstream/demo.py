"""`bmm demo`: a self-contained merge on checkpoints the tool builds itself (no downloads)."""
from __future__ import annotations

from pathlib import Path

import yaml


def demo_config(base: Path, experts: list[Path]) -> dict:
    return {
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "merge_method": "bmm",
        "parameters": {
            "anchor": "task_arithmetic",
            "anchor_parameters": {"scale": 0.3},
            "statistics": "data_free",
            "rho": 0.01,
            "scale": 1.0,
            "blocks": 2,
        },
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "shard_size": "200KB",
    }


def run_demo(directory: Path, *, device: str = "auto", progress: bool = True) -> Path:
    from bmmstream.api import merge
    from bmmstream.synthetic import make_llama_suite

    directory = Path(directory)
    suite_dir = directory / "checkpoints"
    if not (suite_dir / "base" / "config.json").exists():
        suite = make_llama_suite(suite_dir, num_experts=3, hidden=64, intermediate=176, layers=4, vocab=256, seed=0)
        base, experts = suite.base, suite.experts
    else:
        base = suite_dir / "base"
        experts = sorted(p for p in suite_dir.iterdir() if p.name.startswith("expert"))
    cfg = demo_config(base, experts)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "merge.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return merge(cfg, out=directory / "merged", run_dir=directory / "run", device=device, progress=progress)
