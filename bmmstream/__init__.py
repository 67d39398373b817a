"""bmmstream: out-of-core Bayesian Model Merging of fine-tuned expert checkpoints."""
__version__ = "0.1.0"

from bmmstream.api import merge, plan_merge, resume, search_merge, status  # noqa: E402

__all__ = ["merge", "plan_merge", "resume", "search_merge", "status", "__version__"]
