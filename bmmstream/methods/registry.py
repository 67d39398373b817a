"""The method registry: adding a merge method is adding one file in bmmstream/methods/.

A method turns the stacked task vectors of one tensor into a merged task vector U, so that the
merged weight is W_pre + U. It never touches files: the pipeline streams tensors to it unit by
unit (a transformer layer at a time). A method that needs a look at the whole model first (TIES'
global threshold) sets `needs_prepass` and gets every tensor once through `prepass_observe`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bmmstream.errors import BmmError
from bmmstream.plan.layout import ModuleSpec


@dataclass
class ModuleInput:
    spec: ModuleSpec  # name, kind, group, layer, block
    base: torch.Tensor  # W_pre, compute dtype, on the compute device
    deltas: torch.Tensor  # [T, *shape]: U_t = W_t - W_pre, compute dtype, on the compute device
    # [T, d_in, d_in] per-task input Grams X_t X_t^T / n_t (data-assisted statistics), when collected
    grams: torch.Tensor | None = None


class MergeMethod:
    """Base class. Subclasses set `name`, `defaults`, and implement `merge`."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    needs_prepass: ClassVar[bool] = False

    def __init__(self, params: dict | None = None, *, seed: int = 0):
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise BmmError(
                f"merge method '{self.name}': unknown parameter(s) {unknown}; "
                f"known: {sorted(self.defaults)}"
            )
        self.params: dict[str, Any] = {**self.defaults, **params}
        self.seed = seed

    # -- optional first pass over the whole model ------------------------------------------
    def prepass_observe(self, inp: ModuleInput) -> None:
        """See every tensor once before merging (only if `needs_prepass`)."""

    def prepass_state(self) -> dict:
        """JSON-serialisable result of the prepass, stored in the run directory for resume."""
        return {}

    def load_prepass_state(self, state: dict) -> None:
        """Restore what `prepass_state` returned."""

    # -- merging ---------------------------------------------------------------------------
    def merge(self, inp: ModuleInput) -> torch.Tensor:
        """Merged task vector for one tensor: same shape as `inp.base`."""
        raise NotImplementedError

    def merge_unit(self, inputs: list[ModuleInput]) -> dict[str, torch.Tensor]:
        """Merge all tensors of one streaming unit; override to batch across tensors."""
        return {inp.spec.name: self.merge(inp) for inp in inputs}

    def describe(self) -> dict:
        """Method name and resolved parameters, for the model card and run record."""
        return {"method": self.name, "parameters": dict(self.params)}


_REGISTRY: dict[str, type[MergeMethod]] = {}
_LOADED = False


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import bmmstream.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("registry", "__init__") and not mod.name.startswith("_"):
            importlib.import_module(f"bmmstream.methods.{mod.name}")
    _LOADED = True


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[MergeMethod]:
    _load_all()
    if name not in _REGISTRY:
        raise BmmError(f"unknown merge method '{name}'; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_method(name: str, params: dict | None = None, *, seed: int = 0) -> MergeMethod:
    return method_class(name)(params, seed=seed)
