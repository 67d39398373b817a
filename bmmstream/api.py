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
) -> Path:
    """Merge as the config says; resumes if `run_dir` holds an unfinished run of the same config.
    Returns the merged model folder. `executor="ray"` (or {"kind": "ray", "workers": N, "address": A})
    computes the units on N Ray workers (a local Ray, or the cluster at `address`); same output bytes.
    Not part of the config on purpose: it changes where the work runs, not what the merge is."""
    from bmmstream.executors import executor_spec
    from bmmstream.pipeline import execute, prepare

    spec = executor_spec(executor, workers, address)
    with _disk_errors():
        job = prepare(config, out=out, run_dir=run_dir, device=device)
        try:
            return execute(job, progress=progress, executor=spec)
        finally:
            job.sources.close()


def resume(run_dir: str | Path, device: str = "auto", progress: bool = True) -> Path:
    """Continue a killed run from its run directory; bit-identical to an uninterrupted run.
    A search run continues its search (same history, same choice), then writes the best point."""
    from bmmstream.errors import BmmError
    from bmmstream.output.rundir import RunDir

    run = RunDir(Path(run_dir))
    if not run.exists():
        raise BmmError(f"{run_dir}: not a bmmstream run directory (no run.json)")
    rec = run.load()
    if rec["config"].get("search"):
        res = search_merge(rec["config"], out=rec["output"], run_dir=run_dir, device=device, progress=progress)
        return Path(res["output"])
    return merge(rec["config"], out=rec["output"], run_dir=run_dir, device=device, progress=progress)


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
) -> dict:
    """Search BMM's per-block hyperparameters on a validation score, then write the best model
    (`bmm search`). Resumable: the history and score cache live in the run directory."""
    from bmmstream.search.run import search_merge as _search

    with _disk_errors():
        return _search(config, out=out, run_dir=run_dir, device=device, progress=progress)
