"""SLERP: spherical linear interpolation between two models (Shoemake, SIGGRAPH 1985, "Animating
rotation with quaternion curves"; as mergekit `slerp`, merge_methods/slerp.py, and its parameter
gradients/filters, config.py `evaluate_setting`).

Per tensor, with v0, v1 the two full weights, flattened (whole-tensor norms):
    n_i = v_i / ||v_i|| (v_i itself if ||v_i|| <= 1e-8),  dot = clamp(<n0, n1>, -1, 1);
    |dot| > 0.9995: merged = (1 - t) v0 + t v1 (lerp, on the original tensors);
    else theta = arccos(dot): merged = sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1.
t = 0 gives v0. Which two models: with ONE expert, v0 = the base and v1 = the expert (mergekit: v0 = its
base_model); with TWO experts, v0 = models[0] and v1 = models[1] (the base only anchors the task
vectors). Any other number of experts is refused. Norms and dot are computed in float32 (float64 when
the compute dtype is float64, as mergekit); the result is returned as U = merged - W_pre, written as
(a + b - 1) W_pre + a U_0 + b U_1 (one expert: U_0 = 0, U_1 = the expert's) so no W_pre cancels.

`t` (default 0.5; mergekit requires it), per tensor:
- a number;
- a list of numbers: a gradient over layers, t_layer = layer / (num_layers - 1) (0 for tensors outside
  the layer stack, or with one layer), s = t_layer (len - 1), i = int(s):
  t = (1 - (s - i)) L[i] + (s - i) L[min(i + 1, len - 1)];
- a list of {filter: substring, value: number or list} entries (or one such mapping): the first entry
  whose filter is a substring of the tensor name wins; an entry without filter (or filter "*") matches
  every tensor. A tensor no entry matches is refused, naming it.
Every tensor kind is interpolated alike, as in mergekit.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def t_problem(setting: Any) -> str | None:
    """What is wrong with a `t` setting, or None."""
    if _number(setting):
        return None
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        return f"must be a number, a non-empty list of numbers, or a list of {{filter, value}} entries, got {setting!r}"
    if all(_number(v) for v in setting):
        return None
    for entry in setting:
        if not isinstance(entry, Mapping) or "value" not in entry or set(entry) - {"filter", "value"}:
            return f"entries must be numbers, or mappings with 'value' (and 'filter'), got {entry!r}"
        f, v = entry.get("filter"), entry["value"]
        if f is not None and not isinstance(f, str):
            return f"filter must be a string, got {f!r}"
        if not (_number(v) or (isinstance(v, list) and v and all(_number(x) for x in v))):
            return f"value must be a number or a non-empty list of numbers, got {v!r}"
    return None


def gradient_value(values: list[float], t_layer: float) -> float:
    """mergekit's piecewise-linear gradient over layers."""
    s = t_layer * (len(values) - 1)
    i = int(s)
    j = min(i + 1, len(values) - 1)
    frac = s - i
    return (1.0 - frac) * float(values[i]) + frac * float(values[j])


def needs_layers(setting: Any) -> bool:
    """Whether a (valid) `t` setting holds a gradient over layers."""
    if _number(setting):
        return False
    entries = [setting] if isinstance(setting, Mapping) else setting
    if all(_number(v) for v in entries):
        return len(entries) > 1
    return any(isinstance(e["value"], list) and len(e["value"]) > 1 for e in entries)


def resolve_t(setting: Any, name: str, t_layer: float) -> float | None:
    """t for tensor `name` at relative depth t_layer; None when no filter entry matches."""
    if _number(setting):
        return float(setting)
    entries = [setting] if isinstance(setting, Mapping) else setting
    if all(_number(v) for v in entries):
        return gradient_value(entries, t_layer)
    for e in entries:
        f = e.get("filter")
        if f is None or f == "*" or f in name:
            v = e["value"]
            return float(v) if _number(v) else gradient_value(v, t_layer)
    return None


def slerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[float, float, bool]:
    """(a, b, lerp): merged = a v0 + b v1, and whether the near-parallel lerp was taken."""
    n0, n1 = float(torch.linalg.vector_norm(v0)), float(torch.linalg.vector_norm(v1))
    x = v0 / n0 if n0 > NORM_EPS else v0
    y = v1 / n1 if n1 > NORM_EPS else v1
    dot = min(1.0, max(-1.0, float((x * y).sum())))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t, True
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s, False


@register
class Slerp(MergeMethod):
    """SLERP of two models (mergekit `slerp`): base and one expert, or two experts; t per tensor or layer."""

    name = "slerp"
    defaults = {"t": 0.5}

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        problem = t_problem(self.params["t"])
        if problem:
            raise BmmError(f"merge method 'slerp': parameter 't' {problem}")
        self.num_layers: int | None = None  # set by the pipeline from the plan (for a gradient over layers)

    def t_for(self, spec) -> float:
        setting = self.params["t"]
        t_layer = 0.0
        if needs_layers(setting) and spec.layer is not None:
            if self.num_layers is None:
                raise BmmError(
                    f"merge method 'slerp': {spec.name}: t is a gradient over layers, "
                    f"but the number of layers was not given to the method"
                )
            t_layer = spec.layer / (self.num_layers - 1) if self.num_layers > 1 else 0.0
        t = resolve_t(setting, spec.name, t_layer)
        if t is None:
            raise BmmError(
                f"merge method 'slerp': no entry of parameter 't' matches tensor '{spec.name}' "
                f"(add an entry without filter as the default)"
            )
        return t

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        count = int(inp.deltas.shape[0])
        if count not in (1, 2):
            raise BmmError(
                f"merge method 'slerp' interpolates two models (the base and one expert, or two experts), "
                f"got {count} experts"
            )
        t = self.t_for(inp.spec)
        dt = torch.float64 if inp.deltas.dtype == torch.float64 else torch.float32
        base = inp.base.to(dt)
        u0 = inp.deltas[0].to(dt) if count == 2 else torch.zeros_like(base)
        u1 = inp.deltas[count - 1].to(dt)
        if base.numel() == 0:
            return torch.zeros_like(inp.base)
        a, b, lerp = slerp_coefficients(base + u0, base + u1, t)
        out = a * u0 + b * u1
        if not lerp:
            out = out + (a + b - 1.0) * base
        return out.to(inp.deltas.dtype)
