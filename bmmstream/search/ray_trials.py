"""Search trials evaluated by Ray actors, each holding a resident model (`bmm search --executor ray`).

The driver (search/run.py) runs the statistics pass once: every regressed module's factors go to
the run's statistics store, and the resident model's other tensors (pass-through, the anchor's
non-regressed tensors, buffers) are filled and saved to <run>/search_resident.safetensors. Each
actor then reopens the run from its directory (a shared filesystem across machines, as for the
store), builds the same model on its device (its GPU, or a CPU slot), loads those other tensors
from that file (so a restarted actor can too) and evaluates points with `StreamedTrials`, streaming
the factors from the shared store as the single-process search does; it returns the scorer's answer, the
seconds it took and the trial's cost split. The driver keeps the optimiser, the score cache and the
history (search/driver.py, `submit`), so a killed search resumes as today.

Scores equal the single-process search's bit for bit: same factors, same tensors, same code, and
the driver's torch thread count (CPU reductions round by it). A worker process that dies is
restarted by Ray and its trial retried. Imported only for `executor: ray` (it imports Ray); it lives
in search/ because the actors run the search's own trial code (run.py), which executors/ may not import.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from bmmstream.errors import BmmError
from bmmstream.executors import ExecutorSpec
from bmmstream.executors.ray_session import RETRIES, actor_options, connect, worker_count, worker_env


class TrialWorker:
    """One actor: the run reopened from its directory, a resident model, the configured scorers."""

    def __init__(self, run_root: str, out: str, device: str, threads: int, env: dict[str, str],
                 sys_path: list[str], units: list, key: str, keep_base: bool, scorer_cfg: dict, scorer_dir: str,
                 tokenizer_dir: str | None):
        from safetensors.torch import load_file

        from bmmstream.output.rundir import RunDir
        from bmmstream.pipeline import prepare
        from bmmstream.search.run import StreamedTrials, _base_weight, _resident_model, _resident_params
        from bmmstream.search.scorers import make_scorers
        from bmmstream.statistics.calibration_data import load_tokenizer
        from bmmstream.statistics.store import StatsStore

        torch.set_num_threads(threads)  # the driver's: scores equal the single-process search's
        os.environ.update(env)
        sys.path[:0] = [p for p in sys_path if p not in sys.path]  # a `callable:` scorer's module
        run = RunDir(Path(run_root))
        self.job = job = prepare(run.load()["config"], out=out, run_dir=run_root, device=device)
        self.key = key
        self.model = _resident_model(job)
        params = _resident_params(job, self.model)
        with torch.no_grad():
            own = self.model.state_dict(keep_vars=True)
            for k, t in load_file(Path(run_root) / RESIDENT).items():
                kind, n = k.split(":", 1)
                (own[n].data if kind == "m" else params[n]).copy_(t)
        base = {m.name: _base_weight(job, m.name, m.transposed) for u in units for m in u} if keep_base else None
        self.trials = StreamedTrials(job, StatsStore(job.run.stats), units, params, base, key,
                                     float(job.method.params["eps"]))
        tokenizer = load_tokenizer(Path(tokenizer_dir)) if tokenizer_dir is not None else None
        full, proxy = make_scorers(scorer_cfg, tokenizer=tokenizer, base_dir=scorer_dir)
        self.scorers = {"full": full, "proxy": proxy}

    def scorer_ids(self) -> dict:
        return {f: (s.id, s.data_hash) if s is not None else None for f, s in self.scorers.items()}

    def evaluate(self, fidelity: str, point: dict) -> tuple[Any, float, dict]:
        """(the scorer's answer, seconds, cost split) for one point at one fidelity."""
        import time
        from dataclasses import asdict

        from bmmstream.search.run import _with_fixed_groups

        t0 = time.perf_counter()
        cost = self.trials.apply(_with_fixed_groups(point, self.job.method, self.key))
        t1 = time.perf_counter()
        with torch.no_grad():
            answer = self.scorers[fidelity].scored(self.model)
        cost.score_s = time.perf_counter() - t1
        return answer, time.perf_counter() - t0, asdict(cost)

    def digests(self) -> list[dict[str, bytes]]:
        """Per source, the sha256 of every Hub tensor this actor read (W_pre, keep_base false)."""
        from bmmstream.executors.ray_units import read_digests

        return [read_digests(s, list(s.tensor_infos())) for s in self.job.sources.all]

    def close(self) -> None:
        self.job.sources.close()


RESIDENT = "search_resident.safetensors"


def save_resident(run_root: Path, model: torch.nn.Module, params: dict[str, torch.Tensor], regressed: set[str]
                  ) -> None:
    """What an actor copies from the driver's model after the statistics pass, to <run>/RESIDENT:
    the model's state entries that share no memory with a regressed weight (those are rewritten by
    every trial), "m:<state name>", and, by checkpoint name, the non-regressed tensors that live in
    such shared memory (a fused expert stack part of which is not regressed), "c:<name>"."""
    from safetensors.torch import save_file

    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    written = {storage(params[n]) for n in regressed}
    out = {f"m:{n}": t.detach().cpu().contiguous().clone() for n, t in model.state_dict().items()
           if storage(t) not in written}
    out.update({f"c:{n}": t.detach().cpu().contiguous().clone() for n, t in params.items()
                if n not in regressed and storage(t) in written})
    tmp = run_root / (RESIDENT + ".tmp")
    save_file(out, str(tmp))
    os.replace(tmp, run_root / RESIDENT)


def _driver_error(e: BaseException) -> BaseException:
    """A worker's error as a local search raises it: its BmmError line, its OSError; a worker that
    died more often than Ray restarts it: one line saying how to resume."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause
        if isinstance(cause, BmmError):
            return BmmError(str(cause))
        if isinstance(cause, (OSError, MemoryError)):
            return cause
        return e
    if isinstance(e, ray.exceptions.RayActorError):
        return BmmError(f"a Ray search worker died {RETRIES + 1} times; rerun the same command to resume "
                        f"({type(e).__name__})")
    return e


class RayTrials:
    """`workers` TrialWorker actors; `submit(fidelity, point)` is the search driver's Submit.

    A point goes to the actor with the fewest trials queued. `on_cost(point, fidelity, cost)` is
    called (under a lock, from Ray's thread) when a trial's result arrives."""

    def __init__(self, job, spec: ExecutorSpec, *, units: list, key: str,
                 keep_base: bool, scorer_cfg: dict, scorer_dir: str, tokenizer_dir: str | None,
                 expected_ids: dict, on_cost: Callable[[dict, str, dict], None]):
        self.workers: list = []
        self.on_cost = on_cost
        self.resident = job.run.root / RESIDENT  # written by save_resident before; a resume writes it again
        self._lock = threading.Lock()
        self.started = connect(spec)
        try:
            gpu = job.device.type == "cuda"
            n = worker_count(spec, gpu)
            actor = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(TrialWorker).options(
                **actor_options(gpu))
            args = (str(job.run.root), str(job.out), "cuda" if gpu else "cpu", torch.get_num_threads(),
                    worker_env(spec), list(sys.path), units, key, keep_base,
                    scorer_cfg, str(scorer_dir), tokenizer_dir)
            self.workers = [actor.remote(*args) for _ in range(n)]
            self.queued = [0] * n
            for ids in self._get([w.scorer_ids.remote() for w in self.workers]):
                if ids != expected_ids:
                    raise BmmError(f"search: a Ray worker built the scorer as {ids}, the driver as {expected_ids}; "
                                   f"the scorer's module and data files must be the same on every machine")
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return len(self.workers)

    @staticmethod
    def _get(refs):
        try:
            return ray.get(refs)
        except BaseException as e:
            raise _driver_error(e) from None

    def submit(self, fidelity: str, point: dict) -> concurrent.futures.Future:
        with self._lock:
            i = min(range(len(self.workers)), key=lambda k: (self.queued[k], k))
            self.queued[i] += 1
        inner = self.workers[i].evaluate.remote(fidelity, point).future()
        outer: concurrent.futures.Future = concurrent.futures.Future()

        def done(f: concurrent.futures.Future) -> None:
            with self._lock:
                self.queued[i] -= 1
            try:
                answer, seconds, cost = f.result()
            except BaseException as e:  # noqa: BLE001 - handed to the driver, raised there
                outer.set_exception(_driver_error(e))
                return
            with self._lock:
                self.on_cost(point, fidelity, cost)
            outer.set_result((answer, seconds))

        inner.add_done_callback(done)
        return outer

    def check_reads(self, sources) -> None:
        """The driver's sources take the digests of the Hub bytes the actors read: the final merge
        reads those tensors again and its verify() checks the files (ray_units.expect_digests)."""
        from bmmstream.executors.ray_units import expect_digests

        for w in self.workers:
            for src, d in zip(sources, self._get(w.digests.remote())):
                expect_digests(src, d)

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        self.resident.unlink(missing_ok=True)
        if self.started:
            ray.shutdown()
