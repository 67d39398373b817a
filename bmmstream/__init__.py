"""bmmstream: out-of-core Bayesian Model Merging of fine-tuned expert checkpoints."""
__version__ = "0.1.0"

from bmmstream.api import merge, plan_merge, resume, status  # noqa: E402

__all__ = ["merge", "plan_merge", "resume", "status", "__version__"]
