"""External anchor: an already merged checkpoint (a local model folder; Hub ids once sources support
them) used as the merge result, U = W_ext - W_pre per tensor.

Meant as BMM's anchor for merges made elsewhere (mergekit, FusionBench, a paper's release), and
usable alone (it then rewrites that checkpoint, in the output dtype, with bmmstream's card).
Every tensor kind is taken from the checkpoint as is. The checkpoint is opened lazily on the first
tensor and read tensor by tensor, so it streams like the experts; the pipeline validates it up front.
"""
from __future__ import annotations

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register


@register
class External(MergeMethod):
    name = "external"
    defaults = {"path": None}

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        if not self.params["path"]:
            raise BmmError("merge method 'external': parameter 'path' (the merged checkpoint) is required")
        self._source = None
        self._infos = None

    def source(self):
        if self._source is None:
            from bmmstream.sources import open_source

            self._source = open_source(str(self.params["path"]))
            self._infos = self._source.tensor_infos()
        return self._source

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        src = self.source()
        name = inp.spec.name
        path = self.params["path"]
        if name not in self._infos:
            raise BmmError(f"{path}: external checkpoint has no tensor '{name}'")
        shape = tuple(self._infos[name].shape)
        if inp.spec.transposed:  # stored (d_in, d_out) like the base; methods see (d_out, d_in)
            shape = tuple(reversed(shape))
        if shape != tuple(inp.base.shape):
            raise BmmError(
                f"{path}: tensor '{name}' has shape {list(shape)}, the base model has {list(inp.base.shape)}"
            )
        w = src.get(name).to(device=inp.base.device, dtype=inp.base.dtype)
        src.release([name])
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):  # would pass into every merged weight
            raise BmmError(f"{path}: tensor '{name}' contains NaN or Inf values")
        if inp.spec.transposed:
            w = w.T
        return w - inp.base

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
