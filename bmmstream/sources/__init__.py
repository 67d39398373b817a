"""Where weights come from: local folders or the Hugging Face Hub, behind one protocol."""
from bmmstream.sources.base import TensorInfo, TensorSource, open_source

__all__ = ["TensorInfo", "TensorSource", "open_source"]
