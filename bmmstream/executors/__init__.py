"""Executors: where a prepared job's streaming units are computed (stage: pipeline level).

The default is the pipeline's own loop in this process. `ray_units` shards units over Ray workers
(`bmm merge --executor ray`); Ray is an optional extra and is imported only when that executor is
chosen. Modules here may import the pipeline and every earlier stage (sources ... output), never
search or the entry points.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from bmmstream.errors import BmmError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSpec:
    """How a merge's units are computed: `local` (this process) or `ray` with `workers` workers on the
    cluster at `address` (None: a local Ray instance with `workers` CPU slots, or the already
    initialised one)."""

    kind: str = "local"
    workers: int | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise BmmError(f"executor must be one of {list(EXECUTORS)}, got {self.kind!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise BmmError(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.kind == "local" and (self.workers is not None or self.address is not None):
            raise BmmError("--workers and --address need --executor ray")
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:  # looked up, not imported
            raise BmmError("--executor ray needs Ray, an optional extra: pip install 'bmmstream[ray]'")


def executor_spec(executor: str | dict | ExecutorSpec | None, workers: int | None = None,
                  address: str | None = None) -> ExecutorSpec:
    """The API's `executor=` (a name, a dict {kind, workers, address} or a spec) as one ExecutorSpec."""
    if isinstance(executor, ExecutorSpec):
        return executor
    if isinstance(executor, dict):
        unknown = set(executor) - {"kind", "workers", "address"}
        if unknown:
            raise BmmError(f"executor: unknown key(s) {sorted(unknown)}; expected kind, workers, address")
        d = dict(executor)
        return ExecutorSpec(d.get("kind", "local"), d.get("workers", workers), d.get("address", address))
    return ExecutorSpec(executor or "local", workers, address)
