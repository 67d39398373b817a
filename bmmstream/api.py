"""The Python API; the CLI is a thin shell over these functions."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from bmmstream.config import MergeConfig


@contextmanager
def _disk_errors():
    """A filesystem failure while writing (read-only, full, no permission) becomes one BmmError line;
    what was written stays, so rerunning the same command resumes."""
    from bmmstream.output.writer import disk_error

    try:
        yield
    except OSError as e:
        raise disk_error(e) from None


def merge(
    config: dict | str | Path | MergeConfig,
    out: str | Path | None = None,
    run_dir: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    executor: str | dict | None = None,
    workers: int | None = None,
    address: str | None = None,
    threads: int | str | None = None,
) -> Path:
    """Merge as the config says; resumes if `run_dir` holds an unfinished run of the same config.
    Returns the merged model folder. `threads`: CPU threads for torch and numba, an int >= 1 or "auto"
    (default: the config's `threads`, else auto; see bmmstream/executors/threads.py), restored after the call. `executor="ray"` (or {"kind": "ray", "workers": N, "address": A})
    computes the units on N Ray workers (a local Ray, or the cluster at `address`); same output bytes.
    Not part of the config on purpose: it changes where the work runs, not what the merge is."""
    from bmmstream.executors import executor_spec
    from bmmstream.pipeline import execute, prepare

    spec = executor_spec(executor, workers, address)
    with _disk_errors():
        job = prepare(config, out=out, run_dir=run_dir, device=device, threads=threads)
        try:
            return execute(job, progress=progress, executor=spec)
        finally:
            job.sources.close()


def resume(run_dir: str | Path, device: str = "auto", progress: bool = True,
           threads: int | str | None = None) -> Path:
    """Continue a killed run from its run directory; bit-identical to an uninterrupted run.
    A search run continues its search (same history, same choice), then writes the best point."""
    from bmmstream.errors import BmmError
    from bmmstream.output.rundir import RunDir

    run = RunDir(Path(run_dir))
    if not run.exists():
        raise BmmError(f"{run_dir}: not a bmmstream run directory (no run.json)")
    rec = run.load()
    if rec["config"].get("search"):
        res = search_merge(rec["config"], out=rec["output"], run_dir=run_dir, device=device, progress=progress,
                           threads=threads)
        return Path(res["output"])
    return merge(rec["config"], out=rec["output"], run_dir=run_dir, device=device, progress=progress,
                 threads=threads)


def status(run_dir: str | Path) -> dict:
    from bmmstream.pipeline import status as _status

    return _status(run_dir)


def plan_merge(config: dict | str | Path | MergeConfig, device: str = "auto") -> dict:
    """Modules, groups, blocks and estimates of RAM, disk, FLOPs and time, before heavy work."""
    from bmmstream.search.run import plan_search

    return plan_search(config, device=device)  # the merge's report, plus the search's when there is one


def search_merge(
    config: dict | str | Path | MergeConfig,
    out: str | Path | None = None,
    run_dir: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    threads: int | str | None = None,
    executor: str | dict | None = None,
    workers: int | None = None,
    address: str | None = None,
) -> dict:
    """Search BMM's per-block hyperparameters on a validation score, then write the best model
    (`bmm search`). Resumable: the history and score cache live in the run directory. `threads` as
    for merge: the whole search computes with that many threads. `executor="ray"` (as for merge):
    trials are evaluated by N Ray actors with resident models, N trials in flight."""
    from bmmstream.errors import BmmError
    from bmmstream.search.run import search_merge as _search
    from bmmstream.config import parse_threads
    from bmmstream.executors.threads import use_threads

    try:
        n = parse_threads(threads)
    except ValueError as e:
        raise BmmError(f"threads: {e}") from None
    if n is None:
        n = _run_threads(config, run_dir, use_config=threads is None)
    with _disk_errors(), use_threads(n):
        return _search(config, out=out, run_dir=run_dir, device=device, progress=progress,
                       executor=executor, workers=workers, address=address, threads=n)


def _run_threads(config, run_dir, use_config: bool) -> int:
    """A search's thread count when no count is given: the config's (unless "auto" was given), else the
    count its run directory recorded (a resumed search computes as the first start did), else auto."""
    from bmmstream.config import load_config
    from bmmstream.output.rundir import RunDir
    from bmmstream.pipeline import default_run_dir
    from bmmstream.config import AUTO
    from bmmstream.executors.threads import resolve_threads

    cfg = load_config(config)
    if use_config and isinstance(cfg.threads, int):
        return cfg.threads
    run = RunDir(Path(run_dir) if run_dir else default_run_dir(cfg, str(config)))
    recorded = run.load().get("threads") if run.exists() else None
    return recorded if isinstance(recorded, int) else resolve_threads(cfg.threads if use_config else AUTO)
