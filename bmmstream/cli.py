"""`bmm`: the command line. Each command is a thin shell over bmmstream.api.

typer is used for the CLI because it derives options and help from type hints (no hand-written
argument parsing) and comes with click's tested error handling.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from bmmstream.errors import BmmError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Out-of-core Bayesian Model Merging.")

DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto")
AddressOpt = typer.Option(None, "--address", help="Ray cluster to join (e.g. auto, or HEAD_IP:6379 after "
                          "`ray start --head`); default: a local Ray")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads for torch and numba: N >= 1 or auto (usable cores "
                          "minus the load of other processes); default: the config's threads, else every usable core")


# glibc serves allocations above its mmap threshold with mmap and returns them to the system when
# freed, but the threshold rises to the size of each freed mapping (up to 32 MiB), after which tensors
# of a few MiB (a module's G, C, U0, task vectors) come from its heap and stay there when freed: a
# merge's private memory drifted 0.2-0.4 GiB above what it holds (BMM on the 0.35B suite of
# bench/perf_vs_mergekit.py), which `bmm plan` cannot predict. The command fixes the threshold for its
# own process; the library leaves a host program's allocator alone.
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (no dynamic rise) so freed tensors go back to the system;
    False where the C library is not glibc or refuses."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
        if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
            return False
        return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD_BYTES)))
    except (OSError, AttributeError):
        return False


@app.callback()
def _process_setup() -> None:
    """Out-of-core Bayesian Model Merging."""
    return_freed_memory()


def _fail(e: BaseException) -> None:
    msg = str(e).replace("\n", " ")
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _stop_on_signals(run_dir: Path | None) -> None:
    """Ctrl-C and SIGTERM end the process at once with one line and exit 130 / 143.

    Why at once: every file a run writes is kill-safe (journaled tensors, atomic renames, completion
    records), so stopping here is as safe as SIGKILL; raising KeyboardInterrupt instead would surface
    inside native code (a safetensors read turns it into a misleading read error) or leave library
    threads (zarr's event loop) printing warnings at exit."""

    def handler(signum, frame):
        how = f"rerun the same command or `bmm resume {run_dir}`" if run_dir is not None else "rerun the same command"
        sys.stdout.flush()
        sys.stderr.write(f"error: stopped by {signal.Signals(signum).name}; the progress so far is kept, {how} "
                         f"to continue\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
def merge(
    config: Path = typer.Argument(..., help="merge config (YAML)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="merged model folder (default: RUN_DIR/model)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run directory (default: bmm-runs/<config>-<hash>)"),
    device: str = DeviceOpt,
    max_disk: Optional[str] = typer.Option(None, "--max-disk", help="Hub streaming: bytes held on disk at once (e.g. 2GB)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    executor: str = typer.Option("local", "--executor", help="local, or ray: units computed by Ray workers "
                                 "(pip install 'bmmstream[ray]'); same output bytes"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (default: the cluster's GPUs "
                                          "for cuda, else 1)"),
    address: Optional[str] = AddressOpt,
    threads: Optional[str] = ThreadsOpt,
):
    """Merge the models a config names; resumes if the run directory holds the same unfinished run."""
    from bmmstream.api import merge as _merge
    from bmmstream.config import load_config

    _stop_on_signals(run_dir)
    try:
        cfg = load_config(config)
        if max_disk is not None:
            cfg = cfg.model_copy(update={"max_disk": _size(max_disk)})
        if run_dir is None:
            from bmmstream.pipeline import default_run_dir

            run_dir = default_run_dir(cfg, str(config))
            _stop_on_signals(run_dir)  # the message names the run directory
        path = _merge(cfg, out=out, run_dir=run_dir, device=device, progress=progress,
                      executor=executor, workers=workers, address=address, threads=_threads(threads))
    except BmmError as e:
        _fail(e)
    typer.echo(f"run directory: {run_dir}")
    typer.echo(f"merged model: {path}")


def _threads(s: str | None) -> int | str | None:
    from bmmstream.config import parse_threads

    try:
        return parse_threads(s) if s not in (None, "auto") else s
    except ValueError as e:
        raise BmmError(f"--threads: {e}") from None


def _size(s: str) -> int:
    from bmmstream.config import parse_size

    try:
        return parse_size(s)
    except ValueError as e:
        raise BmmError(f"--max-disk: {e}") from None


@app.command()
def resume(run_dir: Path = typer.Argument(...), device: str = DeviceOpt, progress: bool = typer.Option(True, "--progress/--no-progress"),
           threads: Optional[str] = ThreadsOpt):
    """Continue a killed run; the output is bit-identical to an uninterrupted run."""
    from bmmstream.api import resume as _resume

    _stop_on_signals(run_dir)
    try:
        path = _resume(run_dir, device=device, progress=progress, threads=_threads(threads))
    except BmmError as e:
        _fail(e)
    typer.echo(f"merged model: {path}")


@app.command()
def status(run_dir: Path = typer.Argument(...)):
    """Show whether a run is complete and how far it got."""
    from bmmstream.api import status as _status

    try:
        st = _status(run_dir)
    except BmmError as e:
        _fail(e)
    for k, v in st.items():
        typer.echo(f"{k}: {v}")


@app.command()
def plan(config: Path = typer.Argument(...), device: str = DeviceOpt, as_json: bool = typer.Option(False, "--json")):
    """Modules, groups, blocks and estimates of RAM, disk, FLOPs and time; reads headers only."""
    from bmmstream.api import plan_merge as _plan

    try:
        rep = _plan(config, device=device)
    except BmmError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    est = rep["estimate"]
    typer.echo(f"family: {rep['family']}  layers: {rep['layers']}  experts: {rep['experts']}  method: {rep['method']['method']}")
    typer.echo(f"blocks (first..last layer): {rep['blocks']}")
    typer.echo(f"tensors by kind: {rep['counts']['kinds']}")
    typer.echo(f"regressed modules by group: {rep['counts']['groups']}")
    typer.echo(f"peak RAM (one unit resident): ~{_human(est['peak_ram_bytes'])}")
    typer.echo(f"output on disk: {_human(est['output_bytes'])}; statistics on disk at once: {_human(est['stats_disk_bytes'])}")
    calib = f" (calibration forward: {est['calibration_flops']:.3g})" if est["calibration_flops"] else ""
    typer.echo(f"bytes read: {_human(est['read_bytes'])}; compute: {est['flops']:.3g} FLOP{calib}")
    typer.echo(
        f"time: ~{est['seconds']:.3g} s on {est['device']} "
        f"(measured {est['measured_flops_per_s'] / 1e9:.1f} GFLOP/s, assumed reads {est['assumed_read_bytes_per_s'] / 1e9:.1f} GB/s)"
    )
    if est.get("method_work_seconds"):
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.3g} s" for k, v in est["method_work_seconds"].items())
        typer.echo(f"  of which the method's own work (rates measured now): {parts}")
    if "search" in rep:
        se = rep["search"]
        dev = _human(se["peak_device_bytes"]) if se.get("peak_device_bytes") else "-"
        typer.echo(
            f"search: statistics + factors on disk ~{_human(se['stats_disk_bytes'] + se['factor_disk_bytes'])}; "
            f"peak host ~{_human(se['peak_host_bytes'])}, device ~{dev}; keep W_pre resident: {se['keep_base']} "
            f"({se['keep_base_option']}); ~{se['trial_seconds_total']:.3g} s per trial before scoring "
            f"(factors {se['factor_dtype']})"
        )


@app.command()
def search(
    config: Path = typer.Argument(..., help="merge config (YAML) with a search: section"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="best merged model folder (default: RUN_DIR/model)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run directory (history, scores, statistics)"),
    device: str = DeviceOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    threads: Optional[str] = ThreadsOpt,
    executor: str = typer.Option("local", "--executor", help="local, or ray: trials evaluated by Ray workers, "
                                 "each with a resident model (pip install 'bmmstream[ray]')"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers = trials in flight (default: "
                                          "the cluster's GPUs for cuda, else 1)"),
    address: Optional[str] = AddressOpt,
):
    """Search per-block scale and per-group rho on a validation score; write the best model.
    Rerun the same command to resume a killed search."""
    from bmmstream.api import search_merge

    _stop_on_signals(run_dir)
    try:
        res = search_merge(config, out=out, run_dir=run_dir, device=device, progress=progress,
                           threads=_threads(threads), executor=executor, workers=workers, address=address)
    except BmmError as e:
        _fail(e)
    typer.echo(f"best parameters: {json.dumps(res['best_params'], sort_keys=True)}")
    if res["best_score"] is not None:
        typer.echo(f"best score: {res['best_score']:.6g}  (evaluations this run: {res['evaluations']})")
    typer.echo(f"report: {res['report_dir']}")
    typer.echo(f"merged model: {res['output']}")


@app.command()
def methods():
    """List the registered merge methods."""
    from bmmstream.methods.registry import method_class, method_names

    for name in method_names():
        cls = method_class(name)
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        typer.echo(f"{name:18s} {doc[0] if doc else ''}  {cls.parameter_summary()}")


@app.command()
def demo(
    directory: Path = typer.Option(Path("bmm-demo"), "--dir", help="where the demo experts and run go"),
    device: str = DeviceOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Build a tiny Llama base and three experts, merge them with BMM, print where the result is."""
    from bmmstream.demo import run_demo

    try:
        path = run_demo(directory, device=device, progress=progress)
    except BmmError as e:
        _fail(e)
    typer.echo(f"merged model: {path}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
