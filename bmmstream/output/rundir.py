"""The run directory: everything a run needs to resume, and nothing else.

    run.json        resolved config (Hub revisions pinned), output path; written once, first
    prepass.json    a method's whole-model prepass result (e.g. TIES thresholds)
    stats.zarr/     per-module statistics with completion records
    journal.jsonl   the shard writer's per-tensor completion records
    solve.jsonl     lam, scale and damping used per module
    manifest.json   written last: its presence means the output is complete
The output folder is built as <out>.partial and renamed to <out> only when complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bmmstream.output.writer import write_json_atomic  # noqa: F401  (re-exported: run files use it)


def append_jsonl(path: Path, records: list[dict]) -> None:
    if not records:
        return
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (crash mid-write) is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def prepass(self) -> Path:
        return self.root / "prepass.json"

    @property
    def stats(self) -> Path:
        return self.root / "stats.zarr"

    @property
    def journal(self) -> Path:
        return self.root / "journal.jsonl"

    @property
    def solve_log(self) -> Path:
        return self.root / "solve.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def exists(self) -> bool:
        return self.run_json.exists()

    def complete(self) -> bool:
        return self.manifest.exists()

    def load(self) -> dict:
        return json.loads(self.run_json.read_text())
