"""Numba kernels for the few loops torch does not express well on the CPU.

Magnitude histogram (TIES' global threshold): |x| of a float32 is a non-negative IEEE number whose
bit pattern, read as an integer, is monotone in the value. Dropping the sign bit and the low
`23 - MANTISSA_BITS` mantissa bits therefore maps every magnitude to a log-spaced bin: each octave
[2^e, 2^(e+1)) is cut into 2^MANTISSA_BITS equal sub-bins, so a bin's upper edge is at most
(1 + 2^-MANTISSA_BITS) times its lower edge. A quantile read off the histogram as the lower edge of
the bin that holds it is therefore within that relative factor of the exact order statistic (of the
float32-rounded magnitudes). Zeros and subnormals fall in the lowest bins; NaN/inf in the highest.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

MANTISSA_BITS = 12
SHIFT = 23 - MANTISSA_BITS
NUM_BINS = 1 << (31 - SHIFT)  # 2^20 bins: 8 MiB of int64 counts per task
REL_ERROR = 2.0**-MANTISSA_BITS  # bin upper edge / lower edge - 1


@numba.njit(cache=True, nogil=True)
def _hist_bits(bits: np.ndarray, counts: np.ndarray, shift: int) -> None:
    for i in range(bits.size):
        counts[(bits[i] & 0x7FFFFFFF) >> shift] += 1


def add_magnitude_histogram(x: torch.Tensor, counts: np.ndarray) -> None:
    """Add the log-spaced magnitude histogram of `x` (any float dtype, any device) to `counts`."""
    xf = x.detach().reshape(-1).to(torch.float32)
    if xf.device.type != "cpu":
        # On an accelerator a bincount there beats copying the tensor back.
        add_magnitude_histogram_torch(xf, counts)
        return
    bits = xf.contiguous().numpy().view(np.uint32)
    _hist_bits(bits, counts, SHIFT)


def add_magnitude_histogram_torch(xf: torch.Tensor, counts: np.ndarray) -> None:
    """The same histogram with torch ops on the tensor's device (float32 input)."""
    idx = ((xf.contiguous().view(torch.int32) & 0x7FFFFFFF) >> SHIFT).to(torch.int64)
    counts += torch.bincount(idx, minlength=NUM_BINS).cpu().numpy()


def bin_lower_edge(b: int) -> float:
    """Smallest float32 magnitude that falls in bin `b`."""
    return float(np.array([b << SHIFT], dtype=np.uint32).view(np.float32)[0])


def kth_smallest_from_histogram(counts: np.ndarray, k: int) -> float:
    """Lower edge of the bin holding the k-th smallest magnitude (1-based).

    The exact k-th smallest value v satisfies edge <= v < edge * (1 + REL_ERROR) (edge = 0 only when
    v is below the smallest normal float32)."""
    if k < 1:
        return 0.0
    cum = np.cumsum(counts)
    if k > int(cum[-1]):
        raise ValueError(f"k={k} exceeds the {int(cum[-1])} values histogrammed")
    b = int(np.searchsorted(cum, k, side="left"))
    return bin_lower_edge(b)
