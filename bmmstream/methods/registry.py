"""The method registry: adding a merge method is adding one file in bmmstream/methods/.

A method turns the stacked task vectors of one tensor into a merged task vector U, so that the
merged weight is W_pre + U. It never touches files: the pipeline streams tensors to it unit by
unit (a transformer layer at a time). A method that needs a look at the whole model first (TIES'
global threshold) sets `needs_prepass` and gets every tensor once through `prepass_observe`.

Parameters are declared in two places, as in mergekit: `defaults` (global, the config's
`parameters`; `aliases` maps other accepted names to them) and `tensor_parameters` (per model, the
config's `models[i].parameters`, e.g. `weight`, `density`). Both are checked when the method is
built, before any tensor is read: an unknown name, or a name and its alias together, is one
BmmError line. A method with an `anchor` (BMM) passes its anchor's per-model parameters on to it,
except `weight`, which its own statistics would ignore: that one is refused unless given to the
anchor explicitly as `models[i].parameters: {anchor: {weight: w}}`.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from bmmstream.config import model_parameter_problem
from bmmstream.errors import BmmError
from bmmstream.plan.layout import ModuleSpec

# (the model as the config names it, its per-model `parameters` mapping)
ModelParameters = tuple[str, Mapping[str, Any]]
# per-model parameters an anchored method (BMM) does not pass on implicitly: its statistics ignore them
NOT_FORWARDED = ("weight",)


@dataclass
class ModuleInput:
    spec: ModuleSpec  # name, kind, group, layer, block
    base: torch.Tensor  # W_pre, compute dtype, on the compute device
    deltas: torch.Tensor  # [T, *shape]: U_t = W_t - W_pre, compute dtype, on the compute device
    # [T, d_in, d_in] per-task input Grams X_t X_t^T / n_t (data-assisted statistics), when collected
    grams: torch.Tensor | None = None
    # per task (B_t [d_out, r_t], A_t [r_t, d_in]) with U_t = B_t A_t exactly (LoRA experts; rank 0 for
    # an unchanged tensor), when every expert has that form: statistics skip the dense U_t^T U_t
    factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class RawModule:
    """One tensor as the sources hold it: stored dtype and stored layout (no transpose), on the CPU,
    not copied (safetensors' memory-mapped tensors). For fused kernels that read bf16/fp16/fp32 inputs
    directly instead of materialising T float32 task vectors."""

    spec: ModuleSpec
    base: torch.Tensor
    experts: list[torch.Tensor]
    ids: list[str]  # source ids, base first then experts: for the NaN/Inf error message


class MergeMethod:
    """Base class. Subclasses set `name`, `defaults` (and `aliases`, `tensor_parameters`), and
    implement `merge`."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    aliases: ClassVar[dict[str, str]] = {}  # accepted other name -> global parameter
    tensor_parameters: ClassVar[dict[str, Any]] = {}  # per-model parameter -> default (None: the global one)
    needs_prepass: ClassVar[bool] = False
    def __init__(
        self, params: dict | None = None, *, seed: int = 0, models: Sequence[ModelParameters] | None = None
    ):
        """`models`: the config's (model, per-model parameters) pairs in expert order (None: none set)."""
        self.given_names: dict[str, str] = {}  # global parameter -> the name the user wrote, if an alias
        self.params: dict[str, Any] = {**self.defaults, **self._canonical(params)}
        self.seed = seed
        self.models: list[tuple[str, dict[str, Any]]] = [(str(m), dict(p or {})) for m, p in (models or [])]
        self._check_models()

    # -- parameters ------------------------------------------------------------------------
    def _canonical(self, params: dict | None) -> dict[str, Any]:
        """Aliases replaced by the parameter they name; unknown names refused."""
        params = dict(params or {})
        for canon in sorted(set(self.aliases.values())):
            names = [n for n in [canon, *sorted(a for a, c in self.aliases.items() if c == canon)] if n in params]
            if len(names) > 1:
                raise BmmError(
                    f"merge method '{self.name}': {' and '.join(repr(n) for n in names)} name the same "
                    f"parameter ('{canon}'); give one of them"
                )
            if names and names[0] != canon:
                params[canon] = params.pop(names[0])
                self.given_names[canon] = names[0]
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            alias_note = f"; aliases: {dict(sorted(self.aliases.items()))}" if self.aliases else ""
            raise BmmError(
                f"merge method '{self.name}': unknown parameter(s) {unknown}; "
                f"known: {sorted(self.defaults)}{alias_note}"
            )
        return params

    def finite(self, key: str) -> float:
        """A global parameter that must be a finite number (one BmmError line otherwise)."""
        v = self.params[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BmmError(f"merge method '{self.name}': {self.given(key)} must be a finite number, got {v!r}")
        return float(v)

    def flag(self, key: str) -> bool:
        """A global parameter that must be true or false."""
        v = self.params[key]
        if not isinstance(v, bool):
            raise BmmError(f"merge method '{self.name}': {self.given(key)} must be true or false, got {v!r}")
        return v

    def given(self, key: str) -> str:
        """The name the user gave a global parameter under (for error messages)."""
        return self.given_names.get(key, key)

    def _anchor_name(self) -> str | None:
        return str(self.params["anchor"]) if "anchor" in self.defaults and self.params.get("anchor") else None

    def accepted_model_parameters(self) -> list[str]:
        """Per-model parameter names this method accepts (its own, and what it passes to its anchor)."""
        names = set(self.tensor_parameters)
        anchor = self._anchor_name()
        if anchor is not None:
            names |= set(method_class(anchor).tensor_parameters) - set(NOT_FORWARDED)
            names.add("anchor")
        return sorted(names)

    def _check_models(self) -> None:
        """Refuse, in one line naming the model, any per-model parameter this method cannot use."""
        accepted = self.accepted_model_parameters()
        anchor = self._anchor_name()
        for i, (label, p) in enumerate(self.models):
            where = f"models[{i}] ({label})"
            for key in sorted(p):
                if key not in accepted:
                    why = ""
                    if anchor is not None and key in NOT_FORWARDED:
                        why = " (its statistics weigh every expert alike"
                        if key in method_class(anchor).tensor_parameters:
                            why += (f"; to weigh this expert in the anchor '{anchor}' only, write "
                                    f"parameters: {{anchor: {{{key}: ...}}}}")
                        why += ")"
                    raise BmmError(
                        f"{where}: parameter '{key}' is not used by merge method '{self.name}'{why}; "
                        f"per-model parameters: {accepted}"
                    )
                if key == "anchor":
                    if not isinstance(p[key], Mapping):
                        raise BmmError(f"{where}: parameter 'anchor' must be a mapping of the anchor's per-model parameters")
                    twice = sorted(set(p[key]) & set(p))
                    if twice:
                        raise BmmError(f"{where}: parameter '{twice[0]}' is given both directly and under 'anchor'; give it once")
                    problems = [model_parameter_problem(k, v) for k, v in p[key].items()]
                else:
                    problems = [model_parameter_problem(key, p[key])]
                for problem in problems:
                    if problem:
                        raise BmmError(f"{where}: {problem}")

    def anchor_models(self) -> list[ModelParameters]:
        """The per-model parameters an anchored method hands to its anchor."""
        out = []
        for label, p in self.models:
            q = {k: v for k, v in p.items() if k != "anchor" and k not in NOT_FORWARDED}
            q.update(p.get("anchor") or {})
            out.append((label, q))
        return out

    def model_values(self, key: str, default: float, count: int) -> list[float] | None:
        """Per-model values of tensor parameter `key` (None when no model sets it: the global rule)."""
        if not any(key in p for _, p in self.models):
            return None
        if len(self.models) != count:
            raise BmmError(
                f"merge method '{self.name}': {len(self.models)} models carry per-model parameters, "
                f"but {count} task vectors were given"
            )
        return [float(p.get(key, default)) for _, p in self.models]

    def per_model(self, key: str, count: int) -> list[float]:
        """Each model's value of tensor parameter `key`; the global parameter of that name where a model sets none."""
        default = float(self.params[key])
        return self.model_values(key, default, count) or [default] * count

    def model_weights(self, inp: "ModuleInput") -> torch.Tensor | None:
        """Per-model `weight` as a [T] tensor in the task vectors' dtype, or None when none is set."""
        w = self.model_values("weight", 1.0, int(inp.deltas.shape[0]))
        if w is None:
            return None
        return torch.tensor(w, dtype=inp.deltas.dtype, device=inp.deltas.device)

    # -- optional first pass over the whole model ------------------------------------------
    def prepass_observe(self, inp: ModuleInput) -> None:
        """See every tensor once before merging (only if `needs_prepass`)."""

    def prepass_state(self) -> dict:
        """JSON-serialisable result of the prepass, stored in the run directory for resume."""
        return {}

    def load_prepass_state(self, state: dict) -> None:
        """Restore what `prepass_state` returned."""

    def prepass_observe_raw(self, raw: RawModule) -> bool:
        """`prepass_observe` on the stored tensors; False when not supported (the pipeline then
        calls `prepass_observe` on the general ModuleInput)."""
        return False

    # -- merging ---------------------------------------------------------------------------
    def merge_raw(self, raw: RawModule, out_dtype: torch.dtype) -> torch.Tensor | None:
        """The merged WEIGHT (W_pre + U) in the stored layout and `out_dtype`, on the CPU, by a fused
        kernel reading the stored tensors; the same bytes as the general path (float32 compute). None:
        not supported here (method, tensor or dtype), the pipeline takes the general path."""
        return None

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        """Merged task vector for one tensor: same shape as `inp.base`."""
        raise NotImplementedError

    def fuses_raw(self) -> bool:
        """Whether merge_raw serves this configuration at all (`bmm plan`'s memory estimate; it may
        still decline single tensors)."""
        return type(self).merge_raw is not MergeMethod.merge_raw

    def raw_scratch_bytes(self, tasks: int) -> int:
        """Bytes per element of one tensor a merge_raw call may allocate beside its output (`bmm
        plan`'s memory estimate)."""
        return 0

    def extra_bytes(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> int:
        """Bytes beyond working_copies that `merge` holds for one tensor (`bmm plan`'s memory estimate):
        e.g. RegMean's input Grams."""
        return 0

    def compute_work(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> dict[str, float]:
        """Work `merge` does for one tensor beyond reading it and building its task vectors, by kind
        (`bmm plan`'s time estimate; plan/estimate.py times each kind at a rate it measures): "sort" /
        "sort_unstable" n log2 n per stable / unstable sort of n elements (estimate.sort_work), "random"
        uniform draws, "svd" FLOPs (estimate.svd_flops)."""
        return {}

    def working_copies(self, tasks: int) -> float:
        """Compute-dtype copies of one tensor `merge` holds beyond its base and task vectors (`bmm
        plan`'s memory estimate): by default the merged value and the weight built from it."""
        return 2.0

    def merge_unit(self, inputs: list[ModuleInput]) -> dict[str, torch.Tensor]:
        """Merge all tensors of one streaming unit; override to batch across tensors."""
        return {inp.spec.name: self.merge(inp) for inp in inputs}

    def describe(self) -> dict:
        """Method name and resolved parameters, for the model card and run record."""
        d: dict[str, Any] = {"method": self.name, "parameters": dict(self.params)}
        if any(p for _, p in self.models):
            # in expert order, without the model strings: a resumed run (Hub revisions pinned) writes the same card
            d["model_parameters"] = [dict(p) for _, p in self.models]
        return d

    @classmethod
    def parameter_summary(cls) -> str:
        """One line for `bmm methods`: global defaults, aliases, per-model parameters."""
        parts = [f"defaults={cls.defaults}"]
        if cls.aliases:
            parts.append("aliases=" + ", ".join(f"{a}->{c}" for a, c in sorted(cls.aliases.items())))
        if cls.tensor_parameters:
            per = {k: ("global value" if v is None else v) for k, v in cls.tensor_parameters.items()}
            parts.append(f"per-model={per}")
        if "anchor" in cls.defaults:
            parts.append(f"per-model=the anchor's, except {list(NOT_FORWARDED)} (or under 'anchor')")
        return "  ".join(parts)


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


def get_method(
    name: str, params: dict | None = None, *, seed: int = 0, models: Sequence[ModelParameters] | None = None
) -> MergeMethod:
    """Build a method; `models` are the config's (model, per-model parameters) pairs, in expert order."""
    return method_class(name)(params, seed=seed, models=models)


def weighted_combination(
    deltas: torch.Tensor, weights: torch.Tensor | None, normalize: bool, chunk: int = 1 << 18
) -> torch.Tensor:
    """mergekit's combination without sign consensus: sum_t w_t U_t, divided by sum_t w_t if
    `normalize` (a |sum| below 1e-8 divides by 1). weights None: all 1 (the plain sum, exactly)."""
    if weights is None:
        mixed = deltas.sum(0)
        divisor = float(deltas.shape[0])
    else:
        # chunk by chunk: the weighted copy is T-fold; torch's sum over the task axis gives the same
        # bits on slices of width a multiple of 32768 (ties.ELEMENT_CHUNK), so this is the unchunked sum
        if chunk <= 0:
            raise ValueError(f"weighted_combination: chunk must be positive, got {chunk}")
        t_count, n = int(deltas.shape[0]), math.prod(deltas.shape[1:])
        if n <= chunk or not deltas.is_contiguous():  # one step; a strided input as before (its layout)
            mixed = (deltas * weights.reshape((-1,) + (1,) * (deltas.dim() - 1))).sum(0)
        else:
            flat, w = deltas.reshape(t_count, n), weights.reshape(-1, 1)
            mixed = torch.cat([(flat[:, a:a + chunk] * w).sum(0) for a in range(0, n, chunk)]).reshape(deltas.shape[1:])
        divisor = float(weights.sum())
    if normalize:
        mixed = mixed / (divisor if abs(divisor) >= 1e-8 else 1.0)
    return mixed
