"""Scorers: a merged torch model in, one float out (higher is better).

A scorer has an `id` (what it computes, with its options) and a `data_hash` (what it computes it
on); the search keys its score cache by both. Kinds, as the config's `search.scorer` names them:

    {callable: "my_module:score"}                         # user function(model) -> float
    {kind: label_likelihood, data: {task: val.jsonl}}     # rows {prompt, choices, answer}; causal LMs
    {kind: encoder_accuracy, data: {task: {rows: val.jsonl, expert: folder}}}
                                                          # rows {text, label}; the expert folder holds
                                                          # head.safetensors (weight, bias) + task.json (labels)
    {kind: perplexity, data: val.jsonl | [texts.txt, ...]}  # JSONL rows {text} or plain text lines; score = -ppl
    {kind: lm_eval, tasks: [my_task, other.yaml], limit: 200, include_path: tasks/, metric: acc_norm}
                                                          # EleutherAI lm-evaluation-harness on the resident model

`proxy_size: N` (built-in kinds) adds a proxy scorer on a fixed seeded subset of N rows per task,
used for most trials; `proxy: {...}` (any kind) gives the proxy scorer explicitly. Scores over several
tasks are the mean of the per-task scores. The model math lives in bmmstream/search/metrics.py.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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
    """Base class: `id`, `data_hash`, `__call__(model) -> float`, and `scored(model)` -> (score, per-row
    scores or None): the rows let the search's noise guard bootstrap the validation noise."""

    id: str = ""
    data_hash: str = ""

    def __call__(self, model: Any) -> float:
        return self.scored(model)[0]

    def scored(self, model: Any) -> tuple[float, list[float] | None]:
        return float(self(model)), None

    def predict(self, model: Any) -> list[tuple[Any, Any]]:
        """Per task, logits (N, C) and labels (N,): what posterior sampling averages and calibrates."""
        raise BmmError(f"search.posterior: scorer '{self.id}' gives no class predictions; "
                       "posterior sampling needs kind encoder_accuracy or label_likelihood")


def task_rows(per_task: Sequence[Sequence[int]]) -> tuple[float, list[float]]:
    """Mean over tasks of per-task accuracy, and per-row scores whose plain mean is that score: row j of
    task k (n_k rows of N, K tasks) counts correct * N / (K n_k), so a small task weighs what it does in
    the score when the rows are resampled."""
    total, k = sum(len(c) for c in per_task), len(per_task)
    rows = [float(c) * total / (k * len(task)) for task in per_task for c in task]
    return float(np.mean([sum(t) / len(t) for t in per_task])), rows


class CallableScorer(Scorer):
    """A user function `fn(model) -> float`; its data is the user's business (data_hash stays "")."""

    def __init__(self, spec: str, fn: Callable | None = None):
        self.fn = fn if fn is not None else load_callable(spec)
        self.id = f"callable:{spec}"

    def __call__(self, model):
        return float(self.fn(model))

    def scored(self, model):
        from bmmstream.search.driver import split_score

        return split_score(self.fn(model))  # a user function may give (score, rows) too


