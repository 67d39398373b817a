"""Executors: where a prepared job's streaming units are computed (stage: pipeline level).

The default is the pipeline's own loop in this process. `ray_units` shards units over Ray workers
(`bmm merge --executor ray`), `ray_session` joins or starts Ray for them and for the search's trial
actors (search/ray_trials.py); Ray is an optional extra and is imported only when that executor is
chosen. Modules here may import the pipeline and every earlier stage (sources ... output), never
search or the entry points.
"""
from __future__ import annotations

import importlib.util
import socket
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
        if self.kind == "ray" and self.address is not None:
            check_address(self.address)


ADDRESS_FORMS = "HOST:PORT (the head's GCS port, 6379 unless `ray start --head --port` said otherwise), ray://HOST:PORT or auto"


def check_address(address: str, timeout: float = 3.0) -> None:
    """One-line BmmError, before anything is started, when `address` is malformed or nothing listens
    there (ray.init would otherwise retry for a minute and print a multi-line trace). `auto` (the
    cluster `ray start` recorded on this machine, or RAY_ADDRESS) is left to Ray."""
    if not isinstance(address, str) or not address.strip():
        raise BmmError(f"--address {address!r}: empty; expected {ADDRESS_FORMS}")
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in hostport:
        raise BmmError(f"--address {address}: malformed; expected {ADDRESS_FORMS}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except socket.gaierror:
        raise BmmError(f"--address {address}: unknown host {host!r}") from None
    except ConnectionRefusedError:
        raise BmmError(f"--address {address}: nothing is listening there (connection refused); start the cluster "
                       f"with `ray start --head` on {host}, or leave out --address for a local Ray") from None
    except OSError as e:  # timeout, unreachable network
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise BmmError(f"--address {address}: cannot reach it ({why} within {timeout:g} s); is the Ray head "
                       f"running and the port open?") from None


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
