"""A PEFT LoRA adapter over its base model, read as the full fine-tuned model it stands for.

An adapter folder holds adapter_config.json and adapter_model.safetensors with, per adapted
module, `base_model.model.<module>.lora_A.weight` [r, d_in] and `.lora_B.weight` [d_out, r]; the
fine-tuned weight is W + s B A with s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), r and
alpha overridden per module by rank_pattern / alpha_pattern (matched with peft's own helper), the
product transposed when fan_in_fan_out (GPT-2's Conv1D stores weights (d_in, d_out)). Embeddings
carry lora_embedding_A [r, vocab] / lora_embedding_B [dim, r] and delta (B A)^T s. Any other
`base_model.model.<name>` tensor (modules_to_save, trained biases, a saved embedding's
`base_layer.weight`) replaces that base tensor whole.

`get` densifies one tensor at a time (what every method can use); `lora_factors` hands the
statistics the low-rank form U = (s B) A, so BMM's Grams never need U^T U of a dense U.
The config is parsed by peft itself (PeftConfig.from_pretrained), never by hand. The adapter's
tensors come through any TensorSource: a LocalSource over the folder's adapter_model.safetensors,
or a HubSource over an adapter repo (streamed and verified like any Hub input, config.json-less).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bmmstream.errors import BmmError
from bmmstream.sources.base import TORCH_TO_ST, TensorInfo, TensorSource

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LINEAR = re.compile(r"^(.+)\.lora_([AB])\.weight$")
_EMBEDDING = re.compile(r"^(.+)\.lora_embedding_([AB])$")
_BASE_LAYER = re.compile(r"^(.+)\.base_layer\.(weight|bias)$")


def is_adapter_folder(path: Path) -> bool:
    """A folder with adapter_config.json and no full weights of its own."""
    return (
        path.is_dir()
        and (path / ADAPTER_CONFIG).is_file()
        and not (path / "model.safetensors").is_file()
        and not (path / "model.safetensors.index.json").is_file()
    )


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: which base tensor, where its factors are, and how to combine them."""

    path: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    scaling: float
    embedding: bool  # lora_embedding_A/B: delta = (B A)^T s
    transposed: bool  # fan_in_fan_out: the base weight is stored (d_in, d_out)

    @property
    def target(self) -> str:
        return f"{self.path}.weight"


def _shape(s) -> str:
    s = tuple(s)
    return "(" + ", ".join(str(x) for x in s) + ("," if len(s) == 1 else "") + ")"


def _float_dtype(dt: torch.dtype) -> torch.dtype:
    """Densified deltas are kept in float64 if the base is, else float32 (a half-precision sum
    W + s B A would round most of a small delta away)."""
    return torch.float64 if dt == torch.float64 else torch.float32


def _load_config(config_dir: Path, where: str):
    """The adapter's LoraConfig, parsed by peft; one BmmError line for what it cannot be."""
    try:
        from peft import LoraConfig, PeftConfig
    except ImportError:  # pragma: no cover - peft is a dependency
        raise BmmError(f"{where}: reading a LoRA adapter needs the peft package (pip install peft)") from None
    try:
        cfg = PeftConfig.from_pretrained(str(config_dir))
    except Exception as e:  # peft raises ValueError / JSON / TypeError on a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BmmError(f"{where}: {ADAPTER_CONFIG} is not a valid PEFT adapter config ({msg})") from None
    if not isinstance(cfg, LoraConfig):
        kind = getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", "?"))
        raise BmmError(f"{where}: a PEFT {kind} adapter is not supported; only LoRA adapters are")
    refused = [
        ("use_dora", "DoRA adapter (use_dora)"),
        ("lora_bias", "LoRA with a trained bias (lora_bias)"),
        ("target_parameters", "LoRA on parameters (target_parameters)"),
        ("layer_replication", "LoRA with layer_replication"),
        ("trainable_token_indices", "LoRA with trainable_token_indices"),
    ]
    for attr, what in refused:
        if getattr(cfg, attr, None):
            raise BmmError(f"{where}: {what} is not supported; {MERGE_FIRST}")
    return cfg


MERGE_FIRST = "merge it into its base first (peft: merge_and_unload().save_pretrained(out)) and give the full model"


def looks_like_adapter(src: TensorSource) -> bool:
    """Every tensor named base_model.model.*: an adapter file (a Hub repo read as if it were a model)."""
    names = src.tensor_infos()
    return bool(names) and all(n.startswith(PREFIX) for n in names)


