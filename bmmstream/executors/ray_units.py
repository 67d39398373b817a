"""Streaming units computed by Ray workers; the driver writes them (pipeline.execute).

The plan is deterministic: unit i goes to worker i mod N. Each worker is a Ray actor that opens the
run's sources itself (the pinned config of run.json: local paths, a shared filesystem or the Hub with
its own disk budget) and returns a unit's merged tensors, already in the output dtype on the CPU, plus
the method's solve records. The driver takes results in unit order and writes them with the same
ShardWriter and journal as a local run, so resume, atomicity and the output bytes are unchanged; at
most 2 x N units are in flight, which bounds the driver's memory. A worker process that dies is
restarted by Ray and its unit recomputed (actor restarts and task retries); a whole run killed and
started again resumes from the journal as today. Hub sources: each worker sends back the sha256 of
every tensor's bytes it merged, and the driver's end-of-run `verify()` checks them against the
files the Hub recorded (a mismatch fails the run and discards its derived files, as a local run).

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
from bmmstream.executors.ray_session import RETRIES, actor_options, connect, worker_count, worker_env

# fault injection for the tests: a file whose path this variable names holds a unit index; the worker
# that computes that unit removes the file and kills its own process once (Ray must retry the unit)
FAULT_ENV = "BMMSTREAM_RAY_FAULT_FILE"


class UnitWorker:
    """One worker: the run reopened from its run directory, merging the units it is sent."""

    def __init__(self, run_root: str, out: str, device: str, prepass: dict | None, threads: int,
                 env: dict[str, str] | None = None):
        from bmmstream.output.rundir import RunDir
        from bmmstream.pipeline import prepare
        from bmmstream.statistics.store import StatsStore

        os.environ.update(env or {})  # this actor's own process: the driver's Hub endpoint
        # CPU float reductions (GEMM, Cholesky) split their work by thread count and so round by it:
        # the driver's count gives the single-process run's bytes (Ray would give 1 thread per slot)
        torch.set_num_threads(threads)
        self.threads = threads  # numba's count is per calling thread: set again around each unit
        run = RunDir(Path(run_root))
        self.job = prepare(run.load()["config"], out=out, run_dir=run_root, device=device)
        if prepass is not None:
            self.job.method.load_prepass_state(prepass)
        torch.manual_seed(self.job.cfg.seed)
        uses_store = getattr(self.job.method, "uses_statistics", False) or self.job.needs_grams
        job = self.job
        self.store = StatsStore.for_run(job.run.stats, needs_grams=job.needs_grams, search=job.cfg.search is not None,
                                        keep_statistics=bool(job.cfg.parameters.get("keep_statistics", False))
                                        ) if uses_store else None

    def merge(self, i: int) -> tuple[dict[str, torch.Tensor], list[dict], list[dict[str, bytes]]]:
        from bmmstream.pipeline import _merge_unit
        from bmmstream.sources.base import ST_TO_TORCH
        from bmmstream.statistics.capture import trim_heap

        _maybe_fail(i)
        job = self.job
        names = job.plan.units[i]
        from bmmstream.executors.threads import use_threads

        with use_threads(self.threads):
            merged = _merge_unit(job, names, self.store)
        out_dt = {n: dt for n, _, dt in job.layout}
        result = {n: merged[n].to(ST_TO_TORCH[out_dt[n]]).cpu() for n in names}
        records = list(getattr(job.method, "solve_records", None) or [])
        if records:
            job.method.solve_records.clear()
        digests = [read_digests(s, names) for s in job.sources.all]
        for s in job.sources.all:
            s.release(names)
        del merged
        trim_heap()
        return result, records, digests

    def close(self) -> None:
        self.job.sources.close()


def read_digests(src, names: list[str]) -> dict[str, bytes]:
    """sha256 of the bytes a Hub source handed out for `names` (HubSource keeps one per tensor read);
    empty for other sources."""
    digests = getattr(src, "_digests", None)
    if digests is None:
        return {}
    with src._cv:
        return {n: digests[n] for n in names if n in digests}


def expect_digests(src, digests: dict[str, bytes]) -> None:
    """The driver's Hub source takes the digests of the bytes a worker used: `src.verify()` then
    fetches those tensors, checks that they hash as the worker's did and that the file they form
    has the Hub's recorded sha256. So the bytes each worker merged are the verified bytes, as in a
    local run, where verify() hashes the bytes the merge itself used."""
    if not digests:
        return
    with src._cv:
        for n, d in digests.items():
            first = src._digests.setdefault(n, d)
            if first != d:
                raise BmmError(f"{src._where(src._loc[n][0])}: tensor '{n}' read twice with different bytes "
                               f"(by two Ray workers, or a worker and the driver: corrupted in transit or changed "
                               f"on the server); rerun to fetch it again")


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
        self.workers: list = []
        self.started = connect(spec)
        try:
            self._start(job, spec, todo)
        except BaseException:
            self.close()
            raise

    def _start(self, job, spec: ExecutorSpec, todo: list[int]) -> None:
        self.job = job
        gpu = job.device.type == "cuda"
        n = worker_count(spec, gpu)
        actor = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(UnitWorker).options(**actor_options(gpu))
        prepass = job.method.prepass_state() if job.method.needs_prepass else None
        device = "cuda" if gpu else "cpu"  # a worker sees its one GPU as cuda:0
        threads = torch.get_num_threads()
        env = worker_env(spec)
        self.workers = [actor.remote(str(job.run.root), str(job.out), device, prepass, threads, env)
                        for _ in range(n)]
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
            merged, records, digests = ray.get(ref)
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
        for src, d in zip(self.job.sources.all, digests):  # checked by the driver's verify() at the end
            expect_digests(src, d)
        if records and hasattr(self.job.method, "solve_records"):
            self.job.method.solve_records.extend(records)
        return merged

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.started:
            ray.shutdown()
