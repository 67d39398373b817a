"""Per-module statistics persisted in a Zarr v3 store inside the run directory.

One group per module (named by its tensor name) holding its arrays (G, C, or input Grams), each
stored as a single chunk, uncompressed (float statistics do not compress and compression would
cost CPU on the hot path). A group's `complete` attribute is written after its arrays: a group
without it was interrupted and is recomputed, which is the completion record resume relies on.
bfloat16 (which numpy lacks) is stored as its int16 bit pattern with a `torch_dtype` attribute.
The search's per-module spectral factors live here too, under `factor_key(name)`.

`StatsStore.for_run` picks the backing: a merge that never reads its statistics back (no
keep_statistics, no search, no calibration Grams) gets a transient store that keeps nothing, so its
G and C go straight from the statistics to the solve without a Zarr write and read; a resumed run
recomputes them (per unit, deterministically), so the output stays bit-identical.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr


def factor_key(name: str) -> str:
    """Group of a module's search factors (e, Q, A, U0 or the hybrid ends), next to its G and C."""
    return f"{name}@factors"


class StatsStore:
    def __init__(self, path: Path | None):
        """A Zarr store at `path`, or (None) a transient one: put keeps nothing and has() is False."""
        self.path = None if path is None else Path(path)
        self._root = None if path is None else zarr.open_group(str(self.path), mode="a", zarr_format=3)

    @classmethod
    def for_run(cls, path: Path, *, needs_grams: bool, keep_statistics: bool, search: bool) -> "StatsStore":
        """The run's store: on disk at `path` when something reads the statistics back (the calibration
        Grams, keep_statistics, a search's final merge reusing the search's G and C), else transient."""
        return cls(path if needs_grams or keep_statistics or search else None)

    @property
    def transient(self) -> bool:
        return self._root is None

    def has(self, key: str) -> bool:
        if self._root is None:
            return False
        try:
            return bool(self._root[key].attrs.get("complete", False))
        except KeyError:
            return False

    def put(self, key: str, arrays: dict[str, torch.Tensor], attrs: dict | None = None) -> None:
        if self._root is None:  # transient: the caller uses its own tensors
            return
        if key in self._root:
            del self._root[key]
        g = self._root.create_group(key)
        for name, t in arrays.items():
            t = t.detach().to("cpu")
            bf16 = t.dtype == torch.bfloat16
            a = (t.view(torch.int16) if bf16 else t).numpy()
            arr = g.create_array(name, shape=a.shape, chunks=a.shape, dtype=a.dtype, compressors=None)
            arr[...] = a
            if bf16:
                arr.attrs["torch_dtype"] = "bfloat16"
        g.attrs.update({**(attrs or {}), "complete": True})

    def get(self, key: str, device: torch.device | str = "cpu", names: tuple[str, ...] | None = None
            ) -> dict[str, torch.Tensor]:
        """The group's arrays (only those in `names` when given; absent names are left out)."""
        if self._root is None:
            raise KeyError(key)
        g = self._root[key]
        out = {}
        for name, arr in g.arrays():
            if names is not None and name not in names:
                continue
            t = torch.from_numpy(np.asarray(arr[...]))
            if arr.attrs.get("torch_dtype") == "bfloat16":
                t = t.view(torch.bfloat16)
            out[name] = t.to(device)
        return out

    def nbytes(self, key: str) -> int:
        """Bytes of a group's arrays as stored (uncompressed)."""
        if self._root is None:
            raise KeyError(key)
        return sum(int(np.prod(arr.shape)) * arr.dtype.itemsize for _, arr in self._root[key].arrays())

    def mark_complete(self, key: str) -> None:
        """Completion record for a group filled piece by piece (e.g. one expert's Grams)."""
        if self._root is None:
            raise ValueError("a transient statistics store keeps no groups")
        g = self._root.require_group(key)
        g.attrs["complete"] = True

    def attrs(self, key: str) -> dict:
        if self._root is None:
            raise KeyError(key)
        return dict(self._root[key].attrs)

    def drop(self, key: str) -> None:
        if self._root is not None and key in self._root:
            del self._root[key]

    def keys(self) -> list[str]:
        return [] if self._root is None else sorted(self._root.group_keys())
