"""OpenBLAS's idle threads, settled before scipy's BLAS loads (bmmstream/__init__ imports this first).

The BMM statistics run SYRK/SYMM through scipy's OpenBLAS and the solve through torch's MKL. OpenBLAS
keeps its threads spinning for about 2^28 cycles after each call, so on a machine with few cores the
MKL/OpenMP work that follows ran on borrowed cores: the float32 solve of a 0.35B layer at 43% of the
matmul peak instead of 73%, statistics + solve 56% instead of 73% (bench/bmm_rate.py, 2 cores).
OPENBLAS_THREAD_TIMEOUT=4 (2^4 cycles, OpenBLAS's minimum) makes them sleep at once; OpenBLAS reads it
once, when the library loads, so a value the user set is kept, and a process that loaded scipy.linalg
before importing bmmstream keeps the spinning: the statistics then use torch's own GEMMs instead
(grams.py).
"""
from __future__ import annotations

import os
import sys

_USER_SET = "OPENBLAS_THREAD_TIMEOUT" in os.environ
_LOADED_BEFORE = any(m in sys.modules for m in ("scipy.linalg", "scipy.linalg.blas"))
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def scipy_blas_fits() -> bool:
    """Whether CPU statistics may call scipy's BLAS: its threads sleep when idle (our setting took
    effect) or the user chose their own timeout."""
    return _USER_SET or not _LOADED_BEFORE
