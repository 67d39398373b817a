"""Keeping peak memory flat over many layers."""
from __future__ import annotations


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc only; a no-op elsewhere).

    Each layer allocates and frees weight-sized blocks; glibc's dynamic mmap threshold then serves
    later blocks from the heap, whose free pages stay in RSS and fragment, so without this RSS
    grows by a few MB per layer (measured in bench/calibration_memory.py and bench/rss_depth.py).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
