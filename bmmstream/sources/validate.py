"""Check that every input matches the base before any heavy work, and report all problems at once.

Only headers and config.json are read. A user with a bad set of experts should learn everything
that is wrong from one message, not fix one tensor per run.
"""
from __future__ import annotations

import logging

from bmmstream.errors import BmmError
from bmmstream.sources.base import TensorInfo, TensorSource
from bmmstream.sources.vocab import base_view_infos, extended_rows, fewer_rows_problem, vocab_size

log = logging.getLogger(__name__)

MAX_LISTED = 20
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# config.json keys that fix tensor shapes (Llama/Mistral/Qwen, BERT, GPT-2, T5/BART spellings)
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "d_model",
    "d_ff",
    "d_kv",
    "num_layers",
    "num_heads",
    "ffn_dim",
    "encoder_layers",
    "decoder_layers",
)


def _shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(x) for x in s) + ("," if len(s) == 1 else "") + ")"


def config_problems(base: dict, other: dict) -> list[str]:
    """Mismatches in the config keys that decide the architecture (only keys present in both)."""
    out = []
    for key in ("model_type",) + SHAPE_KEYS:
        if key in base and key in other and base[key] != other[key]:
            out.append(f"config.json {key} is {other[key]!r}, base has {base[key]!r}")
    return out


def tensor_problems(base: dict[str, TensorInfo], other: dict[str, TensorInfo]) -> tuple[list[str], int]:
    """(problems, number of floating tensors whose dtype differs from the base's, which is fine)."""
    out, cast = [], 0
    for name in sorted(base.keys() | other.keys()):
        b, o = base.get(name), other.get(name)
        if o is None:
            out.append(f"missing tensor '{name}'")
        elif b is None:
            out.append(f"unexpected tensor '{name}'")
        elif o.shape != b.shape:
            out.append(f"tensor '{name}' has shape {_shape(o.shape)}, base has {_shape(b.shape)}")
        elif o.dtype != b.dtype:
            if o.dtype in FLOAT_DTYPES and b.dtype in FLOAT_DTYPES:
                cast += 1
            else:
                out.append(f"tensor '{name}' has dtype {o.dtype}, base has {b.dtype}")
    return out, cast


def validate_sources(
    base: TensorSource, experts: list[TensorSource], extra: list[TensorSource] = ()
) -> None:
    """Raise one BmmError listing every mismatch between the inputs and the base (a base without
    config.json is refused first: nothing can be planned or written without it).

    Floating tensors may differ in dtype (they are converted on read; logged). Non-floating
    tensors (int buffers, masks) must have exactly the base's dtype.
    """
    base_infos = base.tensor_infos()
    base_cfg = base.config()
    if not base_cfg:  # the layers, the families' groups and the output's config.json all come from it
        raise BmmError(f"{base.id}: the base model has no config.json (needed to plan the merge and to write the merged model)")
    problems: list[str] = []
    labelled = [("expert", s) for s in experts] + [("input", s) for s in extra]
    for role, src in labelled:
        label = f"{role} '{src.id}'"
        cfg, infos = src.config(), src.tensor_infos()
        if role == "expert" and extended_rows(base_cfg, base_infos, cfg, infos) is not None:
            # added tokens (sources/vocab.py): the rest is checked through the base's rows
            cfg = {k: v for k, v in cfg.items() if k != "vocab_size"}
            infos = base_view_infos(base_infos, infos, vocab_size(base_cfg))
        fewer = fewer_rows_problem(base_cfg, cfg) if role == "expert" else None
        found = [fewer if fewer and p.startswith("config.json vocab_size ") else p
                 for p in config_problems(base_cfg, cfg)]
        tp, cast = tensor_problems(base_infos, infos)
        problems += [f"{label}: {p}" for p in found + tp]
        if cast:
            log.info("%s: %d floating tensor(s) stored in another dtype than the base; converted on read",
                     label, cast)
    if not problems:
        return
    n = len(problems)
    shown = "; ".join(problems[:MAX_LISTED])
    more = f"; ... and {n - MAX_LISTED} more" if n > MAX_LISTED else ""
    head = f"{n} problem{'s' if n != 1 else ''} in the inputs"
    raise BmmError(f"{head}: {shown}{more}".replace("\n", " "))
