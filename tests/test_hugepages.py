"""bmmstream.methods.hugepages: large output buffers on huge-page-advised mappings, freed with their tensor,
and the fused kernels' bytes unchanged when their outputs live there."""
from __future__ import annotations

import gc

import pytest
import torch

from bmmstream.methods import hugepages


def _mapped(addr: int) -> bool:
    """Some mapping of this process covers `addr` (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def _vma_rss_kib(addr: int) -> int:
    """Resident KiB of the mapping covering `addr` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping")


@pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages for madvised memory here")
def test_large_buffer_aligned_lives_with_its_tensor_and_is_unmapped_after():
    t = hugepages.empty((1024, 4100), torch.bfloat16)  # 8.0 MiB: above MIN_BYTES
    assert t.shape == (1024, 4100) and t.dtype == torch.bfloat16 and t.is_contiguous()
    addr = t.data_ptr()
    assert addr % hugepages.HUGE_PAGE == 0
    t.copy_(torch.arange(1024 * 4100, dtype=torch.float32).reshape(1024, 4100).remainder(251))
    # resident: the bytes asked for (rounded to 4 KiB), not a whole huge page for the 8 KiB tail
    assert _vma_rss_kib(addr) <= -(-1024 * 4100 * 2 // 4096) * 4
    gc.collect()  # only `t` refers to the mapping now: it must still hold the values
    want = torch.arange(1024 * 4100, dtype=torch.float32).reshape(1024, 4100).remainder(251)
    assert torch.equal(t.float(), want)
    view = t[3:5]
    del t
    gc.collect()
    assert _mapped(addr) and torch.equal(view.float(), want[3:5])  # a view keeps the storage
    del view
    gc.collect()
    assert not _mapped(addr)


def test_small_or_unavailable_is_plain_torch_empty(monkeypatch):
    def no_mmap(*a, **k):
        raise AssertionError("mapped a buffer that should be torch.empty")

    monkeypatch.setattr(hugepages.mmap, "mmap", no_mmap)
    small = hugepages.empty((hugepages.MIN_BYTES // 4 - 1,), torch.float32)
    assert small.shape == (hugepages.MIN_BYTES // 4 - 1,) and small.dtype == torch.float32
    monkeypatch.setattr(hugepages, "available", lambda: False)
    big = hugepages.empty((hugepages.MIN_BYTES,), torch.float32)
    assert big.numel() == hugepages.MIN_BYTES and big.is_contiguous()


@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (4097,)])
def test_every_size_works_through_the_mapping(monkeypatch, shape):
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    t = hugepages.empty(shape, torch.float16)
    assert t.shape == shape and t.dtype == torch.float16
    t.fill_(2.5)
    assert bool((t == 2.5).all())
