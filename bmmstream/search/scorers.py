"""Scorers: a merged torch model in, one float out (higher is better).

A scorer has an `id` (what it computes, with its options) and a `data_hash` (what it computes it
on); the search keys its score cache by both. Kinds, as the config's `search.scorer` names them:

    {callable: "my_module:score"}                         # user function(model) -> float
    {kind: label_likelihood, data: {task: val.jsonl}}     # rows {prompt, choices, answer}; causal LMs
    {kind: encoder_accuracy, data: {task: {rows: val.jsonl, expert: folder}}}
                                                          # rows {text, label}; the expert folder holds
                                                          # head.safetensors (weight, bias) + task.json (labels)
    {kind: perplexity, data: val.jsonl | [texts.txt, ...]}  # JSONL rows {text} or plain text lines; score = -ppl

`proxy_size: N` (built-in kinds) adds a proxy scorer on a fixed seeded subset of N rows per task,
used for most trials; `proxy: {...}` (any kind) gives the proxy scorer explicitly. Scores over several
tasks are the mean of the per-task scores. The model math lives in bmmstream/search/metrics.py.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bmmstream.errors import BmmError


# -- helpers ---------------------------------------------------------------------------------------
def data_hash(*items: Any) -> str:
    """sha256 over files' bytes (paths, hashed by content) and JSON-serialisable objects, in order."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, Path) or (isinstance(item, str) and Path(item).is_file()):
            p = Path(item)
            if not p.is_file():
                raise BmmError(f"scorer data: {p} is not a file")
            h.update(b"file\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(b"json\0" + json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def load_callable(spec: str) -> Callable:
    """Import 'package.module:function' (the module must be importable, e.g. on PYTHONPATH)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise BmmError(f"search.scorer.callable must look like 'module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as ex:
        raise BmmError(f"search.scorer.callable: cannot import module '{mod_name}': {ex}") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise BmmError(f"search.scorer.callable: module '{mod_name}' has no callable '{fn_name}'")
    return fn


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise BmmError(f"scorer data: {p} does not exist")
    rows = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise BmmError(f"scorer data: {p} line {i} is not JSON") from None
            if not isinstance(row, dict):
                raise BmmError(f"scorer data: {p} line {i} is not a JSON object")
            rows.append(row)
    if not rows:
        raise BmmError(f"scorer data: {p} has no rows")
    return rows


def subset(rows: Sequence, n: int, seed: int = 0) -> list:
    """A fixed seeded subset of n rows in their original order (all rows if n >= len)."""
    if n >= len(rows):
        return list(rows)
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[int(i)] for i in idx]


def _require(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise BmmError(f"scorer data: {where}: a row lacks {missing}")


# -- scorers -----------------------------------------------------------------------------------------
class Scorer:
    """Base class: `id`, `data_hash`, and `__call__(model) -> float`."""

    id: str = ""
    data_hash: str = ""

    def __call__(self, model: Any) -> float:
        raise NotImplementedError


class CallableScorer(Scorer):
    """A user function `fn(model) -> float`; its data is the user's business (data_hash stays "")."""

    def __init__(self, spec: str, fn: Callable | None = None):
        self.fn = fn if fn is not None else load_callable(spec)
        self.id = f"callable:{spec}"

    def __call__(self, model):
        return float(self.fn(model))


class LabelLikelihoodScorer(Scorer):
    """Mean over tasks of teacher-forced label-likelihood accuracy (rows {prompt, choices, answer})."""

    def __init__(self, tokenizer: Any, tasks: dict[str, list[dict]], *, batch_size: int = 8, tag: str = ""):
        for name, rows in tasks.items():
            for r in rows:
                _require(r, ("prompt", "choices", "answer"), f"label_likelihood task '{name}'")
        self.tokenizer, self.tasks, self.batch_size = tokenizer, tasks, batch_size
        self.id = f"label_likelihood{tag}"
        self.data_hash = data_hash(tasks)

    def __call__(self, model):
        from bmmstream.search.metrics import label_likelihood_accuracy

        accs = [label_likelihood_accuracy(model, self.tokenizer, rows, batch_size=self.batch_size)
                for rows in self.tasks.values()]
        return float(np.mean(accs))


class EncoderAccuracyScorer(Scorer):
    """Mean over tasks of accuracy with each task's own head (rows {text, label})."""

    def __init__(self, tokenizer: Any, tasks: dict[str, dict], *, batch_size: int = 32, tag: str = ""):
        """tasks: name -> {"rows": [...], "head": torch.nn.Module, "labels": [...], "max_len": int}."""
        for name, t in tasks.items():
            for r in t["rows"]:
                _require(r, ("text", "label"), f"encoder_accuracy task '{name}'")
                if r["label"] not in t["labels"]:
                    raise BmmError(f"scorer data: encoder_accuracy task '{name}': label {r['label']!r} "
                                   f"is not one of {list(t['labels'])}")
        self.tokenizer, self.tasks, self.batch_size = tokenizer, tasks, batch_size
        self.id = f"encoder_accuracy{tag}"
        self.data_hash = data_hash(
            {n: {"rows": t["rows"], "labels": list(t["labels"]), "max_len": t.get("max_len", 128),
                 "head": t.get("head_hash", "")} for n, t in tasks.items()}
        )

    def __call__(self, model):
        from bmmstream.search.metrics import encoder_accuracy, encoder_batches

        accs = []
        for t in self.tasks.values():
            batches = encoder_batches(self.tokenizer, t["rows"], t["labels"], max_len=t.get("max_len", 128),
                                      batch_size=self.batch_size)
            device = next(model.parameters()).device
            batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
            accs.append(encoder_accuracy(model, t["head"].to(device), batches))
        return float(np.mean(accs))


class PerplexityScorer(Scorer):
    """-perplexity over texts (negated so that higher is better)."""

    def __init__(self, tokenizer: Any, texts: list[str], *, max_len: int = 256, tag: str = ""):
        self.tokenizer, self.texts, self.max_len = tokenizer, texts, max_len
        self.id = f"perplexity:max_len={max_len}{tag}"
        self.data_hash = data_hash(texts)

    def __call__(self, model):
        from bmmstream.search.metrics import perplexity

        return -float(perplexity(model, self.tokenizer, self.texts, max_len=self.max_len))


# -- from the config -----------------------------------------------------------------------------------
KINDS = ("label_likelihood", "encoder_accuracy", "perplexity")
_KEYS = {"callable", "kind", "data", "proxy_size", "proxy", "seed", "batch_size", "max_len"}


def _resolve(base_dir: Path | None, p: Any) -> Path:
    path = Path(str(p)).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _load_encoder_task(name: str, spec: Any, base_dir: Path | None) -> dict:
    import torch
    from safetensors.torch import load_file

    from bmmstream.search.metrics import linear_head

    if not isinstance(spec, dict) or "rows" not in spec or "expert" not in spec:
        raise BmmError(f"search.scorer.data.{name}: expected {{rows: val.jsonl, expert: folder}}")
    folder = _resolve(base_dir, spec["expert"])
    head_file, task_file = folder / "head.safetensors", folder / "task.json"
    for f in (head_file, task_file):
        if not f.is_file():
            raise BmmError(f"search.scorer.data.{name}: {f} does not exist")
    t = load_file(str(head_file))
    if set(t) != {"weight", "bias"}:
        raise BmmError(f"{head_file}: expected tensors 'weight' and 'bias', found {sorted(t)}")
    info = json.loads(task_file.read_text())
    return {
        "rows": read_jsonl(_resolve(base_dir, spec["rows"])),
        "head": linear_head(t["weight"].to(torch.float32), t["bias"].to(torch.float32)),
        "labels": list(info["labels"]),
        "max_len": int(info.get("max_len", 128)),
        "head_hash": data_hash(head_file),
    }


def _read_texts(p: Path) -> list[str]:
    if p.suffix == ".jsonl":
        rows = read_jsonl(p)
        for r in rows:
            _require(r, ("text",), f"perplexity {p}")
        return [r["text"] for r in rows]
    if not p.is_file():
        raise BmmError(f"scorer data: {p} does not exist")
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _build(cfg: dict, tokenizer: Any, base_dir: Path | None, n: int | None, seed: int, tag: str) -> Scorer:
    if "callable" in cfg:
        return CallableScorer(cfg["callable"])
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise BmmError(f"search.scorer: give 'callable: module:function' or 'kind' one of {', '.join(KINDS)}; "
                       f"got kind {kind!r}")
    if tokenizer is None:
        raise BmmError(f"search.scorer: kind '{kind}' needs the base model's tokenizer")
    if "data" not in cfg:
        raise BmmError(f"search.scorer: kind '{kind}' needs 'data'")
    data = cfg["data"]
    opts = {k: cfg[k] for k in ("batch_size",) if k in cfg}
    if kind == "perplexity":
        paths = data if isinstance(data, list) else [data]
        texts = [t for p in paths for t in _read_texts(_resolve(base_dir, p))]
        if n is not None:
            texts = subset(texts, n, seed)
        return PerplexityScorer(tokenizer, texts, max_len=int(cfg.get("max_len", 256)), tag=tag)
    if not isinstance(data, dict) or not data:
        raise BmmError(f"search.scorer.data: kind '{kind}' needs a mapping task -> data")
    if kind == "label_likelihood":
        tasks = {name: read_jsonl(_resolve(base_dir, p)) for name, p in data.items()}
        if n is not None:
            tasks = {name: subset(rows, n, seed) for name, rows in tasks.items()}
        return LabelLikelihoodScorer(tokenizer, tasks, tag=tag, **opts)
    tasks = {name: _load_encoder_task(name, spec, base_dir) for name, spec in data.items()}
    if n is not None:
        tasks = {name: {**t, "rows": subset(t["rows"], n, seed)} for name, t in tasks.items()}
    return EncoderAccuracyScorer(tokenizer, tasks, tag=tag, **opts)


def make_scorers(cfg: dict, *, tokenizer: Any = None, base_dir: str | Path | None = None) -> tuple[Scorer, Scorer | None]:
    """The config's `search.scorer` -> (full scorer, proxy scorer or None)."""
    if not isinstance(cfg, dict):
        raise BmmError(f"search.scorer must be a mapping, got {cfg!r}")
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise BmmError(f"search.scorer: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    if "callable" in cfg and "kind" in cfg:
        raise BmmError("search.scorer: give either 'callable' or 'kind', not both")
    bd = Path(base_dir) if base_dir is not None else None
    seed = int(cfg.get("seed", 0))
    main_cfg = {k: v for k, v in cfg.items() if k not in ("proxy", "proxy_size")}
    full = _build(main_cfg, tokenizer, bd, None, seed, "")
    if "proxy" in cfg and "proxy_size" in cfg:
        raise BmmError("search.scorer: give either 'proxy' or 'proxy_size', not both")
    if "proxy" in cfg:
        proxy_cfg = cfg["proxy"]
        if not isinstance(proxy_cfg, dict):
            raise BmmError("search.scorer.proxy must be a mapping like the scorer itself")
        proxy = _build(proxy_cfg, tokenizer, bd, None, seed, "")
        # the search keys scores by (id, the full scorer's data hash): the proxy's own data goes in its id
        proxy.id = f"proxy:{proxy.id}" + (f":data={proxy.data_hash}" if proxy.data_hash else "")
        return full, proxy
    if "proxy_size" in cfg:
        n = cfg["proxy_size"]
        if "callable" in cfg:
            raise BmmError("search.scorer.proxy_size needs a built-in kind; for a callable give 'proxy: {callable: ...}'")
        if not isinstance(n, int) or n < 1:
            raise BmmError(f"search.scorer.proxy_size must be an integer >= 1, got {n!r}")
        return full, _build(main_cfg, tokenizer, bd, n, seed, f":proxy{n}:seed{seed}")
    return full, None