class LabelLikelihoodScorer(Scorer):
    """Mean over tasks of teacher-forced label-likelihood accuracy (rows {prompt, choices, answer})."""

    def __init__(self, tokenizer: Any, tasks: dict[str, list[dict]], *, batch_size: int = 8, tag: str = ""):
        for name, rows in tasks.items():
            for r in rows:
                _require(r, ("prompt", "choices", "answer"), f"label_likelihood task '{name}'")
        self.tokenizer, self.tasks, self.batch_size = tokenizer, tasks, batch_size
        self.id = f"label_likelihood{tag}"
        self.data_hash = data_hash(tasks)

    def predict(self, model):
        from bmmstream.search.metrics import label_likelihood_predictions

        return [label_likelihood_predictions(model, self.tokenizer, rows, batch_size=self.batch_size)
                for rows in self.tasks.values()]

    def scored(self, model):
        from bmmstream.search.metrics import label_likelihood_correct

        return task_rows([label_likelihood_correct(model, self.tokenizer, rows, batch_size=self.batch_size)
                          for rows in self.tasks.values()])


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

    def _tasks(self, model):
        """(head, batches on the model's device) per task."""
        from bmmstream.search.metrics import encoder_batches

        device = next(model.parameters()).device
        for t in self.tasks.values():
            batches = encoder_batches(self.tokenizer, t["rows"], t["labels"], max_len=t.get("max_len", 128),
                                      batch_size=self.batch_size)
            yield t["head"].to(device), [{k: v.to(device) for k, v in b.items()} for b in batches]

    def scored(self, model):
        from bmmstream.search.metrics import encoder_correct

        return task_rows([encoder_correct(model, head, batches) for head, batches in self._tasks(model)])

    def predict(self, model):
        from bmmstream.search.metrics import encoder_predictions

        return [encoder_predictions(model, head, batches) for head, batches in self._tasks(model)]


class PerplexityScorer(Scorer):
    """-perplexity over texts (negated so that higher is better)."""

    def __init__(self, tokenizer: Any, texts: list[str], *, max_len: int = 256, tag: str = ""):
        self.tokenizer, self.texts, self.max_len = tokenizer, texts, max_len
        self.id = f"perplexity:max_len={max_len}{tag}"
        self.data_hash = data_hash(texts)

    def __call__(self, model):
        from bmmstream.search.metrics import perplexity

        return -float(perplexity(model, self.tokenizer, self.texts, max_len=self.max_len))


class LmEvalScorer(Scorer):
    """Mean over EleutherAI lm-evaluation-harness tasks of one metric each, on the resident model.

    The model object itself is wrapped (lm_eval's HFLM with `pretrained=model`), so no checkpoint is
    written per trial; tasks and their data are loaded once, when the scorer is built."""

    def __init__(self, tokenizer: Any, loaded: dict, metrics: dict[str, tuple[str, bool]], *, specs: list[str],
                 limit: int | None, batch_size: int = 8, metric: str | None = None, hash_items: list,
                 samples: dict[str, list[int]] | None = None, tag: str = ""):
        """loaded: lm_eval's TaskManager.load() result; metrics: task -> (metric, higher_is_better)."""
        import copy

        # HFLM sets a pad token on the tokenizer it is given: a copy keeps the caller's untouched
        self.tokenizer = copy.deepcopy(tokenizer)
        self.loaded, self.metrics, self.limit, self.samples = loaded, metrics, limit, samples
        self.batch_size, self.specs, self.metric, self._hash_items = batch_size, specs, metric, hash_items
        self.id = f"lm_eval:{','.join(specs)}:metric={metric or 'first'}:limit={limit}{tag}"
        self.data_hash = data_hash(*hash_items, {"limit": limit, "samples": samples})

    def proxy(self, n: int, seed: int, tag: str) -> "LmEvalScorer":
        """The same tasks on a fixed seeded subset of n of the full scorer's rows per task."""
        samples = {}
        for name, task in self.loaded["tasks"].items():
            rows = len(task.eval_docs) if self.limit is None else min(self.limit, len(task.eval_docs))
            samples[name] = [int(i) for i in subset(list(range(rows)), n, seed)]
        return LmEvalScorer(self.tokenizer, self.loaded, self.metrics, specs=self.specs, limit=self.limit,
                            batch_size=self.batch_size, metric=self.metric, hash_items=self._hash_items,
                            samples=samples, tag=tag)

    def __call__(self, model):
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        name = type(model).__name__
        if not hasattr(model, "config") or not name.endswith(("ForCausalLM", "LMHeadModel")):
            raise BmmError(f"search.scorer: kind 'lm_eval' scores causal language models; the model is a {name}")
        # built per call: a scorer holding the model would keep it resident after the search. HFLM
        # warns, each time, that it was given a model object: here that is the point, so not shown.
        log = logging.getLogger("lm_eval.models.huggingface")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        finally:
            log.setLevel(level)
        # lm_eval takes either limit (the first rows) or samples (row indices, the proxy's)
        res = evaluate(lm=lm, task_dict=self.loaded, limit=None if self.samples else self.limit, samples=self.samples,
                       bootstrap_iters=0, log_samples=False)["results"]
        scores = []
        for task, (metric, higher) in self.metrics.items():
            vals = [v for k, v in res[task].items() if k.split(",")[0] == metric]
            scores.append(float(vals[0]) if higher else -float(vals[0]))
        return float(np.mean(scores))


