"""Streaming units computed by Ray workers; the driver writes them (pipeline.execute).

The plan is deterministic: unit i goes to worker i mod N. Each worker is a Ray actor that opens the
run's sources itself (the pinned config of run.json: local paths, a shared filesystem or the Hub with
its own disk budget) and returns a unit's merged tensors, already in the output dtype on the CPU, plus
the method's solve records. The driver takes results in unit order and writes them with the same
ShardWriter and journal as a local run, so resume, atomicity and the output bytes are unchanged; at
most 2 x N units are in flight, which bounds the driver's memory. A worker process that dies is
restarted by Ray and its unit recomputed (actor restarts and task retries); a whole run killed and
started again resumes from the journal as today.

This module is imported only for `executor: ray`; it imports Ray, nothing else in the package does.
"""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import ray
import torch

from bmmstream.errors import BmmError
from bmmstream.executors import ExecutorSpec

# fault injection for the tests: a file whose path this variable names holds a unit index; the worker
# that computes that unit removes the file and kills its own process once (Ray must retry the unit)
FAULT_ENV = "BMMSTREAM_RAY_FAULT_FILE"
RETRIES = 3  # restarts of a dead worker, and retries of the units it held


class UnitWorker:
    """One worker: the run reopened from its run directory, merging the units it is sent."""

    def __init__(self, run_root: str, out: str, device: str, prepass: dict | None, threads: int):
        from bmmstream.output.rundir import RunDir
        from bmmstream.pipeline import prepare
        from bmmstream.statistics.store import StatsStore

        # CPU float reductions (GEMM, Cholesky) split their work by thread count and so round by it:
        # the driver's count gives the single-process run's bytes (Ray would give 1 thread per slot)
        torch.set_num_threads(threads)
        run = RunDir(Path(run_root))
        self.job = prepare(run.load()["config"], out=out, run_dir=run_root, device=device)
        if prepass is not None:
            self.job.method.load_prepass_state(prepass)
        torch.manual_seed(self.job.cfg.seed)
        uses_store = getattr(self.job.method, "uses_statistics", False) or self.job.needs_grams
        self.store = StatsStore(self.job.run.stats) if uses_store else None

    def merge(self, i: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
        from bmmstream.pipeline import _merge_unit
        from bmmstream.sources.base import ST_TO_TORCH
        from bmmstream.statistics.capture import trim_heap

        _maybe_fail(i)
        job = self.job
        names = job.plan.units[i]
        merged = _merge_unit(job, names, self.store)
        out_dt = {n: dt for n, _, dt in job.layout}
        result = {n: merged[n].to(ST_TO_TORCH[out_dt[n]]).cpu() for n in names}
        records = list(getattr(job.method, "solve_records", None) or [])
        if records:
            job.method.solve_records.clear()
        for s in job.sources.all:
            s.release(names)
        del merged
        trim_heap()
        return result, records

    def close(self) -> None:
        self.job.sources.close()


def _maybe_fail(i: int) -> None:
    path = os.environ.get(FAULT_ENV)
    if not path:
        return
    try:
        if int(Path(path).read_text()) != i:
            return
        os.remove(path)  # only one process wins the removal: the fault happens once
    except (OSError, ValueError):
        return
    os._exit(1)


class RayUnits:
    """Units `todo` (indices into job.plan.units, in order) computed on Ray workers; `take(i)` returns
    unit i's merged tensors once it is done, keeping at most 2 x workers units in flight."""

    def __init__(self, job, spec: ExecutorSpec, todo: list[int]):
        self.started = False
        if not ray.is_initialized():
            kw = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
            if spec.address is None:
                kw["num_cpus"] = spec.workers or 1
            ray.init(address=spec.address, **kw)
            self.started = True
        try:
            self._start(job, spec, todo)
        except BaseException:
            self.close()
            raise

    def _start(self, job, spec: ExecutorSpec, todo: list[int]) -> None:
        self.workers: list = []
        self.job = job
        gpu = job.device.type == "cuda"
        have = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
        n = spec.workers or (max(1, have) if gpu else 1)
        if n > have:  # actors that can never be placed would wait forever
            where = spec.address or "the local Ray"
            raise BmmError(f"--workers {n}: {where} has {have} {'GPU' if gpu else 'CPU'} slot(s) "
                           f"(one per worker); use --workers {max(have, 1)} or a larger cluster")
        opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        actor = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(UnitWorker).options(**opts)
        prepass = job.method.prepass_state() if job.method.needs_prepass else None
        device = "cuda" if gpu else "cpu"  # a worker sees its one GPU as cuda:0
        threads = torch.get_num_threads()
        self.workers = [actor.remote(str(job.run.root), str(job.out), device, prepass, threads) for _ in range(n)]
        self.todo = deque(todo)
        self.pending: dict[int, ray.ObjectRef] = {}
        self._fill()

    def _fill(self) -> None:
        while self.todo and len(self.pending) < 2 * len(self.workers):
            i = self.todo.popleft()
            self.pending[i] = self.workers[i % len(self.workers)].merge.remote(i)

    def take(self, i: int) -> dict[str, torch.Tensor]:
        """Unit i's tensors (output dtype, CPU); its solve records join the driver's method."""
        ref = self.pending.pop(i)
        try:
            merged, records = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the worker's own error, as a local run raises it
            cause = e.cause
            if isinstance(cause, BmmError):
                raise BmmError(str(cause)) from None
            if isinstance(cause, (OSError, MemoryError)):
                raise cause from None
            raise
        except ray.exceptions.RayActorError as e:
            raise BmmError(f"ray worker for unit {i} died {RETRIES + 1} times; rerun the same command to "
                           f"resume ({type(e).__name__})") from None
        self._fill()
        if records and hasattr(self.job.method, "solve_records"):
            self.job.method.solve_records.extend(records)
        return merged

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.started:
            ray.shutdown()
