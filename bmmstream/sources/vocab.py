"""Experts with extended vocabularies: embeddings / lm_head with more rows than the base (added tokens).

The rule (README, "Extended vocabularies"): the rows the base has are merged as usual by the method,
which sees base-shaped tensors (each expert's table cut to the base's rows); an added row (beyond
the base's) is the plain average of the full weights of the experts that have that token (the base
has no such row, so there is no task vector to merge). `tokenizer_source` picks the output's
vocabulary and tokenizer, like mergekit's: `base` (the base's rows and tokenizer, added rows
dropped), `union` (every added token of every expert; the tokenizer of the expert that holds them
all) or `model:<path>` (that model's rows and tokenizer). Tokenizers are read with transformers'
AutoTokenizer from local copies of their files (offline); experts whose added tokens disagree are
refused in one line.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from bmmstream.errors import BmmError
from bmmstream.sources.base import AUX_FILES, TensorInfo, TensorSource

# the auxiliary files that make up a tokenizer (generation_config.json stays the base's)
TOKENIZER_FILES = tuple(f for f in AUX_FILES if f != "generation_config.json")
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def vocab_size(config: dict) -> int | None:
    """config.json's vocab_size (top level, or a multimodal model's text_config)."""
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def vocab_tables(infos: dict[str, TensorInfo], rows: int) -> frozenset[str]:
    """Floating tensors with one row per token: first dimension equal to the vocabulary size."""
    return frozenset(n for n, i in infos.items() if i.shape and i.shape[0] == rows and i.dtype in _FLOATS)


def extended_rows(base_cfg: dict, base_infos: dict[str, TensorInfo], cfg: dict,
                  infos: dict[str, TensorInfo]) -> int | None:
    """An expert's row count when it extends the base's vocabulary, else None: every vocab table of
    the base is (N, *rest) in the expert with N > the base's rows, the same N everywhere and equal to
    the expert's config.json vocab_size when it has one."""
    v = vocab_size(base_cfg)
    if v is None:
        return None
    tables = vocab_tables(base_infos, v)
    found = {infos[n].shape[0] for n in tables if n in infos and infos[n].shape[1:] == base_infos[n].shape[1:]}
    if not tables or len(found) != 1:
        return None
    (n_rows,) = found
    if n_rows <= v or vocab_size(cfg) not in (None, n_rows):
        return None
    if any(n not in infos or infos[n].shape != (n_rows, *base_infos[n].shape[1:]) for n in tables):
        return None
    return n_rows


def base_view_infos(base_infos: dict[str, TensorInfo], infos: dict[str, TensorInfo],
                    base_rows: int) -> dict[str, TensorInfo]:
    """An extending expert's tensor infos as the methods see them: vocab tables cut to the base's rows."""
    tables = vocab_tables(base_infos, base_rows)
    return {n: TensorInfo(base_infos[n].shape, i.dtype) if n in tables else i for n, i in infos.items()}


def fewer_rows_problem(base_cfg: dict, cfg: dict) -> str | None:
    """The one-line reason an expert with fewer vocabulary rows than the base is refused, or None."""
    b, e = vocab_size(base_cfg), vocab_size(cfg)
    if b is not None and e is not None and e < b:
        return f"config.json vocab_size is {e}, fewer than the base's {b} (an expert may add tokens, not drop them)"
    return None


