"""Large CPU output buffers backed by transparent huge pages where the kernel offers them.

Why: a merge allocates every output tensor fresh, and the allocator maps it anew (the `bmm` command
fixes glibc's mmap threshold at 1 MiB so freed tensors go back to the system), so each 4 KiB page is
faulted in and zeroed on its first write, which cost the fused task-arithmetic kernel more than its
arithmetic. With madvise(MADV_HUGEPAGE) the kernel faults 2 MiB at a time: the fused merge of
`bench/bench_fused_linear.py --hugepages both` went from 2.8x to 1.3x a warm read of its inputs (1 thread),
whole merges (`bench/hugepages_ab.py`) to 0.76-0.90x their time (bench/RESULTS.md, 2026-12-08).
Where transparent huge pages are off ("never") or the platform has no madvise, or the buffer is small,
`empty` is plain `torch.empty`. The bytes are uninitialised either way, as torch.empty's.
"""
from __future__ import annotations

import ctypes
import math
import mmap
from functools import lru_cache
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 8 << 20  # below this the faults cost little and a mapping per tensor costs two syscalls
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@lru_cache(maxsize=1)
def available() -> bool:
    """THP can back an madvised mapping: Linux, mmap.MADV_HUGEPAGE, mode `always` or `madvise`."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = THP_ENABLED.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor; large ones on a huge-page-advised anonymous mapping,
    2 MiB aligned, freed (unmapped) with the tensor."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES or not available():
        return torch.empty(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    offset = -ctypes.addressof(anchor) % HUGE_PAGE
    del anchor  # a live export would keep the mapping from being closed
    whole = nbytes - nbytes % HUGE_PAGE  # the tail stays in 4 KiB pages: no partly used huge page
    if whole:
        try:
            m.madvise(mmap.MADV_HUGEPAGE, offset, whole)
        except OSError:
            pass  # refused (e.g. a kernel without THP for anonymous memory): ordinary pages
    # frombuffer holds a reference to `m`: the mapping lives exactly as long as the tensor's storage
    flat = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)
