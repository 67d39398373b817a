"""Shared, general fixtures. Module-specific fixtures belong in the test file that uses them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def write_st_folder(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    shards: list[list[str]] | None = None,
    index: bool = True,
) -> Path:
    """A model folder from in-memory tensors: one model.safetensors, or `shards` (lists of names)
    as model-0000i-of-0000n.safetensors with an index (unless index=False)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if shards is None:
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
        return folder
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].clone().contiguous() for n in names}, folder / fname)
        weight_map.update({n: fname for n in names})
    if index:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return folder


@pytest.fixture
def st_folder():
    """Factory fixture: st_folder(path, tensors, config=None, shards=None, index=True) -> path."""
    return write_st_folder


@pytest.fixture(scope="session")
def tiny_llama_suite(tmp_path_factory):
    """A tiny synthetic Llama base + 3 experts (hidden 64, 2 layers, fp32), built once per session.

    Returns bmmstream.demo.SuiteInfo(base, experts, spec); spec.tensor(name, t) regenerates
    any tensor without reading files. Treat the folders as read-only.
    """
    from bmmstream.demo import make_llama_suite

    return make_llama_suite(tmp_path_factory.mktemp("tiny_llama"), num_experts=3)