# -- from the config -----------------------------------------------------------------------------------
KINDS = ("label_likelihood", "encoder_accuracy", "perplexity", "lm_eval")
_KEYS = {"callable", "kind", "data", "proxy_size", "proxy", "seed", "batch_size", "max_len",
         "tasks", "limit", "metric", "include_path"}
LM_EVAL_MISSING = "scorer kind 'lm_eval' needs the lm_eval package: pip install 'bmmstream[lmeval]'"


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


@contextlib.contextmanager
def _working_dir(folder: Path) -> Iterator[None]:
    """lm_eval (through datasets) reads a task's relative data_files from the working directory;
    they are read from the task YAML's folder instead, whatever folder the search runs from."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def _file_names(spec: Any) -> list[str]:
    """The names in a datasets `data_files` value (a name, a list, or split -> name | list)."""
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, dict):
        return [f for v in spec.values() for f in _file_names(v)]
    if isinstance(spec, (list, tuple)):
        return [f for v in spec for f in _file_names(v)]
    return []


def _lm_eval_task_hash(task: Any, folder: Path) -> list:
    """What a task's score depends on: its YAML folder's configs/functions and its local data files."""
    cfg = task.config
    kwargs = dict(cfg.dataset_kwargs or {})
    items: list = [{"task": task.task_name, "dataset_path": cfg.dataset_path, "dataset_name": cfg.dataset_name,
                    "dataset_kwargs": {k: v for k, v in kwargs.items() if k != "data_files"},
                    "num_fewshot": task.get_config("num_fewshot")}]
    source = (cfg.metadata or {}).get("config_source")
    if source and Path(source).is_file():
        items += sorted(p for p in Path(source).parent.iterdir() if p.suffix in (".yaml", ".yml", ".py"))
    for pattern in _file_names(kwargs.get("data_files")):
        items.append({"data_files": pattern})
        items += sorted(Path(f) for f in glob.glob(str(folder / pattern)) if Path(f).is_file())
    return items


def _build_lm_eval(cfg: dict, tokenizer: Any, base_dir: Path | None, tag: str) -> LmEvalScorer:
    """Resolve the tasks (names in include_path or lm_eval's own, or task YAML files), load them once."""
    try:
        import lm_eval
        from lm_eval.defaults import DEFAULT_OTHER_SEED
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BmmError(LM_EVAL_MISSING) from None
    specs = cfg.get("tasks")
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, list) or not specs or not all(isinstance(t, str) and t for t in specs):
        raise BmmError(f"search.scorer: kind 'lm_eval' needs 'tasks', a list of lm_eval task names or task "
                       f"YAML files; got {specs!r}")
    limit = cfg.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BmmError(f"search.scorer.limit must be an integer >= 1, got {limit!r}")
    metric = cfg.get("metric")
    if metric is not None and not (isinstance(metric, str) and metric):
        raise BmmError(f"search.scorer.metric must be a metric name like 'acc', got {metric!r}")
    batch_size = cfg.get("batch_size", 8)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise BmmError(f"search.scorer.batch_size must be an integer >= 1, got {batch_size!r}")
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise BmmError("search.scorer: kind 'lm_eval' needs a tokenizer with a BOS or EOS token "
                       "(lm_eval conditions a first token on it)")
    inc = cfg.get("include_path") or []
    includes = [_resolve(base_dir, p) for p in (inc if isinstance(inc, list) else [inc])]
    for p in includes:
        if not p.is_dir():
            raise BmmError(f"search.scorer.include_path: {p} is not a folder")
    here = base_dir if base_dir is not None else Path.cwd()
    yamls = {t: _resolve(base_dir, t) for t in specs if t.endswith((".yaml", ".yml"))}
    for t, p in yamls.items():
        if not p.is_file():
            raise BmmError(f"search.scorer.tasks: task file {p} does not exist")
    names = [t for t in specs if t not in yamls]
    # lm_eval's own ~15k task YAMLs take seconds to index: only when a name is not in include_path
    tm = TaskManager(include_path=[str(p) for p in includes] or None, include_defaults=False)
    if any(t not in tm.task_index for t in names):
        tm = TaskManager(include_path=[str(p) for p in includes] or None, include_defaults=True)
    for t in names:
        if t not in tm.task_index:
            where = f"include_path {[str(p) for p in includes]} nor " if includes else ""
            raise BmmError(f"search.scorer.tasks: unknown lm_eval task '{t}' (not in {where}lm_eval's own tasks)")
    loaded: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    folders: dict[str, Path] = {}
    for t in specs:
        if t in yamls:
            folder, spec = yamls[t].parent, str(yamls[t].resolve())
        else:
            yp = tm.task_index[t].yaml_path
            folder, spec = (Path(yp).parent if yp else here), t
        try:
            with _working_dir(folder):
                part = tm.load([spec])
        except Exception as e:  # lm_eval and datasets raise many kinds; the first line names the problem
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BmmError(f"search.scorer.tasks: lm_eval task '{t}' cannot be loaded: {first}") from None
        for name in part["tasks"]:
            if name in loaded["tasks"]:
                raise BmmError(f"search.scorer.tasks: lm_eval task '{name}' is named twice")
            folders[name] = folder
        for k in loaded:
            loaded[k].update(part[k])
    metrics: dict[str, tuple[str, bool]] = {}
    hash_items: list = [{"kind": "lm_eval", "lm_eval": lm_eval.__version__, "tasks": specs}]
    for name, task in loaded["tasks"].items():
        # as lm_eval's simple_evaluate does: zero-shot unless the task says otherwise, seeded few-shot
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        known = list(task.aggregation())
        m = metric or (known[0] if known else None)
        if m not in known:
            raise BmmError(f"search.scorer.metric: lm_eval task '{name}' has no metric {m!r} "
                           f"(it has: {', '.join(known) or 'none'})")
        metrics[name] = (m, bool(task.higher_is_better().get(m, True)))
        hash_items += _lm_eval_task_hash(task, folders[name])
    return LmEvalScorer(tokenizer, loaded, metrics, specs=specs, limit=limit, batch_size=batch_size,
                        metric=metric, hash_items=hash_items, tag=tag)


def _build(cfg: dict, tokenizer: Any, base_dir: Path | None, n: int | None, seed: int, tag: str) -> Scorer:
    if "callable" in cfg:
        return CallableScorer(cfg["callable"])
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise BmmError(f"search.scorer: give 'callable: module:function' or 'kind' one of {', '.join(KINDS)}; "
                       f"got kind {kind!r}")
    if tokenizer is None:
        raise BmmError(f"search.scorer: kind '{kind}' needs the base model's tokenizer")
    if kind == "lm_eval":
        if n is not None:  # proxy_size: make_scorers takes the subset of the full scorer's loaded tasks
            raise BmmError("search.scorer: an lm_eval proxy is built from the full scorer")
        return _build_lm_eval(cfg, tokenizer, base_dir, tag)
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
        if isinstance(full, LmEvalScorer):
            return full, full.proxy(n, seed, f":proxy{n}:seed{seed}")
        return full, _build(main_cfg, tokenizer, bd, n, seed, f":proxy{n}:seed{seed}")
    return full, None
