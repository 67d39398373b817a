"""OpenBLAS's idle threads, settled before scipy's BLAS loads (bmmstream/__init__ imports this first).

The BMM statistics run SYRK/SYMM through scipy's OpenBLAS and the solve through torch's MKL. OpenBLAS
keeps its threads spinning for about 2^28 cycles after each call, so on a machine with few cores the
MKL/OpenMP work that follows ran on borrowed cores: the float32 solve of a 0.35B layer at 43% of the
matmul peak instead of 73%, statistics + solve 56% instead of 73% (bench/bmm_rate.py, 2 cores).
OPENBLAS_THREAD_TIMEOUT=4 (2^4 cycles, OpenBLAS's minimum) makes them sleep at once; OpenBLAS reads it
once, when the library loads, so a value the user set is kept, and a process that loaded scipy's
OpenBLAS before importing bmmstream keeps the spinning: the statistics then use torch's own GEMMs
instead (grams.py; the two paths agree to rounding, not bit for bit, so a run and its resume should
import in the same order, as `bmm` always does). The variable is inherited by child processes.
"""
from __future__ import annotations

import os
import sys



def _openblas_mapped() -> bool:
    """Whether an OpenBLAS scipy may use is loaded already: scipy.linalg imported, or a shared
    libopenblas mapped (conda and distributions link numpy and scipy to one; numpy's pip wheels bundle
    their own, under numpy.libs, which scipy does not use)."""
    if any(m in sys.modules for m in ("scipy.linalg", "scipy.linalg.blas")):
        return True
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:  # not Linux: only the module check
        return False
    return any("numpy.libs" not in p for p in paths)


_USER_SET = "OPENBLAS_THREAD_TIMEOUT" in os.environ
_LOADED_BEFORE = _openblas_mapped()
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def scipy_blas_fits() -> bool:
    """Whether CPU statistics may call scipy's BLAS: its threads sleep when idle (our setting took
    effect) or the user chose their own timeout."""
    return _USER_SET or not _LOADED_BEFORE
