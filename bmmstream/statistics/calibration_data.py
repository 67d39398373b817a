"""Calibration data for data-assisted statistics: read samples, tokenise, pad into batches.

One task's calibration set is named in the config next to its model:

    calibration: {path: task_a.jsonl, field: text, samples: 1000, max_len: 512}

Accepted files:
- a text file (any suffix but .jsonl/.json): one sample per line, empty lines skipped;
- JSONL (.jsonl / .json, one object per line): the string in `field` (default "text") is tokenised,
  or, when rows carry "input_ids" (a list of ints), they are taken as already tokenised;
- a folder written by `datasets.Dataset.save_to_disk` (needs the optional `datasets` package; the
  `split` key picks the split of a DatasetDict, default "train").

The first `samples` usable samples are taken in file order (deterministic; shuffle the file to
subsample at random), each truncated to `max_len` tokens. Text is tokenised with the base model's
tokenizer (special tokens added, as the model sees text in use). Batches are padded on the right;
the attention mask marks real tokens and every statistic excludes the padding, so the pad id does
not matter. Samples are sorted by length before batching so little compute is spent on padding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bmmstream.errors import BmmError

DEFAULT_SAMPLES = 1000  # the paper's per-task count for Llama
DEFAULT_MAX_LEN = 512
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class CalibrationSpec:
    path: Path
    field: str = "text"
    samples: int = DEFAULT_SAMPLES
    max_len: int = DEFAULT_MAX_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    split: str = "train"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str | Path, base_dir: Path | None = None) -> CalibrationSpec:
        """Parse the `calibration:` entry of a model; relative paths resolve against base_dir."""
        if isinstance(d, (str, Path)):
            d = {"path": d}
        if not isinstance(d, dict) or "path" not in d:
            raise BmmError("calibration: expected a mapping with at least 'path'")
        known = {"path", "field", "samples", "max_len", "batch_size", "split"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BmmError(f"calibration: unknown key(s) {unknown}; known: {sorted(known)}")
        path = Path(str(d["path"])).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        ints = {}
        for k, default in (("samples", DEFAULT_SAMPLES), ("max_len", DEFAULT_MAX_LEN), ("batch_size", DEFAULT_BATCH_SIZE)):
            v = d.get(k, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BmmError(f"calibration: '{k}' must be a positive integer, got {v!r}")
            ints[k] = v
        return cls(path=path, field=str(d.get("field", "text")), split=str(d.get("split", "train")), **ints)


def _check_ids(ids: Any, where: str) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise BmmError(f"{where}: 'input_ids' must be a list of non-negative integers")
    return ids


def _from_rows(rows, spec: CalibrationSpec, where) -> list[str | list[int]]:
    """Texts or token-id lists from dict rows, stopping once `spec.samples` are found."""
    out: list[str | list[int]] = []
    kind = None
    for loc, row in rows:
        if not isinstance(row, dict):
            raise BmmError(f"{where(loc)}: expected a JSON object")
        if "input_ids" in row and spec.field not in row:
            this, value = "ids", _check_ids(row["input_ids"], where(loc))
            if not value:
                continue
        elif spec.field in row:
            value = row[spec.field]
            if not isinstance(value, str):
                raise BmmError(f"{where(loc)}: field '{spec.field}' is not a string")
            if not value.strip():
                continue
            this = "text"
        else:
            raise BmmError(f"{where(loc)}: no field '{spec.field}' and no 'input_ids'")
        if kind is not None and this != kind:
            raise BmmError(f"{where(loc)}: mixes text and pre-tokenised rows")
        kind = this
        out.append(value)
        if len(out) >= spec.samples:
            break
    return out


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise BmmError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _dataset_rows(spec: CalibrationSpec):
    try:
        import datasets
    except ImportError:
        raise BmmError(
            f"{spec.path}: is a folder (a `datasets` folder); reading it needs the 'datasets' package, "
            "which is not installed (pip install datasets, or export the data to JSONL)"
        ) from None
    try:
        ds = datasets.load_from_disk(str(spec.path))
    except Exception as e:  # the library raises many types for a folder it cannot read
        raise BmmError(f"{spec.path}: not a datasets folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise BmmError(f"{spec.path}: no split '{spec.split}'; splits: {sorted(ds)}")
        ds = ds[spec.split]
    for i, row in enumerate(ds):
        yield i, row


def load_samples(spec: CalibrationSpec) -> list[str | list[int]]:
    """The first `spec.samples` samples: strings to tokenise, or lists of token ids."""
    p = spec.path
    if not p.exists():
        raise BmmError(f"calibration data {p}: no such file or folder")
    if p.is_dir():
        out = _from_rows(_dataset_rows(spec), spec, lambda i: f"{p}[{i}]")
    elif p.suffix.lower() in (".jsonl", ".json"):
        out = _from_rows(_jsonl_rows(p), spec, lambda n: f"{p}:{n}")
    else:
        out = []
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    out.append(line)
                    if len(out) >= spec.samples:
                        break
    if not out:
        raise BmmError(f"calibration data {p}: no samples found")
    return out


def load_tokenizer(folder: str | Path):
    """The base model's tokenizer from a local folder (never the Hub, never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise BmmError(f"{folder}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None


def tokenize(samples: list[str | list[int]], tokenizer, max_len: int) -> list[list[int]]:
    """Token ids per sample, truncated to max_len; pre-tokenised samples are only truncated."""
    out = []
    for s in samples:
        if isinstance(s, str):
            if tokenizer is None:
                raise BmmError("calibration: text samples need the base model's tokenizer, none was found")
            ids = tokenizer(s, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
        else:
            ids = s[:max_len]
        if ids:
            out.append(list(ids))
    return out


def pad_batches(token_ids: list[list[int]], batch_size: int, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches {"input_ids", "attention_mask"} [B, S], samples sorted by length."""
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [token_ids[i] for i in order[start : start + batch_size]]
        s = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), s), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), s), dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, : len(c)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def calibration_batches(
    spec: CalibrationSpec | dict,
    tokenizer=None,
    *,
    vocab_size: int | None = None,
    base_dir: Path | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Read, tokenise and batch one task's calibration data.

    tokenizer: a loaded tokenizer, or a local folder to load it from (needed for text samples).
    vocab_size: when given, token ids outside [0, vocab_size) are refused with a clear error.
    """
    if not isinstance(spec, CalibrationSpec):
        spec = CalibrationSpec.from_dict(spec, base_dir)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    ids = tokenize(load_samples(spec), tokenizer, spec.max_len)
    if not ids:
        raise BmmError(f"calibration data {spec.path}: every sample is empty after tokenisation")
    if vocab_size is not None:
        top = max(max(s) for s in ids)
        if top >= vocab_size:
            raise BmmError(f"calibration data {spec.path}: token id {top} >= the model's vocab_size {vocab_size}")
    pad = 0
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return pad_batches(ids, spec.batch_size, pad)


def n_tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    """Real (non-padding) tokens in a list of batches."""
    return int(sum(int(b["attention_mask"].sum()) for b in batches))
