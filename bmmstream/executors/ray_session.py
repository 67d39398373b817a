"""The Ray session and worker slots shared by the merge (ray_units) and the search (search/ray_trials).

Imported only for `executor: ray`. `connect` joins the cluster the spec names (or starts a local
Ray with `workers` CPU slots, or uses the one the caller already initialised); `worker_count`
refuses more workers than the cluster has slots for, since an actor that can never be placed would
wait forever; `worker_env` is what a worker needs from the driver's environment to read the same
sources (the Hub endpoint a driver was pointed at; Ray workers inherit the raylet's environment).
"""
from __future__ import annotations

import os

import ray

from bmmstream.errors import BmmError
from bmmstream.executors import ExecutorSpec

RETRIES = 3  # restarts of a dead worker, and retries of the tasks it held


def connect(spec: ExecutorSpec) -> bool:
    """Ray up for this run; True when this call started it (the caller shuts it down then)."""
    if ray.is_initialized():
        return False
    kw = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
    if spec.address is None:
        kw["num_cpus"] = spec.workers or 1
    try:
        ray.init(address=spec.address, **kw)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:  # checked up front; a race remains
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BmmError(f"--address {spec.address}: cannot join the Ray cluster there ({first})") from None
    return True


def worker_count(spec: ExecutorSpec, gpu: bool) -> int:
    """Workers to start: the spec's, else one per GPU of the cluster (cuda) or 1; refused beyond the slots."""
    have = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
    n = spec.workers or (max(1, have) if gpu else 1)
    if n > have:
        where = spec.address or "the local Ray"
        raise BmmError(f"--workers {n}: {where} has {have} {'GPU' if gpu else 'CPU'} slot(s) "
                       f"(one per worker); use --workers {max(have, 1)} or a larger cluster")
    return n


def actor_options(gpu: bool) -> dict:
    return {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}


def worker_env(spec: ExecutorSpec) -> dict[str, str]:
    """HF_ENDPOINT and HF_HUB_OFFLINE of the driver (a worker must read the Hub the driver resolved
    and pinned), and on a local Ray its HF_HUB_CACHE (the same machine: one cache). Tokens are not
    sent; workers use their machine's login (`hf auth login`, HF_TOKEN)."""
    keys = ("HF_ENDPOINT", "HF_HUB_OFFLINE") + (("HF_HUB_CACHE",) if spec.address is None else ())
    return {k: os.environ[k] for k in keys if k in os.environ}