class LoraSource:
    """TensorSource over (adapter, base): every tensor of the base, adapted ones densified as
    W + s B A on read. `adapter` reads the adapter's tensors (a LocalSource over
    adapter_model.safetensors, or a HubSource over an adapter repo); `config_dir` holds its
    adapter_config.json."""

    def __init__(self, adapter: TensorSource, config_dir: Path, base: TensorSource, id: str | None = None):
        from peft.utils.other import get_pattern_key  # peft's own rank_pattern / alpha_pattern matching

        self.adapter = adapter
        self.id = id if id is not None else adapter.id
        self.revision: str | None = adapter.revision  # a Hub adapter's pinned commit
        self.base = base
        where = self.id
        cfg = _load_config(Path(config_dir), where)
        self.lora_config = cfg
        base_infos = base.tensor_infos()
        infos = adapter.tensor_infos()

        factors: dict[str, dict[str, str]] = {}
        embedding: set[str] = set()
        self._replaced: dict[str, str] = {}  # base tensor name -> adapter key holding its new value
        for key in sorted(infos):
            if not key.startswith(PREFIX):
                raise BmmError(f"{where}: {ADAPTER_WEIGHTS} holds unexpected tensor '{key}' (PEFT keys start with '{PREFIX}')")
            rest = key[len(PREFIX):]
            m = _LINEAR.match(rest) or _EMBEDDING.match(rest)
            if m:
                factors.setdefault(m.group(1), {})[m.group(2)] = key
                if m.re is _EMBEDDING:
                    embedding.add(m.group(1))
                continue
            if "lora_magnitude_vector" in rest:
                raise BmmError(f"{where}: DoRA adapter (use_dora) is not supported; {MERGE_FIRST}")
            if "lora_" in rest or "token_adapter" in rest:
                raise BmmError(f"{where}: tensor '{key}' is of a kind of adapter bmmstream does not support")
            b = _BASE_LAYER.match(rest)
            name = f"{b.group(1)}.{b.group(2)}" if b else rest
            if name not in base_infos:
                raise BmmError(f"{where}: adapter saves tensor '{name}' whole, but the base model '{base.id}' has no such tensor")
            if tuple(infos[key].shape) != tuple(base_infos[name].shape):
                raise BmmError(
                    f"{where}: adapter tensor '{name}' has shape {_shape(infos[key].shape)}, "
                    f"base has {_shape(base_infos[name].shape)}"
                )
            self._replaced[name] = key

        self._modules: dict[str, LoraModule] = {}
        for path, ab in sorted(factors.items()):
            if set(ab) != {"A", "B"}:
                missing = "lora_B" if "A" in ab else "lora_A"
                raise BmmError(f"{where}: module '{path}' has no {missing} in {ADAPTER_WEIGHTS}")
            target = f"{path}.weight"
            if target not in base_infos:
                raise BmmError(f"{where}: adapter targets module '{path}', but the base model '{base.id}' has no tensor '{target}'")
            a, b = tuple(infos[ab["A"]].shape), tuple(infos[ab["B"]].shape)
            w = tuple(base_infos[target].shape)
            emb = path in embedding
            flip = bool(cfg.fan_in_fan_out) and not emb
            r = a[0] if len(a) == 2 else -1
            if emb:  # [r, vocab], [dim, r] over a (vocab, dim) table
                fits = len(a) == 2 and len(b) == 2 and b[1] == r and w == (a[1], b[0])
            else:  # [r, d_in], [d_out, r] over (d_out, d_in), or (d_in, d_out) with fan_in_fan_out
                fits = len(a) == 2 and len(b) == 2 and b[1] == r and w == ((a[1], b[0]) if flip else (b[0], a[1]))
            if not fits:
                raise BmmError(
                    f"{where}: module '{path}': lora_A {_shape(a)} and lora_B {_shape(b)} do not fit the "
                    f"base weight {_shape(w)}" + (" (fan_in_fan_out)" if flip else "")
                )
            rank = cfg.rank_pattern.get(get_pattern_key(list(cfg.rank_pattern), path), cfg.r)
            alpha = cfg.alpha_pattern.get(get_pattern_key(list(cfg.alpha_pattern), path), cfg.lora_alpha)
            if int(rank) != r:
                raise BmmError(f"{where}: module '{path}' has rank {r} in {ADAPTER_WEIGHTS}, its config says r = {rank}")
            scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
            self._modules[target] = LoraModule(path, ab["A"], ab["B"], float(scaling), emb, flip)

        self._infos = dict(base_infos)
        for name, key in self._replaced.items():
            self._infos[name] = infos[key]
        for name in self._modules:
            dt = _float_dtype(self._base_dtype(name))
            self._infos[name] = TensorInfo(self._infos[name].shape, TORCH_TO_ST[dt])
        self._check_base_name()

    @classmethod
    def from_folder(cls, folder: str | Path, base: TensorSource, id: str | None = None) -> "LoraSource":
        """A local adapter folder (adapter_config.json + adapter_model.safetensors)."""
        from bmmstream.sources.local import LocalSource

        folder = Path(folder).expanduser()
        where = id if id is not None else str(folder)
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = (folder / "adapter_model.bin").is_file()
            raise BmmError(
                f"{where}: no {ADAPTER_WEIGHTS}"
                + ("; only adapter_model.bin (pickle), which bmmstream never unpickles" if pickled else "")
            )
        return cls(LocalSource(weights, id=str(weights)), folder, base, id=where)

    def _base_dtype(self, name: str) -> torch.dtype:
        from bmmstream.sources.base import ST_TO_TORCH

        return ST_TO_TORCH[self._infos[name].dtype]

    def _check_base_name(self) -> None:
        """The base named in the adapter config is only a hint (paths differ between machines): a warning."""
        named = getattr(self.lora_config, "base_model_name_or_path", None)
        if not named:
            return
        ours = str(self.base.id).removeprefix("hf://").split("@")[0].rstrip("/")
        if named.rstrip("/") != ours and Path(named).name != Path(ours).name:
            log.warning("%s: adapter was trained on '%s', merged here over base '%s'", self.id, named, self.base.id)

    # -- reading ----------------------------------------------------------------------------
    def _raw(self, key: str) -> torch.Tensor:
        return self.adapter.get(key)

    def _keys(self, names: list[str]) -> list[str]:
        """The adapter tensors that `names` are read from."""
        out = []
        for n in names:
            mod = self._modules.get(n)
            out += [mod.a_key, mod.b_key] if mod is not None else []
            out += [self._replaced[n]] if n in self._replaced else []
        return out

    def _base_or_replaced(self, name: str) -> torch.Tensor:
        key = self._replaced.get(name)
        return self._raw(key) if key is not None else self.base.get(name)

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(s B [d_out, r], A [r, d_in]) with U = (s B) A in the (d_out, d_in) orientation the
        methods see (a fan_in_fan_out weight flipped, as the pipeline flips Conv1D; an embedding
        in its stored (vocab, dim) layout); None for a tensor the adapter does not adapt (left
        alone or replaced whole)."""
        mod = self._modules.get(name)
        if mod is None:
            return None
        dt = _float_dtype(self._base_dtype(name))
        A, B = self._raw(mod.a_key).to(dt), self._raw(mod.b_key).to(dt)
        if mod.embedding:  # delta = (B A)^T s = (s A^T) B^T
            return A.T * mod.scaling, B.T.contiguous()
        return B * mod.scaling, A

    def get(self, name: str) -> torch.Tensor:
        mod = self._modules.get(name)
        w = self._base_or_replaced(name)
        if mod is None:
            return w
        dt = _float_dtype(w.dtype)
        A, B = self._raw(mod.a_key).to(dt), self._raw(mod.b_key).to(dt)
        delta = (B @ A) * mod.scaling
        if mod.embedding or mod.transposed:
            delta = delta.T
        return w.to(dt) + delta

    # -- TensorSource -----------------------------------------------------------------------
    def tensor_infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def config(self) -> dict:
        return self.base.config()

    def prefetch(self, names: list[str]) -> None:
        """The adapter's tensors of `names` (the base is the run's own base source, prefetched by the pipeline)."""
        self.adapter.prefetch(self._keys(names))

    def release(self, names: list[str]) -> None:
        self.adapter.release(self._keys(names))

    def verify(self) -> None:
        """A Hub adapter's bytes against the Hub's record (as the pipeline verifies every Hub source)."""
        if hasattr(self.adapter, "verify"):
            self.adapter.verify()

    def aux_files(self) -> list[str]:
        return self.base.aux_files()

    def aux_path(self, filename: str) -> Path:
        return self.base.aux_path(filename)

    def close(self) -> None:
        self.adapter.close()

    def adapted(self) -> list[str]:
        """Base tensor names the adapter changes by a low-rank delta (for reports and tests)."""
        return sorted(self._modules)

    def __repr__(self) -> str:
        return f"LoraSource({self.id!r}, {len(self._modules)} adapted modules over {self.base.id!r})"
