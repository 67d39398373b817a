"""The protocol every weight source implements, so the math never knows where bytes came from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

# safetensors header dtype strings <-> torch dtypes
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=ST_TO_TORCH[self.dtype]).element_size()


@runtime_checkable
class TensorSource(Protocol):
    """A model checkpoint readable tensor by tensor.

    `get` returns a CPU tensor in the file's dtype. `prefetch`/`release` are hints that let a
    streaming source fetch ahead and evict what has been consumed (no-ops for local files).
    """

    id: str  # the spec the user wrote (path or org/name)
    revision: str | None  # resolved commit hash for Hub sources, None for local folders

    def tensor_infos(self) -> dict[str, TensorInfo]: ...

    def config(self) -> dict: ...

    def get(self, name: str) -> torch.Tensor: ...

    def prefetch(self, names: list[str]) -> None: ...

    def release(self, names: list[str]) -> None: ...

    def aux_files(self) -> list[str]: ...

    def aux_path(self, filename: str) -> Path: ...

    def close(self) -> None: ...


# Non-weight files copied to the merged model folder when the base has them.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def read_config_json(path: Path, label: str | None = None) -> dict:
    """config.json as a dict; `label` names the file in errors (a Hub source's repo/file)."""
    import json

    from bmmstream.errors import BmmError

    where = label or str(path)
    try:
        cfg = json.loads(Path(path).read_text())
    except ValueError as e:
        raise BmmError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise BmmError(f"{where}: not a JSON object")
    return cfg
