"""Append-only JSON-lines files that make a search resumable and its scores reusable.

- `JsonlLog`: one JSON object per line, flushed and fsynced per record. A torn last line (the
  process died mid-write) is dropped on open; a bad line anywhere else is an error.
- `History`: the trials of one search, in order.
- `ScoreCache`: scores keyed by hash(canonical params, scorer id, data hash, context); shared by
  every search in a run directory, so a repeated point costs no evaluation.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bmmstream.errors import BmmError
from bmmstream.search.space import canonical, params_key


class JsonlLog:
    """An append-only JSON-lines file: `records` as read on open, `append` adds one durably."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = self._read_and_repair()

    def _read_and_repair(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records, pos, good_end = [], 0, 0
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            is_last = i == len(lines) - 1
            if is_last and raw == b"":
                break  # the file ends with a newline: nothing torn
            try:
                if is_last:
                    raise ValueError("no trailing newline")
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:
                if is_last or all(not r.strip() for r in lines[i + 1 :]):
                    break  # torn tail: dropped below
                raise BmmError(f"{self.path}: line {i + 1} is not a JSON object; the file is corrupt") from None
            records.append(rec)
            pos += len(raw) + 1
            good_end = pos
        if good_end != len(data):
            with open(self.path, "r+b") as f:  # drop the torn tail so the next append starts a clean line
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return records

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class Trial:
    """One evaluated point. `phase` is "search" for the budgeted trials, "final" for the full-fidelity
    re-scoring of the best few; `cached` says the score came from the cache (no evaluation ran)."""

    trial: int
    phase: str
    params: dict
    fidelity: str  # "proxy" or "full"
    score: float
    seconds: float
    cached: bool = False
    key: str = ""
    extra: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, rec: dict) -> "Trial":
        try:
            return cls(**rec)
        except TypeError as ex:
            raise BmmError(f"search history: bad trial record {rec!r}: {ex}") from None


class History:
    """The trials of one search, stored in `<search_dir>/history.jsonl`."""

    def __init__(self, path: str | Path):
        self.log = JsonlLog(path)
        self.trials = [Trial.from_record(r) for r in self.log]
        for i, t in enumerate(self.trials):
            if t.trial != i:
                raise BmmError(f"{self.log.path}: record {i + 1} has trial index {t.trial}, expected {i}")

    def append(self, trial: Trial) -> None:
        if trial.trial != len(self.trials):
            raise ValueError(f"trial {trial.trial} appended after {len(self.trials)} trials")
        self.log.append(trial.to_record())
        self.trials.append(trial)

    def __len__(self) -> int:
        return len(self.trials)


def cache_key(params: dict, scorer_id: str, data_hash: str = "", context: str = "") -> str:
    """sha256 of (canonical params, scorer id, data hash, context): equal keys mean equal scores."""
    text = json.dumps(
        {"params": json.loads(params_key(params)), "scorer": scorer_id, "data": data_hash, "context": context},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


class ScoreCache:
    """Scores on disk, `<run_dir>/search/scores.jsonl`; the first record of a key wins."""

    def __init__(self, path: str | Path):
        self.log = JsonlLog(path)
        self._scores: dict[str, float] = {}
        self._rows: dict[str, list[float]] = {}
        for rec in self.log:
            if rec["key"] not in self._scores:
                self._scores[rec["key"]] = float(rec["score"])
                if rec.get("rows") is not None:
                    self._rows[rec["key"]] = [float(r) for r in rec["rows"]]

    def get(self, key: str) -> float | None:
        return self._scores.get(key)

    def rows(self, key: str) -> list[float] | None:
        """The per-row scores stored with a key's score (None when the scorer gave none); they let
        a staged search estimate validation noise for cached points too."""
        return self._rows.get(key)

    def put(self, key: str, score: float, rows: list[float] | None = None, **info: Any) -> None:
        if key in self._scores:
            return
        rec = {"key": key, "score": float(score), **canonical(info)}
        if rows is not None:
            rec["rows"] = [float(r) for r in rows]  # exact: not rounded like the info fields
            self._rows[key] = rec["rows"]
        self.log.append(rec)
        self._scores[key] = float(score)

    def __contains__(self, key: str) -> bool:
        return key in self._scores

    def __len__(self) -> int:
        return len(self._scores)