def average_rows(extra: list[torch.Tensor | None], owners: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Added row k = mean over the experts in owners[k] of their row k (extra[t]: expert t's rows
    beyond the base's, None when it has none); float64."""
    k = len(owners)
    ref = next(x for x in extra if x is not None)
    out = torch.zeros((k, *ref.shape[1:]), dtype=torch.float64)
    for t, x in enumerate(extra):
        w = torch.tensor([1.0 / len(o) if t in o else 0.0 for o in owners], dtype=torch.float64)
        if x is None or not bool(w.any()):
            continue
        n = min(k, x.shape[0])
        out[:n] += x[:n].double() * w[:n].view(-1, *([1] * (x.dim() - 1)))
    return out


class VocabView:
    """An extending expert read through the base's vocabulary: `get` cuts vocab tables to the base's
    rows (what every method merges); the rows beyond are kept aside for `added_rows`. Everything
    else (ids, LoRA factors, prefetch, verification) is the wrapped source's."""

    def __init__(self, inner: TensorSource, tables: frozenset[str], base_infos: dict[str, TensorInfo], rows: int):
        self._inner = inner
        self._tables = tables
        self._base_infos = base_infos
        self._rows = rows
        self._extra: dict[str, torch.Tensor] = {}

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # not forwarded: no recursion before __init__ ran (copy, pickle)
            raise AttributeError(attr)
        return getattr(self._inner, attr)

    def config(self) -> dict:
        """The expert's config.json with the base's vocab_size (what its tensors here have)."""
        cfg = dict(self._inner.config())
        if "vocab_size" in cfg:
            cfg["vocab_size"] = self._rows
        if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
            cfg["text_config"] = {**cfg["text_config"], "vocab_size": self._rows}
        return cfg

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return base_view_infos(self._base_infos, self._inner.tensor_infos(), self._rows)

    def get(self, name: str) -> torch.Tensor:
        full = self._inner.get(name)
        if name not in self._tables:
            return full
        self._extra[name] = full[self._rows:].clone()
        return full[: self._rows]

    def added_rows(self, name: str) -> torch.Tensor:
        """This expert's rows of `name` beyond the base's (read again if `get` did not keep them)."""
        extra = self._extra.pop(name, None)
        return extra if extra is not None else self._inner.get(name)[self._rows:]


@dataclass(frozen=True)
class VocabPlan:
    """What the output's vocabulary is and where each of its added rows comes from."""

    base_rows: int
    out_rows: int
    tables: frozenset[str]
    rows_of: tuple[int, ...]  # per expert: its table rows
    owners: tuple[tuple[int, ...], ...]  # per added row (base_rows + k): the experts averaged into it
    tokenizer: int | None  # the expert whose tokenizer files the output gets; None: the base's

    def view(self, expert: TensorSource, t: int, base_infos: dict[str, TensorInfo]) -> TensorSource:
        if self.rows_of[t] == self.base_rows:
            return expert
        return VocabView(expert, self.tables, base_infos, self.base_rows)

    def out_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.out_rows, *shape[1:]) if name in self.tables else tuple(shape)

    def output_config(self, base_cfg: dict) -> dict:
        """The base's config.json with vocab_size the output's row count."""
        cfg = dict(base_cfg)
        if cfg.get("vocab_size") == self.base_rows:
            cfg["vocab_size"] = self.out_rows
        tc = cfg.get("text_config")
        if isinstance(tc, dict) and tc.get("vocab_size") == self.base_rows:
            cfg["text_config"] = {**tc, "vocab_size": self.out_rows}
        return cfg

    def extend(self, name: str, merged: torch.Tensor, experts: list[TensorSource]) -> torch.Tensor:
        """A merged (base-rows) vocab table with the output's added rows appended."""
        if name not in self.tables or self.out_rows == self.base_rows:
            return merged
        extra = []
        for t, e in enumerate(experts):
            x = e.added_rows(name) if self.rows_of[t] > self.base_rows else None
            if x is not None and not bool(torch.isfinite(x).all()):
                raise BmmError(f"{e.id}: tensor '{name}' contains NaN or Inf values")
            extra.append(x)
        rows = average_rows(extra, self.owners)
        return torch.cat([merged, rows.to(merged.device, merged.dtype)])


def _load_tokenizer(src: TensorSource):
    """`src`'s tokenizer (AutoTokenizer on a local copy of its files), or None when it has none."""
    from transformers import AutoTokenizer

    files = [f for f in src.aux_files() if f in TOKENIZER_FILES]
    if not any(f.startswith(("tokenizer", "vocab", "merges")) for f in files):
        return None
    with tempfile.TemporaryDirectory(prefix="bmm-tok-") as d:
        for f in files:
            shutil.copyfile(src.aux_path(f), Path(d) / f)
        (Path(d) / "config.json").write_text(json.dumps(src.config()))
        try:
            return AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise BmmError(f"{src.id}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def plan_vocab(tokenizer_source: str | None, base: TensorSource, experts: list[TensorSource],
               specs: list[str]) -> VocabPlan | None:
    """Decide the output's vocabulary (None: every expert has the base's rows and the base's tokenizer
    is kept). `specs`: base_model then the models as the config writes them (for `model:<path>`)."""
    mode = tokenizer_source or "base"
    base_cfg, base_infos = base.config(), base.tensor_infos()
    v = vocab_size(base_cfg)
    if v is None:
        return None
    tables = vocab_tables(base_infos, v)
    rows = tuple(extended_rows(base_cfg, base_infos, e.config(), e.tensor_infos()) or v for e in experts)
    if mode == "base":
        return None if all(r == v for r in rows) else VocabPlan(v, v, tables, rows, (), None)

    base_tok = _load_tokenizer(base)
    base_vocab = {i: t for t, i in base_tok.get_vocab().items()} if base_tok is not None else {}
    first_added = max(base_vocab, default=v - 1) + 1  # ids from here on are added tokens
    added: list[dict[int, str]] = []
    has_tok: list[bool] = []
    for e, n in zip(experts, rows):
        tok = _load_tokenizer(e)
        has_tok.append(tok is not None)
        if tok is None:
            if n > v:
                raise BmmError(f"{e.id}: has {n} vocabulary rows, the base {v}, but no tokenizer files; "
                               f"tokenizer_source {mode} needs them to know which token each added row is")
            added.append({})
            continue
        mine = {}
        for t, i in tok.get_vocab().items():
            if i >= first_added:
                mine[i] = t
            elif base_vocab and base_vocab.get(i) != t:
                raise BmmError(f"{e.id}: token id {i} is {t!r}, the base's is {base_vocab.get(i)!r} "
                               f"(an expert may only add tokens after the base's)")
        beyond = [i for i in mine if i >= n]
        if beyond:
            i = min(beyond)
            raise BmmError(f"{e.id}: its tokenizer has token {mine[i]!r} at id {i}, beyond its {n} embedding rows")
        added.append(mine)
    union = _union(mode, experts, added)

    if mode == "union":
        chosen = next((t for t, a in enumerate(added) if a == union), None) if union else None
        if union and chosen is None:
            raise BmmError(f"tokenizer_source union: no expert's tokenizer holds every added token ({len(union)} in "
                           f"all); choose one with tokenizer_source: model:<path>")
    else:
        k = specs.index(mode.removeprefix("model:"))
        chosen = None if k == 0 else k - 1
    out_rows = rows[chosen] if chosen is not None else v
    tok_from = chosen if chosen is not None and has_tok[chosen] else None
    owners = []
    for i in range(v, out_rows):
        own = tuple(t for t, a in enumerate(added) if i in a) if i in union else ()
        owners.append(own or tuple(t for t, n in enumerate(rows) if n > i))
    if all(r == v for r in rows) and tok_from is None:
        return None
    return VocabPlan(v, out_rows, tables, rows, tuple(owners), tok_from)


def _union(mode: str, experts: list[TensorSource], added: list[dict[int, str]]) -> dict[int, str]:
    """Every expert's added tokens (id -> token); refused in one line where two experts disagree."""
    by_id: dict[int, tuple[str, str]] = {}
    by_tok: dict[str, tuple[int, str]] = {}
    for e, mine in zip(experts, added):
        for i, t in sorted(mine.items()):
            if i in by_id and by_id[i][0] != t:
                raise BmmError(f"tokenizer_source {mode}: added token id {i} is {by_id[i][0]!r} in '{by_id[i][1]}' "
                               f"but {t!r} in '{e.id}'")
            if t in by_tok and by_tok[t][0] != i:
                raise BmmError(f"tokenizer_source {mode}: added token {t!r} has id {by_tok[t][0]} in "
                               f"'{by_tok[t][1]}' but {i} in '{e.id}'")
            by_id.setdefault(i, (t, e.id))
            by_tok.setdefault(t, (i, e.id))
    return {i: t for i, (t, _) in by_id.items()}
