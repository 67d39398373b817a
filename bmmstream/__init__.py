"""bmmstream: out-of-core Bayesian Model Merging of fine-tuned expert checkpoints."""
__version__ = "0.1.0"

from bmmstream.statistics import blas_env  # noqa: E402,F401 - first: before anything loads scipy's OpenBLAS

from bmmstream.api import merge, plan_merge, resume, search_merge, status  # noqa: E402

__all__ = ["merge", "plan_merge", "resume", "search_merge", "status", "__version__"]
