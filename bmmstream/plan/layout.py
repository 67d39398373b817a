"""Which tensor is which: layer, module group, kind and storage layout, per architecture family,
plus blocks.

The families are data: one small table per family in bmmstream/plan/architectures/ (regexes on
tensor names -> group, kind, layout flags). A model_type without a table is planned "generic": its
layers are found by the usual names and every linear goes to group "other" (a logged warning says
how many), so BMM still merges it with the config's rho, and `bmm search` refuses to search rho
dimensions that would reach no module.

Kinds decide how a tensor is merged:
- "linear": a 2-D weight regressed by BMM (and merged by every method),
- "embedding": a vocab- or position-sized 2-D table (embeddings, lm_head): never regressed,
- "router": a MoE router (Mixtral's gate): 2-D but never regressed, the anchor's value,
- "vector": anything not 2-D (biases, norms, patch convolutions).
Groups tie hyperparameters inside a block: attn_in (q/k/v), attn_out (o), mlp_in (gate/up/fc1),
mlp_out (down/fc2), other. `transposed` linears are stored (d_in, d_out) (GPT-2's Conv1D); the
pipeline hands every linear to methods as (d_out, d_in) and writes the stored layout back.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Mapping

from bmmstream.errors import BmmError
from bmmstream.plan.architectures import ARCHITECTURES, Architecture
from bmmstream.plan.architectures import GROUPS as ARCH_GROUPS
from bmmstream.sources.base import TensorInfo

GROUPS = ARCH_GROUPS
KINDS = ("linear", "embedding", "vector", "router")
# the families a table in bmmstream/plan/architectures/ covers: model_type -> table
FAMILIES: Mapping[str, Architecture] = ARCHITECTURES
log = logging.getLogger(__name__)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_GENERIC_LAYER_RE = re.compile(r"\.(\d+)\.")
_EMBED_RE = re.compile(r"(embed|lm_head|wte\.|wpe\.|shared\.weight)")


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # one of KINDS
    group: str  # one of GROUPS
    layer: int | None  # transformer layer index, None outside the layer stack
    block: int  # hyperparameter block (non-layer tensors: first block before, last block after)
    unit: int  # position in the streaming order (0 = pre-layer tensors, 1..L = layers, L+1 = rest)
    transposed: bool = False  # stored (d_in, d_out): the pipeline transposes it for methods and back

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """The shape methods see: (d_out, d_in) for every linear, the stored shape otherwise."""
        return tuple(reversed(self.shape)) if self.transposed else self.shape


@dataclass
class Plan:
    family: str  # a key of FAMILIES, or "generic"
    num_layers: int
    num_blocks: int
    modules: list[ModuleSpec]
    units: list[list[str]] = field(default_factory=list)  # tensor names per streaming unit, in order

    def by_name(self) -> dict[str, ModuleSpec]:
        return {m.name: m for m in self.modules}

    def block_layers(self, b: int) -> range:
        ranges = split_blocks(self.num_layers, self.num_blocks)
        return ranges[b]


def split_blocks(num_layers: int, num_blocks: int) -> list[range]:
    """Cut layers into `num_blocks` consecutive ranges whose sizes differ by at most one."""
    if num_blocks < 1:
        raise ValueError("blocks must be >= 1")
    num_blocks = min(num_blocks, max(num_layers, 1))
    base, extra = divmod(num_layers, num_blocks)
    out, start = [], 0
    for b in range(num_blocks):
        n = base + (1 if b < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def detect_family(config: dict) -> str:
    """The config's model_type when a table covers it, else "generic"."""
    mt = str(config.get("model_type", "")).lower()
    return mt if mt in FAMILIES else "generic"


def _layer_of(name: str, family: str) -> int | None:
    m = _LAYER_RE.search(name)
    if m is None and family == "generic":
        m = _GENERIC_LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _is_embedding(name: str, info: TensorInfo, vocab: int | None) -> bool:
    if _EMBED_RE.search(name):
        return True
    return vocab is not None and vocab in info.shape


def _classify(name: str, info: TensorInfo, layer: int | None, vocab: int | None,
              arch: Architecture | None) -> tuple[str, str, bool]:
    """(kind, group, transposed) of one tensor: the family's first matching rule, else by shape."""
    rule = arch.match(name) if arch is not None else None
    if rule is not None and rule.refuse:
        raise BmmError(f"{name}: {rule.refuse} (family '{arch.name}', shape {list(info.shape)})")
    if len(info.shape) != 2:
        return "vector", "other", False
    if rule is not None and rule.kind in ("embedding", "router"):
        return rule.kind, "other", False
    if rule is not None:
        return "linear", rule.group, rule.transposed
    if _is_embedding(name, info, vocab) and layer is None:
        return "embedding", "other", False
    return "linear", "other", False


def build_plan(config: dict, infos: dict[str, TensorInfo], blocks: int = 1) -> Plan:
    """Classify every tensor of the base checkpoint; deterministic for the same inputs."""
    family = detect_family(config)
    arch = FAMILIES.get(family)
    vocab = config.get("vocab_size")
    layers = {}
    for name in infos:
        layers[name] = _layer_of(name, family)
    present = sorted({v for v in layers.values() if v is not None})
    num_layers = (present[-1] + 1) if present else 0
    ranges = split_blocks(num_layers, blocks) if num_layers else [range(0, 0)]
    layer_block = {i: b for b, r in enumerate(ranges) for i in r}
    nb = len(ranges)

    modules = []
    for name in sorted(infos):
        info = infos[name]
        layer = layers[name]
        kind, group, transposed = _classify(name, info, layer, vocab, arch)
        if layer is not None:
            unit, block = layer + 1, layer_block[layer]
        elif kind == "embedding" and "lm_head" not in name:
            unit, block = 0, 0
        else:
            unit, block = num_layers + 1, nb - 1
        modules.append(ModuleSpec(name, tuple(info.shape), kind, group, layer, block, unit, transposed))
    _say_unmatched(str(config.get("model_type") or "(no model_type)"), arch, modules)

    units: list[list[str]] = [[] for _ in range(num_layers + 2)]
    for m in modules:
        units[m.unit].append(m.name)
    return Plan(family, num_layers, nb, modules, units)


def _say_unmatched(model_type: str, arch: Architecture | None, modules: list[ModuleSpec]) -> None:
    """Warn when linears fall to group "other" for want of a rule (all of them for a generic family)."""
    other = [m.name for m in modules if m.kind == "linear" and m.group == "other"]
    if arch is None and other:
        log.warning(
            "model family '%s' has no architecture table (bmmstream/plan/architectures/): all %d linear(s) "
            "went to group 'other' (regressed with the config's rho for 'other'; `bmm search` has no group to "
            "search), e.g. '%s'", model_type, len(other), other[0])
        return
    inside = [m.name for m in modules if m.kind == "linear" and m.group == "other" and m.layer is not None]
    if inside:
        log.warning("model family '%s': %d linear(s) inside the layers match no rule of table '%s' and went to "
                    "group 'other', e.g. '%s'", model_type, len(inside), arch.name, inside[0])
