"""Which tensor is which: layer, module group and kind, per architecture family, plus blocks.

Kinds decide how a tensor is merged:
- "linear": a 2-D weight regressed by BMM (and merged by every method),
- "embedding": a vocab- or position-sized 2-D table (embeddings, lm_head): never regressed,
- "vector": anything not 2-D (biases, norms).
Groups tie hyperparameters inside a block: attn_in (q/k/v), attn_out (o), mlp_in (gate/up/fc1),
mlp_out (down/fc2), other.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from bmmstream.sources.base import TensorInfo

GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "other")
KINDS = ("linear", "embedding", "vector")

# family -> ordered (regex on the tensor name, group); first match wins
_LLAMA = [
    (r"self_attn\.(q_proj|k_proj|v_proj)\.weight$", "attn_in"),
    (r"self_attn\.o_proj\.weight$", "attn_out"),
    (r"mlp\.(gate_proj|up_proj)\.weight$", "mlp_in"),
    (r"mlp\.down_proj\.weight$", "mlp_out"),
]
_BERT = [
    (r"attention\.self\.(query|key|value)\.weight$", "attn_in"),
    (r"attention\.output\.dense\.weight$", "attn_out"),
    (r"intermediate\.dense\.weight$", "mlp_in"),
    (r"(?<!attention\.)output\.dense\.weight$", "mlp_out"),
]
FAMILIES: dict[str, list[tuple[str, str]]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
}
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


def build_plan(config: dict, infos: dict[str, TensorInfo], blocks: int = 1) -> Plan:
    """Classify every tensor of the base checkpoint; deterministic for the same inputs."""
    family = detect_family(config)
    rules = [(re.compile(p), g) for p, g in FAMILIES.get(family, [])]
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
        if len(info.shape) != 2:
            kind, group = "vector", "other"
        elif _is_embedding(name, info, vocab) and layer is None:
            kind, group = "embedding", "other"
        else:
            kind, group = "linear", "other"
            for rx, g in rules:
                if rx.search(name):
                    group = g
                    break
        if layer is not None:
            unit, block = layer + 1, layer_block[layer]
        elif kind == "embedding" and "lm_head" not in name:
            unit, block = 0, 0
        else:
            unit, block = num_layers + 1, nb - 1
        modules.append(ModuleSpec(name, tuple(info.shape), kind, group, layer, block, unit))

    units: list[list[str]] = [[] for _ in range(num_layers + 2)]
    for m in modules:
        units[m.unit].append(m.name)
    return Plan(family, num_layers, nb, modules, units)
