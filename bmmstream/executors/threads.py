"""How many CPU threads a run computes with (torch intra-op and numba), and setting them for its duration.

Why a rule instead of torch's default (every core): on a machine where other processes keep cores
busy, threads beyond the free cores only wait for each other; measured on a 2-core machine with
about 1.4 cores of other work, 2 torch threads made task arithmetic 2x slower than 1.

`auto` = the cores this process may run on (os.sched_getaffinity) minus the 1-minute load average
caused by other processes (the load average less this process's own average CPU use since it
started), rounded to the nearest integer, at least 1 and at most the usable cores. An integer is
used as given. Not set: every usable core (torch's default). `auto` is opt-in because BLAS reductions
round by thread count: with a load-dependent count two runs of one BMM config on one machine could
differ in the last bits (a resumed run always reuses its recorded count, so resume stays bit-identical).
"""
from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from bmmstream.config import AUTO, parse_threads

_IMPORTED = time.monotonic()


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _process_age() -> float:
    """Seconds since this process started (Linux /proc; elsewhere since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def _own_load() -> float:
    """This process's share of the 1-minute load average, estimated as its CPU time over the last
    minute-ish: its CPU time divided by its age, or by 60 s when younger (the load average is a
    1-minute moving average, so a young process has added less than its CPU share)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (ru.ru_utime + ru.ru_stime) / max(_process_age(), 60.0)


def auto_threads() -> int:
    """The module docstring's rule."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    others = max(0.0, load - _own_load())
    return max(1, min(cores, int(cores - others + 0.5)))


def resolve_threads(value: int | str | None) -> int:
    """An int as given; "auto": the load-aware rule above; None (not set): every usable core, as torch's own
    default, so two runs of one config on one machine compute, and round, alike whatever the load."""
    n = parse_threads(value)
    if n is not None:
        return n
    return auto_threads() if value == AUTO else usable_cores()


def _numba():
    try:
        import numba

        return numba
    except ImportError:  # pragma: no cover (numba is a dependency; kernels fall back without it)
        return None


@contextmanager
def use_threads(n: int) -> Iterator[int]:
    """torch and numba compute with `n` threads inside the block (numba at most its pool size); the
    previous counts are restored after, so a library call does not change the caller's settings."""
    nb = _numba()
    old_torch = torch.get_num_threads()
    old_numba = nb.get_num_threads() if nb is not None else None
    torch.set_num_threads(n)
    if nb is not None:
        nb.set_num_threads(max(1, min(n, nb.config.NUMBA_NUM_THREADS)))
    try:
        yield n
    finally:
        torch.set_num_threads(old_torch)
        if nb is not None:
            nb.set_num_threads(old_numba)
