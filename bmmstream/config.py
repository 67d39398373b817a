"""The merge configuration: a YAML file close to mergekit's conventions, validated by pydantic.

pydantic is used because it gives precise, field-named errors for free; every error is turned
into one BmmError line naming the config file and the field.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bmmstream.errors import BmmError

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
COMPUTE_DTYPES = ("float32", "float64")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.I)


def parse_size(value: int | str | None) -> int | None:
    """'5GB' / '500MiB' / 1234 -> bytes (KB=1000, KiB=1024)."""
    if value is None or isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (examples: 5GB, 500MiB, 1000000)")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    if unit == "B":
        return int(num)
    base = 1024 if "I" in unit else 1000
    return int(num * base ** ("KMGT".index(unit[0]) + 1))


def model_parameter_problem(key: str, value: Any) -> str | None:
    """What is wrong with the value of a per-model parameter (mergekit's `weight`, `density`), or None.

    Only the value is checked here; whether the merge method uses the name is the method's call."""
    if key in ("weight", "density"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"parameter '{key}' must be a finite number, got {value!r}"
        if key == "density" and not 0.0 < float(value) <= 1.0:
            return f"parameter 'density' must be in (0, 1], got {value!r}"
    return None



AUTO = "auto"  # threads: the rule of bmmstream/executors/threads.py


def parse_threads(value: int | str | None) -> int | None:
    """A `threads` value: an int >= 1, or None for `auto`; ValueError (one line) for anything else."""
    if value is None or value == AUTO:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be an integer >= 1 or 'auto', got {value!r}")
    return value

class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _parameter_values(self):
        for key, value in self.parameters.items():
            nested = value.items() if key == "anchor" and isinstance(value, dict) else [(key, value)]
            for k, v in nested:
                problem = model_parameter_problem(k, v)
                if problem:
                    raise ValueError(f"{self.model}: {problem}")
        return self


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: str
    models: list[ModelEntry]
    merge_method: str = "bmm"
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str = "float32"  # compute and statistics dtype
    out_dtype: str | None = None  # default: the base model's dtype
    shard_size: int | str = 5_000_000_000  # bytes, or "5GB" / "500MiB"
    seed: int = 0
    max_disk: int | str | None = None  # Hub streaming: downloaded bytes held on disk at once
    search: dict[str, Any] | None = None
    # the output's vocabulary and tokenizer when experts add tokens (sources/vocab.py):
    # base, union, or model:<a path as written in models / base_model>
    tokenizer_source: str | None = None  # None: base
    # CPU threads for torch and numba: an int >= 1 or "auto" (bmmstream/executors/threads.py gives the rule);
    # where the work runs, not what the merge is: run directories and resume ignore it
    threads: int | str | None = None  # None: auto

    @field_validator("models")
    @classmethod
    def _some_models(cls, v):
        if not v:
            raise ValueError("at least one model is needed")
        return v

    @field_validator("dtype")
    @classmethod
    def _compute_dtype(cls, v):
        if v not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be one of {list(COMPUTE_DTYPES)}, got {v!r}")
        return v

    @field_validator("out_dtype")
    @classmethod
    def _out_dtype(cls, v):
        if v is not None and v not in DTYPES:
            raise ValueError(f"out_dtype must be one of {list(DTYPES)}, got {v!r}")
        return v

    @field_validator("shard_size", "max_disk")
    @classmethod
    def _size(cls, v):
        if isinstance(v, bool):
            raise ValueError(f"not a size: {v!r} (examples: 5GB, 500MiB, 1000000)")
        size = parse_size(v)
        if size is not None and size <= 0:
            raise ValueError(f"must be a positive size (examples: 5GB, 500MiB, 1000000), got {v!r}")
        return size

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v):
        n = parse_threads(v)
        return AUTO if n is None and v is not None else n

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, v, info):
        if v is None or v in ("base", "union"):
            return v
        named = [info.data.get("base_model")] + [m.model for m in info.data.get("models") or []]
        if v.startswith("model:") and v.removeprefix("model:") in named:
            return v
        if v.startswith("model:"):
            raise ValueError(f"{v.removeprefix('model:')!r} is not base_model or one of the models "
                             f"(write model:<path> exactly as in the config)")
        raise ValueError(f"must be base, union or model:<path>, got {v!r}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    def identity(self) -> dict:
        """to_dict() without what changes how a merge runs but not what it is (threads)."""
        d = self.to_dict()
        d.pop("threads", None)
        return d


def load_config(cfg: dict | str | Path | MergeConfig, origin: str | None = None) -> MergeConfig:
    """Accept a MergeConfig, a dict, or a YAML path; every problem becomes one BmmError line."""
    if isinstance(cfg, MergeConfig):
        return cfg
    if isinstance(cfg, (str, Path)):
        path = Path(cfg)
        if not path.is_file():
            raise BmmError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise BmmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        origin = str(path)
    else:
        data = cfg
    if not isinstance(data, dict):
        raise BmmError(f"{origin or 'config'}: expected a mapping at the top level")
    if isinstance(cfg, (str, Path)):
        data = _resolve_calibration_paths(data, Path(cfg).resolve().parent)
    origin = origin or "config"
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
        raise BmmError(f"{origin}: " + "; ".join(parts)) from None


def _resolve_calibration_paths(data: dict, base_dir: Path) -> dict:
    """Calibration files named relative to the YAML file are made absolute, so a resumed run
    started from another directory reads the same files."""
    models = data.get("models")
    if not isinstance(models, list):
        return data
    out = dict(data, models=[])
    for m in models:
        if isinstance(m, dict) and isinstance(m.get("calibration"), dict) and "path" in m["calibration"]:
            p = Path(str(m["calibration"]["path"])).expanduser()
            if not p.is_absolute():
                m = dict(m, calibration=dict(m["calibration"], path=str(base_dir / p)))
        out["models"].append(m)
    return out
