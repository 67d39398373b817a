"""Architecture tables: which tensor of a model family is which module group, kind and layout.

Each module in this folder is one family's table, plain data like mergekit's
`_data/architectures/*.json`: a dict `ARCHITECTURE` with
- `model_types`: the config.json `model_type` values it covers,
- `rules`: ordered entries {pattern, group, kind, transposed, fused, refuse}; the first whose regex
  (re.search on the checkpoint tensor name) matches decides. `group` is one of attn_in, attn_out,
  mlp_in, mlp_out, other; `kind` overrides the shape rule ("router": a 2-D weight never regressed,
  "embedding": a table never regressed); `transposed` marks weights stored (d_in, d_out) (GPT-2's
  Conv1D), which the pipeline hands to methods as (d_out, d_in); `fused` names the projections one
  stored matrix holds (grouped as a whole); `refuse` is the one-line reason a tensor cannot be merged,
- `tied_embeddings`, `notes`: what a user should know (shown in the README's table).
Adding a family is adding one file here; `tests/test_architectures.py` merges a tiny real model of
each.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "other")
RULE_KINDS = ("linear", "embedding", "router")


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    group: str = "other"
    kind: str | None = None  # None: decided by shape (2-D linear, embedding table, vector)
    transposed: bool = False  # stored (d_in, d_out), as transformers' Conv1D
    fused: str | None = None  # e.g. "q,k,v": one stored matrix holding several projections
    refuse: str | None = None  # why a tensor matching this rule cannot be merged


@dataclass(frozen=True)
class Architecture:
    name: str  # the table's module name
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    tied_embeddings: bool = False
    notes: str = ""

    def match(self, name: str) -> Rule | None:
        for r in self.rules:
            if r.pattern.search(name):
                return r
        return None


def _rule(entry: dict, table: str) -> Rule:
    unknown = sorted(set(entry) - {"pattern", "group", "kind", "transposed", "fused", "refuse"})
    group, kind = entry.get("group", "other"), entry.get("kind")
    if unknown or group not in GROUPS or (kind is not None and kind not in RULE_KINDS):
        raise ValueError(f"architecture table '{table}': bad rule {entry!r}")
    return Rule(re.compile(entry["pattern"]), group, kind, bool(entry.get("transposed", False)),
                entry.get("fused"), entry.get("refuse"))


def _load() -> Mapping[str, Architecture]:
    """model_type -> Architecture, from every table module in this folder (sorted, deterministic)."""
    out: dict[str, Architecture] = {}
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        data = importlib.import_module(f"{__name__}.{mod.name}").ARCHITECTURE
        arch = Architecture(
            name=mod.name,
            model_types=tuple(data["model_types"]),
            rules=tuple(_rule(r, mod.name) for r in data["rules"]),
            tied_embeddings=bool(data.get("tied_embeddings", False)),
            notes=str(data.get("notes", "")),
        )
        for mt in arch.model_types:
            if mt in out:
                raise ValueError(f"model_type '{mt}' is in both '{out[mt].name}' and '{mod.name}'")
            out[mt] = arch
    return MappingProxyType(out)


ARCHITECTURES: Mapping[str, Architecture] = _load()
