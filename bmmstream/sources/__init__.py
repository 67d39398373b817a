"""Stage 1, sources: where weights come from (local safetensors folders or the Hugging Face Hub) behind
one protocol, the safetensors header parser both use, and the checks that a set of sources can be merged.

May import: errors, config. Never a later stage (plan, statistics, solve, methods, output, search).
The factory lives here, outside base.py, so base never imports the sources that implement it.
"""
from __future__ import annotations

from pathlib import Path

from bmmstream.sources.base import TensorInfo, TensorSource

__all__ = ["TensorInfo", "TensorSource", "open_source"]


def open_source(spec: str, base: TensorSource | None = None, **options) -> TensorSource:
    """Open a local folder, or a Hub repo written `org/name[@rev]` / `hf://org/name[@rev]`.

    A PEFT LoRA adapter (a folder or repo with adapter_config.json and adapter_model.safetensors,
    no full weights) opens as the full model it stands for over `base` (the run's base source)."""
    from bmmstream.errors import BmmError
    from bmmstream.sources.lora import ADAPTER_CONFIG, LoraSource, is_adapter_folder, looks_like_adapter

    def expert_only() -> BmmError:
        return BmmError(f"{spec}: a PEFT LoRA adapter ({ADAPTER_CONFIG}) can only be an expert, read over base_model")

    p = Path(spec).expanduser()
    if p.exists() or spec.startswith((".", "/", "~")):
        from bmmstream.sources.local import LocalSource

        if is_adapter_folder(p):
            if base is None:
                raise expert_only()
            return LoraSource.from_folder(p, base, id=spec)
        return LocalSource(p)
    from bmmstream.sources.hub import HubSource  # issue 4

    src = HubSource.from_spec(spec, **options)
    if not looks_like_adapter(src):
        return src
    try:
        if base is None:
            raise expert_only()
        try:
            config_dir = src.aux_path(ADAPTER_CONFIG).parent
        except BmmError as e:
            raise BmmError(f"{spec}: holds PEFT adapter weights but no readable {ADAPTER_CONFIG} ({e})") from None
        return LoraSource(src, config_dir, base, id=spec)
    except BaseException:
        src.close()
        raise
