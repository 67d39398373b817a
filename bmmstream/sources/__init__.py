"""Stage 1, sources: where weights come from (local safetensors folders or the Hugging Face Hub) behind
one protocol, the safetensors header parser both use, and the checks that a set of sources can be merged.

May import: errors, config. Never a later stage (plan, statistics, solve, methods, output, search).
The factory lives here, outside base.py, so base never imports the sources that implement it.
"""
from __future__ import annotations

from pathlib import Path

from bmmstream.sources.base import TensorInfo, TensorSource

__all__ = ["TensorInfo", "TensorSource", "open_source"]


def open_source(spec: str, **options) -> TensorSource:
    """Open a local folder, or a Hub repo written `org/name[@rev]` / `hf://org/name[@rev]`."""
    p = Path(spec).expanduser()
    if p.exists() or spec.startswith((".", "/", "~")):
        from bmmstream.sources.local import LocalSource

        return LocalSource(p)
    from bmmstream.sources.hub import HubSource  # issue 4

    return HubSource.from_spec(spec, **options)
