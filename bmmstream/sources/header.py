"""The safetensors header format (8-byte little-endian length, then JSON), parsed once for every source.

Local files and Hub ranges differ only in how bytes are fetched, so both hand this module a reader
and get the same checks and the same one-line errors: a header that does not fit the file, invalid
JSON, a malformed entry, an unreadable dtype, offsets outside the data section, a byte span that
disagrees with dtype x shape, two tensors whose bytes overlap. Catching these from the header means
a truncated or corrupt file is refused before any weight is merged.
"""
from __future__ import annotations

import json
from typing import Callable

from bmmstream.errors import BmmError
from bmmstream.sources.base import ST_TO_TORCH, TensorInfo

# A header larger than this is certainly corrupt (the safetensors library uses the same limit).
MAX_HEADER_BYTES = 100_000_000
# The first read asks for this much, so most headers cost one request on the Hub (huggingface_hub
# probes the same amount).
HEADER_PROBE = 100_000


def parse_header(
    where: str, read: Callable[[int, int], bytes], size: int | None
) -> dict[str, tuple[TensorInfo, int, int]]:
    """Tensor name -> (info, absolute start, absolute end) for one safetensors file.

    `read(start, end)` returns bytes [start, end) (fewer at end of file); `size` is the file size,
    or None where it is not known (then offsets are checked against the header only).
    """
    bad = f"{where}: corrupt safetensors header"
    first = bytes(read(0, HEADER_PROBE if size is None else min(size, HEADER_PROBE)))
    if len(first) < 8:
        raise BmmError(f"{bad} (file is only {len(first)} bytes)")
    n = int.from_bytes(first[:8], "little")
    if n > MAX_HEADER_BYTES or (size is not None and 8 + n > size):
        raise BmmError(f"{bad} (declared header length {n} does not fit in a {size}-byte file)")
    raw = first[8 : 8 + n]
    if len(raw) < n:
        raw += bytes(read(8 + len(raw), 8 + n))
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise BmmError(f"{bad} ({e})") from None

    data_start = 8 + n
    data_len = size - data_start if size is not None else None
    section = f"the {data_len}-byte data section" if data_len is not None else "the data section"
    out: dict[str, tuple[TensorInfo, int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BmmError(f"{bad} entry for tensor '{name}'") from None
        if dtype not in ST_TO_TORCH:
            raise BmmError(f"{where}: tensor '{name}' has dtype {dtype}, which bmmstream cannot read")
        if not (0 <= start <= end) or (data_len is not None and end > data_len):
            raise BmmError(f"{bad}: tensor '{name}' data_offsets [{start}, {end}] lie outside {section}")
        info = TensorInfo(shape, dtype)
        if end - start != info.nbytes:
            raise BmmError(
                f"{bad}: tensor '{name}' {dtype}{list(shape)} needs {info.nbytes} bytes, "
                f"data_offsets span {end - start}"
            )
        out[name] = (info, data_start + start, data_start + end)
    spans = sorted((a, b, name) for name, (_, a, b) in out.items() if b > a)
    for (a0, b0, n0), (a1, b1, n1) in zip(spans, spans[1:]):
        if a1 < b0:  # two tensors sharing bytes: writing one would silently change the other
            raise BmmError(
                f"{bad}: tensors '{n0}' and '{n1}' overlap (data_offsets [{a0 - data_start}, {b0 - data_start}] "
                f"and [{a1 - data_start}, {b1 - data_start}])"
            )
    return out
