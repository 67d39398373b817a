"""Per-module statistics persisted in a Zarr v3 store inside the run directory.

One group per module (named by its tensor name) holding its arrays (G, C, or input Grams), each
stored as a single chunk, uncompressed (float statistics do not compress and compression would
cost CPU on the hot path). A group's `complete` attribute is written after its arrays: a group
without it was interrupted and is recomputed, which is the completion record resume relies on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr


class StatsStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._root = zarr.open_group(str(self.path), mode="a", zarr_format=3)

    def has(self, key: str) -> bool:
        try:
            return bool(self._root[key].attrs.get("complete", False))
        except KeyError:
            return False

    def put(self, key: str, arrays: dict[str, torch.Tensor], attrs: dict | None = None) -> None:
        if key in self._root:
            del self._root[key]
        g = self._root.create_group(key)
        for name, t in arrays.items():
            a = t.detach().to("cpu").numpy()
            arr = g.create_array(name, shape=a.shape, chunks=a.shape, dtype=a.dtype, compressors=None)
            arr[...] = a
        g.attrs.update({**(attrs or {}), "complete": True})

    def get(self, key: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        g = self._root[key]
        return {name: torch.from_numpy(np.asarray(arr[...])).to(device) for name, arr in g.arrays()}

    def mark_complete(self, key: str) -> None:
        """Completion record for a group filled piece by piece (e.g. one expert's Grams)."""
        g = self._root.require_group(key)
        g.attrs["complete"] = True

    def attrs(self, key: str) -> dict:
        return dict(self._root[key].attrs)

    def drop(self, key: str) -> None:
        if key in self._root:
            del self._root[key]

    def keys(self) -> list[str]:
        return sorted(self._root.group_keys())
