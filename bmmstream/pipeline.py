"""The streaming merge: sources -> plan -> (prepass) -> per unit: stats -> merge -> write.

Work is ordered by streaming unit (embeddings, then one transformer layer at a time, then the
rest): only the current unit's tensors of the base and the T experts are resident, so peak memory
does not grow with depth. Every step leaves a completion record in the run directory; a run
killed at any point and resumed writes bit-identical output because each step is deterministic
and the writer truncates to its last committed tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from bmmstream import __version__
from bmmstream.statistics.data_assisted import calibrate, module_grams
from bmmstream.config import DTYPES, MergeConfig, load_config
from bmmstream.errors import BmmError
from bmmstream.statistics.capture import trim_heap
from bmmstream.methods.registry import MergeMethod, ModuleInput, RawModule, get_method
from bmmstream.plan.layout import Plan, build_plan
from bmmstream.output.rundir import RunDir, append_jsonl, write_json_atomic
from bmmstream.sources import open_source
from bmmstream.sources.base import ST_TO_TORCH, TORCH_TO_ST, TensorSource
from bmmstream.sources.vocab import TOKENIZER_FILES, VocabPlan, plan_vocab
from bmmstream.statistics.store import StatsStore, factor_key
from bmmstream.config import parse_threads
from bmmstream.executors.threads import resolve_threads, use_threads


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BmmError(f"device '{device}' requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise BmmError(f"device must be cpu, cuda or auto, got {device!r}")
    return torch.device(device)


def default_run_dir(cfg: MergeConfig, origin: str | None) -> Path:
    digest = hashlib.sha256(json.dumps(cfg.identity(), sort_keys=True).encode()).hexdigest()[:10]
    stem = Path(origin).stem if origin else "merge"
    return Path("bmm-runs") / f"{stem}-{digest}"


@dataclass
class Sources:
    base: TensorSource
    experts: list[TensorSource]

    @property
    def all(self) -> list[TensorSource]:
        return [self.base, *self.experts]

    def close(self) -> None:
        for s in self.all:
            s.close()


def open_sources(cfg: MergeConfig, *, cache_dir: Path | None) -> Sources:
    opts = {}
    if cfg.max_disk is not None:
        from bmmstream.sources.hub import DiskBudget

        opts["max_disk"] = DiskBudget(cfg.max_disk)  # one budget shared by every Hub input
    if cache_dir is not None:
        opts["cache_dir"] = cache_dir
    base = open_source(cfg.base_model, **opts)
    experts = [open_source(m.model, base=base, **opts) for m in cfg.models]  # base: for LoRA adapters
    return Sources(base, experts)


def pinned_config(cfg: MergeConfig, sources: Sources) -> dict:
    """The config with every Hub source pinned to the commit hash it resolved to."""
    d = cfg.to_dict()

    def pin(spec: str, src: TensorSource) -> str:
        if src.revision is None:
            return str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else spec
        name = spec.removeprefix("hf://").split("@")[0]
        return f"{name}@{src.revision}"

    d["base_model"] = pin(cfg.base_model, sources.base)
    for entry, src in zip(d["models"], sources.experts):
        entry["model"] = pin(entry["model"], src)
    if str(cfg.tokenizer_source).startswith("model:"):  # names one of the sources: pinned like it
        specs = [cfg.base_model] + [m.model for m in cfg.models]
        k = specs.index(cfg.tokenizer_source.removeprefix("model:"))
        d["tokenizer_source"] = "model:" + ([d["base_model"]] + [m["model"] for m in d["models"]])[k]
    return d


def out_dtype_for(name: str, st_dtype: str, cfg: MergeConfig) -> str:
    t = ST_TO_TORCH[st_dtype]
    if cfg.out_dtype is None or not t.is_floating_point:
        return st_dtype
    return TORCH_TO_ST[DTYPES[cfg.out_dtype]]


@dataclass
class Job:
    """Everything a run needs, opened and validated."""

    cfg: MergeConfig
    run: RunDir
    out: Path
    device: torch.device
    sources: Sources
    plan: Plan
    method: MergeMethod
    layout: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)
    vocab: VocabPlan | None = None  # experts with added tokens: the output's vocabulary (sources/vocab.py)
    threads: int = 1  # CPU threads for torch and numba (bmmstream/executors/threads.py)

    @cached_property
    def specs(self) -> dict:
        return self.plan.by_name()

    @property
    def needs_grams(self) -> bool:
        return bool(getattr(self.method, "needs_grams", False))

    @property
    def partial(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")


def plan_for(cfg: MergeConfig, base: TensorSource) -> Plan:
    """The base checkpoint's plan with the config's blocks, refused in one line when they cannot be cut."""
    blocks = cfg.parameters.get("blocks", 1)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise BmmError(f"parameters.blocks must be an integer >= 1, got {blocks!r}")
    plan = build_plan(base.config(), base.tensor_infos(), blocks=blocks)
    if blocks > max(plan.num_layers, 1):
        raise BmmError(
            f"parameters.blocks is {blocks}, but {cfg.base_model} has {plan.num_layers} layer(s) to cut into blocks"
        )
    return plan


def build_method(cfg: MergeConfig, plan: Plan, parameters: dict | None = None) -> MergeMethod:
    """The config's merge method (with `parameters` instead of the config's, e.g. a search's best point),
    told the plan facts a method may need: SLERP's gradient over layers needs their number."""
    method = get_method(cfg.merge_method, cfg.parameters if parameters is None else parameters, seed=cfg.seed,
                        models=[(m.model, m.parameters) for m in cfg.models])
    for m in (method, getattr(method, "anchor", None)):
        if hasattr(m, "num_layers"):
            m.num_layers = plan.num_layers
    return method


def prepare(
    config: dict | str | Path | MergeConfig,
    *,
    out: str | Path | None = None,
    run_dir: str | Path | None = None,
    device: str | None = "auto",
    threads: int | str | None = None,
) -> Job:
    """Open, validate and plan a run (new or resumed) without heavy work.

    `threads` (overrides the config's `threads`): an int >= 1 or "auto". An explicit count is used
    as given; `auto` is resolved when the run directory is created and recorded in run.json, and a
    resumed run reuses that count, because CPU reductions split work by thread count and so round
    by it: a resumed run stays bit-identical to one never stopped."""
    from bmmstream.sources.validate import validate_sources

    origin = str(config) if isinstance(config, (str, Path)) else None
    try:
        asked = parse_threads(threads)
    except ValueError as e:
        raise BmmError(f"threads: {e}") from None
    cfg = load_config(config)
    if threads is None and isinstance(cfg.threads, int):  # an explicit "auto" overrides the config's count
        asked = cfg.threads
    recorded = None
    run = RunDir(Path(run_dir) if run_dir else default_run_dir(cfg, origin))
    if run.exists():
        rec = run.load()
        pinned = load_config(rec["config"], origin=str(run.run_json))
        if json.dumps(_unpinned(rec["config"]), sort_keys=True) != json.dumps(_unpinned(cfg.to_dict()), sort_keys=True):
            raise BmmError(
                f"{run.root}: run directory holds a different merge; use `bmm resume {run.root}` or another --run-dir"
            )
        cfg = pinned
        recorded = rec.get("threads")
        out_path = Path(rec["output"])
        if out is not None and Path(out).resolve() != out_path.resolve():
            raise BmmError(f"{run.root}: this run writes to {out_path}, not {out}")
    else:
        out_path = Path(out) if out is not None else run.root / "model"
        if out_path.exists():
            raise BmmError(f"{out_path}: output folder already exists; remove it or choose another --out")
    dev = resolve_device(device)
    sources = open_sources(cfg, cache_dir=run.root / "hub-cache")
    try:
        validate_sources(sources.base, sources.experts)
        vocab = plan_vocab(cfg.tokenizer_source, sources.base, sources.experts,
                           [cfg.base_model] + [m.model for m in cfg.models])
        if vocab is not None:  # methods see the base's rows; the added rows are read aside
            base_infos = sources.base.tensor_infos()
            sources.experts = [vocab.view(e, t, base_infos) for t, e in enumerate(sources.experts)]
        plan = plan_for(cfg, sources.base)
        method = build_method(cfg, plan)
    except BaseException:
        sources.close()
        raise
    infos = sources.base.tensor_infos()
    layout = [(n, vocab.out_shape(n, infos[n].shape) if vocab else tuple(infos[n].shape),
               out_dtype_for(n, infos[n].dtype, cfg)) for unit in plan.units for n in unit]
    n_threads = asked or recorded or resolve_threads(threads if threads is not None else cfg.threads)
    job = Job(cfg, run, out_path.resolve(), dev, sources, plan, method, layout, vocab, n_threads)
    from bmmstream.output.writer import disk_error

    where = run.root
    try:
        if not run.exists():
            run.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                run.run_json,
                {"config": pinned_config(cfg, sources), "output": str(job.out), "bmmstream": __version__,
                 "threads": n_threads},
            )
        if not job.out.exists():  # an unwritable output location is refused now, not after the work
            where = job.out  # built as <out>.partial; the user chose <out>
            job.partial.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sources.close()
        raise disk_error(e, where) from None
    return job


def _unpinned(d: dict) -> dict:
    """Config without revision pins, to compare a resumed run with the config it was started from."""
    d = json.loads(json.dumps(d))
    d.pop("threads", None)  # how the run computes, not what it merges

    def strip(spec: str) -> str:
        p = Path(spec).expanduser()
        return str(p.resolve()) if p.exists() else spec.removeprefix("hf://").split("@")[0]

    d["base_model"] = strip(d["base_model"])
    for m in d["models"]:
        m["model"] = strip(m["model"])
    if str(d.get("tokenizer_source")).startswith("model:"):
        d["tokenizer_source"] = "model:" + strip(d["tokenizer_source"].removeprefix("model:"))
    return d


def _module_input(job: Job, n: str, raw: torch.Tensor, store: StatsStore | None = None) -> ModuleInput:
    """Base and task vectors of one floating tensor in the compute dtype on the device.

    Why the way it is: the stored base is converted once (transposed in the same copy for a linear
    stored (d_in, d_out), GPT-2's Conv1D, which reaches methods as (d_out, d_in) like every other);
    each task vector is E_t - W_pre computed into its slot in one pass when the expert's dtype
    converts exactly to the compute dtype (the same bits as converting first, then subtracting)."""
    spec = job.specs[n]
    dtype = job.cfg.compute_dtype
    flip = spec.transposed
    if flip:
        base = torch.empty(raw.shape[::-1], dtype=dtype, device=job.device)
        base.copy_(raw.T)
    else:
        base = raw.to(job.device, dtype)
    if not bool(torch.isfinite(base).all()):  # NaN/Inf would reach every method's output
        raise BmmError(f"{job.sources.base.id}: tensor '{n}' contains NaN or Inf values")
    deltas = torch.empty((len(job.sources.experts), *base.shape), dtype=dtype, device=job.device)
    for t, e in enumerate(job.sources.experts):  # filled in place: no T-fold temporary copy
        et = e.get(n)
        et = et.T if flip else et
        if job.device.type == "cpu" and torch.promote_types(et.dtype, dtype) == dtype:
            torch.sub(et, base, out=deltas[t])  # exact conversion, then the subtraction in `dtype`
            if not bool(torch.isfinite(deltas[t]).all()) and not bool(torch.isfinite(et).all()):
                raise BmmError(f"{e.id}: tensor '{n}' contains NaN or Inf values")
        else:
            deltas[t].copy_(et)
            if not bool(torch.isfinite(deltas[t]).all()):
                raise BmmError(f"{e.id}: tensor '{n}' contains NaN or Inf values")
            deltas[t] -= base
        del et
    grams = None
    if store is not None and job.needs_grams and spec.kind == "linear":
        grams = module_grams(store, n, len(job.sources.experts), job.device)
    # LoRA experts: per task (B, A) with U_t = B A for the statistics (rank 0 where the delta is
    # exactly zero); None when some expert has no such form (a full fine-tune): dense statistics
    factors = None
    if spec.kind == "linear" and any(hasattr(e, "lora_factors") for e in job.sources.experts):
        factors = []
        for t, e in enumerate(job.sources.experts):
            f = e.lora_factors(n) if hasattr(e, "lora_factors") else None
            if f is None and not bool(deltas[t].any()):
                f = (deltas.new_zeros(deltas.shape[1], 0), deltas.new_zeros(0, deltas.shape[2]))
            if f is None or (f[0].shape[0], f[1].shape[1]) != tuple(deltas.shape[1:]):
                factors = None
                break
            factors.append((f[0].to(job.device), f[1].to(job.device)))
    return ModuleInput(spec, base, deltas, grams, factors)


def _unit_inputs(
    job: Job, names: list[str], store: StatsStore | None = None
) -> tuple[list[ModuleInput], dict[str, torch.Tensor]]:
    """Base and task vectors of one unit in the compute dtype on the device; raw tensors that are
    not floating point (ids, masks) are passed through untouched."""
    inputs, passthrough = [], {}
    for n in names:
        raw = job.sources.base.get(n)
        if not raw.is_floating_point():
            passthrough[n] = raw
            continue
        inputs.append(_module_input(job, n, raw, store))
    return inputs, passthrough


def _raw_ok(job: Job) -> bool:
    """Whether the fused raw-tensor hooks may be asked at all (methods/registry.py RawModule):
    CPU, float32 compute, no extended vocabulary."""
    return job.device.type == "cpu" and job.cfg.compute_dtype == torch.float32 and job.vocab is None


def _raw_module(job: Job, n: str, base: torch.Tensor) -> RawModule:
    """The stored tensors of `n` as the sources hold them (memory-mapped, not copied)."""
    srcs = job.sources
    return RawModule(job.specs[n], base, [e.get(n) for e in srcs.experts], [s.id for s in srcs.all])


def _overrides(method: MergeMethod, hook: str) -> bool:
    return getattr(type(method), hook) is not getattr(MergeMethod, hook)


def _takes_units(method: MergeMethod) -> bool:
    """Whether the method gets a whole unit's inputs at once (it overrides merge_unit to batch or
    couple tensors) rather than one tensor at a time (_merge_stream; `bmm plan`'s estimate)."""
    return _overrides(method, "merge_unit") and not getattr(method, "merges_by_module", False)


def _prepass(job: Job, progress: bool) -> None:
    if not job.method.needs_prepass:
        return
    if job.run.prepass.exists():
        job.method.load_prepass_state(json.loads(job.run.prepass.read_text()))
        return
    units = job.plan.units
    method = job.method
    use_raw = _raw_ok(job) and _overrides(method, "prepass_observe_raw")
    for i, names in enumerate(tqdm(units, desc="prepass", unit="unit", disable=not progress)):
        if i + 1 < len(units):
            for s in job.sources.all:
                s.prefetch(units[i + 1])
        for n in names:  # one tensor at a time: memory is one tensor's task vectors, not a unit's
            raw = job.sources.base.get(n)
            if not raw.is_floating_point():
                continue
            if use_raw and method.prepass_observe_raw(_raw_module(job, n, raw)):
                continue
            method.prepass_observe(_module_input(job, n, raw))
        for s in job.sources.all:
            s.release(names)
    write_json_atomic(job.run.prepass, method.prepass_state())


def _out_dtypes(job: Job) -> dict[str, torch.dtype]:
    return {n: ST_TO_TORCH[dt] for n, _, dt in job.layout}


def _weight(job: Job, inp: ModuleInput, u: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
    """W_pre + U back in the stored layout (and with the added vocabulary rows). Summed into W_pre's
    buffer (the same sum, no new one) when `raw`, the stored base, shows it is a copy, not the source's
    memory-mapped tensor itself, and U is not a view of it."""
    b = inp.base
    storage = b.untyped_storage().data_ptr()
    own = (raw is not None and raw.untyped_storage().data_ptr() != storage and u.shape == b.shape
           and u.dtype == b.dtype and u.untyped_storage().data_ptr() != storage)
    w = b.add_(u) if own else b + u
    w = w.T.contiguous() if inp.spec.transposed else w  # back to the stored layout
    if job.vocab is not None:  # added tokens' rows: averaged over the experts that have them
        w = job.vocab.extend(inp.spec.name, w, job.sources.experts)
    return w


def _merge_stream(
    job: Job, names: list[str], store: StatsStore | None, skip: Callable[[str], bool] = lambda n: False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged weights of one unit, (name, tensor in the output dtype, stored layout), in unit order.

    Methods that merge a tensor at a time (the base class's merge_unit, or a method declaring
    `merges_by_module`, e.g. BMM with its per-module statistics) get one tensor's inputs at a time, so
    memory is one tensor's T task vectors rather than a unit's; the fused hook `merge_raw` is asked
    first when the run allows it. Methods that override merge_unit (they batch or couple a unit's
    tensors) get the whole unit, as before. `skip`: tensors already written (a resumed run), not
    yielded (computed only where the unit path needs them)."""
    method = job.method
    out_dt = _out_dtypes(job)
    with_stats = store is not None and getattr(method, "uses_statistics", False)
    if _takes_units(method):
        inputs, passthrough = _unit_inputs(job, names, store)
        if with_stats:
            stats = {inp.spec.name: _statistics(job, inp, store) for inp in inputs if inp.spec.kind == "linear"}
            merged = method.merge_unit(inputs, stats)
        else:
            merged = method.merge_unit(inputs)
        by_name = {inp.spec.name: inp for inp in inputs}
        for n in names:
            if n in passthrough:
                t = passthrough.pop(n)
            else:
                t = _weight(job, by_name.pop(n), merged.pop(n))
            if not skip(n):
                yield n, t.to(dtype=out_dt[n]).cpu()
            del t
        return
    use_raw = _raw_ok(job) and _overrides(method, "merge_raw")
    for n in names:
        if skip(n):
            continue
        raw = job.sources.base.get(n)
        if not raw.is_floating_point():
            yield n, raw  # passed through (a view keeps its mapping alive until written)
            continue
        if use_raw:
            w = method.merge_raw(_raw_module(job, n, raw), out_dt[n])
            if w is not None:
                yield n, w
                continue
        inp = _module_input(job, n, raw, store)
        if with_stats:  # merges_by_module: merge_unit([inp], stats) is the unit's result for this module
            st = {n: _statistics(job, inp, store)} if inp.spec.kind == "linear" else {}
            u = method.merge_unit([inp], st)[n]
            del st
        else:
            u = method.merge_unit([inp])[n]
        inp.deltas = None  # the T task vectors go before the weight is built and converted
        w = _weight(job, inp, u, raw)
        del inp, u
        out = w.to(dtype=out_dt[n]).cpu()
        del w  # not held while suspended: the next module's merge would run beside a compute-dtype copy
        yield n, out
        del out


def _statistics(job: Job, inp: ModuleInput, store: StatsStore) -> dict[str, torch.Tensor]:
    """A module's statistics: from the store when a killed run computed them, else computed and stored.
    A search's final write also gets the anchor task vector U0 its statistics pass stored with the
    module's factors: the trials were scored with that U0, and merging the anchor again (a TSV-M
    anchor's SVDs) cost as much as the pass itself."""
    name = inp.spec.name
    if store.has(name):
        st = store.get(name, job.device)
        if store.has(factor_key(name)):
            st.update(store.get(factor_key(name), job.device, names=("U0",)))
        return st
    st = job.method.module_statistics(inp)
    store.put(name, st, {"tasks": len(job.sources.experts)})
    return st


def _merge_unit(job: Job, names: list[str], store: StatsStore | None) -> dict[str, torch.Tensor]:
    """One unit's merged weights, {name: tensor in the output dtype on the CPU} (the Ray workers' call)."""
    return dict(_merge_stream(job, names, store))


def model_card(job: Job) -> str:
    cfg = job.cfg
    srcs = job.sources
    # sources as run.json pins them (absolute folders, Hub names): the card must not depend on the
    # working directory a run was started or resumed from
    pinned = job.run.load()["config"]

    def named(spec: str, src: TensorSource) -> str:
        return f"`{spec.split('@')[0]}` (revision `{src.revision}`)" if src.revision else f"`{spec}`"

    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, bmmstream]",
        "---",
        "# Merged model",
        "",
        f"Merged with bmmstream {__version__} using `{cfg.merge_method}`.",
        "",
        "## Sources",
        "",
        f"- base: {named(pinned['base_model'], srcs.base)}",
    ]
    for m, s in zip(pinned["models"], srcs.experts):
        lines.append(f"- expert: {named(m['model'], s)}")
    lines += [
        "",
        "## Method and hyperparameters",
        "",
        "```json",
        json.dumps(job.method.describe(), indent=2, sort_keys=True, default=str),
        "```",
        "",
        f"Compute dtype `{cfg.dtype}`, output dtype `{cfg.out_dtype or 'as base'}`, seed {cfg.seed}.",
        "",
    ]
    return "\n".join(lines)


def execute(job: Job, *, progress: bool = True, executor=None) -> Path:
    """Run (or continue) a prepared job to completion; returns the output folder.
    `executor` (bmmstream.executors.ExecutorSpec, None: local): with kind `ray`, units are computed
    by Ray workers and still written here in unit order, so the bytes and the resume rules are the same.
    torch and numba compute with the job's thread count (Ray workers take the same count) and the
    caller's counts are restored after."""
    with use_threads(job.threads):
        return _execute(job, progress, executor, time.perf_counter())


def _execute(job: Job, progress: bool, executor, started: float) -> Path:
    from bmmstream.output.behind import WriteBehind
    from bmmstream.output.writer import ShardWriter, copy_aux, disk_error, write_config, write_text_atomic

    run = job.run
    if run.complete():
        return job.out
    if job.out.exists() and not job.partial.exists():
        # killed after the folder rename and before the manifest: the output is whole
        _write_manifest(job)
        return job.out
    torch.manual_seed(job.cfg.seed)
    _prepass(job, progress)
    job.partial.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(
        job.partial,
        job.layout,
        max_shard_bytes=job.cfg.shard_size,
        journal=run.journal,
        metadata={"format": "pt", "merged_by": "bmmstream"},
    )
    uses_store = getattr(job.method, "uses_statistics", False) or job.needs_grams
    store = StatsStore.for_run(run.stats, needs_grams=job.needs_grams, search=job.cfg.search is not None,
                               keep_statistics=bool(job.cfg.parameters.get("keep_statistics", False))
                               ) if uses_store else None
    if job.needs_grams:
        try:
            calibrate(job, store, progress)
        except OSError as e:  # the calibration Grams go to the statistics store
            raise disk_error(e, run.stats) from None
    keep = bool(job.cfg.parameters.get("keep_statistics", False))
    units = job.plan.units
    bar = tqdm(total=len(job.layout), desc=f"merge ({job.cfg.merge_method})", unit="tensor", disable=not progress)
    done = {n for n, _, _ in job.layout if writer.done(n)}  # a resumed run: written before
    bar.update(len(done))
    out_dt = _out_dtypes(job)
    remote = None  # Ray workers computing the units (bmmstream/executors/ray_units.py)
    # the unit before is written (and fsync'd, once) on its own thread while this one is computed
    behind = WriteBehind(writer, on_written=lambda n: bar.update(1))
    dropping: list[tuple[int, list[str]]] = []  # (units handed to the writer by then, names)
    try:
        if executor is not None and executor.kind == "ray":
            from bmmstream.executors.ray_units import RayUnits

            remote = RayUnits(job, executor, [i for i, names in enumerate(units)
                                              if not all(n in done for n in names)])
        for i, names in enumerate(units):
            if all(n in done for n in names):
                continue
            behind.wait_pending(1)  # memory: this unit's outputs and at most one unit's being written
            _drop_written(store, dropping, behind.done_units)
            if remote is None and i + 1 < len(units):
                for s in job.sources.all:
                    s.prefetch(units[i + 1])
            if remote is not None:
                merged = remote.take(i)
                stream = iter([(n, merged.pop(n).to(out_dt[n])) for n in names if n not in done])
                del merged
            else:
                stream = _merge_stream(job, names, store, skip=done.__contains__)
            while True:
                try:
                    n, t = next(stream)
                except StopIteration:
                    break
                except OSError as e:  # the statistics store (reads of inputs fail as BmmError)
                    need = sum((sh[0] + sh[-1]) * sh[-1] for n, sh, _ in job.layout
                               if n in names and len(sh) == 2 and job.specs[n].kind == "linear")
                    raise disk_error(e, run.stats, need * job.cfg.compute_dtype.itemsize if store else None) from None
                behind.put(n, t)
                del t
            del stream
            records = getattr(job.method, "solve_records", None)
            if records:  # appended once the tensors they describe are journaled
                batch = list(records)
                records.clear()
                behind.end_unit(lambda batch=batch: append_jsonl(run.solve_log, batch))
            else:
                behind.end_unit()
            if store is not None and not keep:  # this unit's G and C, once its tensors are journaled
                dropping.append((behind.queued_units, names))  # (calibration Grams stay until the end)
            for s in job.sources.all:
                s.release(names)
            trim_heap()
        behind.close()
        _drop_written(store, dropping, behind.done_units)
    except BaseException:
        behind.abort()  # what was queued is written; journal what is durable so a rerun resumes from there
        try:
            writer.commit()
        except OSError:
            pass
        raise
    finally:
        bar.close()
        if remote is not None:
            remote.close()
    writer.finalize()
    for src in job.sources.all:  # Hub files: the bytes merged must be the bytes the Hub recorded
        if hasattr(src, "verify"):
            try:
                src.verify()
            except BmmError:
                writer.close()  # nothing derived from those bytes may be resumed from
                for p in (job.partial, run.stats):
                    shutil.rmtree(p, ignore_errors=True)
                for p in (run.journal, run.prepass, run.solve_log):
                    p.unlink(missing_ok=True)
                raise
    base_cfg = job.sources.base.config()
    write_config(job.partial, job.vocab.output_config(base_cfg) if job.vocab else base_cfg, _config_dtype(job))
    tok = job.sources.experts[job.vocab.tokenizer] if job.vocab and job.vocab.tokenizer is not None else None
    copy_aux(job.sources.base, job.partial,
             [f for f in job.sources.base.aux_files() if tok is None or f not in TOKENIZER_FILES])
    if tok is not None:  # tokenizer_source: that expert's tokenizer files, none of the base's
        for f in TOKENIZER_FILES:
            (job.partial / f).unlink(missing_ok=True)
        copy_aux(tok, job.partial, [f for f in tok.aux_files() if f in TOKENIZER_FILES])
    write_text_atomic(job.partial / "README.md", model_card(job))
    os.replace(job.partial, job.out)
    _write_manifest(job, seconds=time.perf_counter() - started)
    if store is not None and not keep:
        shutil.rmtree(run.stats, ignore_errors=True)
    return job.out


def _drop_written(store: StatsStore | None, dropping: list[tuple[int, list[str]]], committed: int) -> None:
    """Drop the statistics of units whose tensors are journaled (never before: a run killed in between
    resumes by reusing them)."""
    while dropping and dropping[0][0] <= committed:
        for n in dropping.pop(0)[1]:
            store.drop(n)


def _config_dtype(job: Job) -> torch.dtype:
    if job.cfg.out_dtype:
        return DTYPES[job.cfg.out_dtype]
    floats = [ST_TO_TORCH[dt] for _, _, dt in job.layout if ST_TO_TORCH[dt].is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _write_manifest(job: Job, seconds: float | None = None) -> None:
    """`seconds`: this invocation's wall time in execute (prepass, statistics, merge, writing; not the
    interpreter's start-up, imports or opening the sources), what benchmarks set against a read of the inputs."""
    files = {p.name: p.stat().st_size for p in sorted(job.out.iterdir()) if p.is_file()}
    rec = {"complete": True, "output": str(job.out), "files": files, "threads": job.threads}
    if seconds is not None:
        rec["execute_seconds"] = round(seconds, 4)
    write_json_atomic(job.run.manifest, rec)


def status(run_dir: str | Path) -> dict:
    """What a run directory holds: complete or not, how far the writer got."""
    from bmmstream.output.rundir import read_jsonl

    run = RunDir(Path(run_dir))
    if not run.exists():
        raise BmmError(f"{run_dir}: not a bmmstream run directory (no run.json)")
    rec = run.load()
    written = {r["tensor"] for r in read_jsonl(run.journal) if "tensor" in r}
    return {
        "run_dir": str(run.root),
        "output": rec["output"],
        "merge_method": rec["config"].get("merge_method"),
        "complete": run.complete(),
        "tensors_written": len(written),
        "prepass_done": run.prepass.exists(),
        # a search run resumes as a search (`bmm resume`): how many trials its history holds
        "search": bool(rec["config"].get("search")),
        "search_trials": sum(len(read_jsonl(h)) for h in run.root.glob("search/*/history.jsonl")),
    }


# stored dtypes the fused kernels read (methods/linear_kernels.py, ties_kernels.py); others take the
# general path, which `bmm plan` must then assume
FUSED_DTYPES = ("BF16", "F16", "F32")


def plan_report(config: dict | str | Path | MergeConfig, device: str = "auto") -> dict:
    """`bmm plan`: open and check the sources (headers only), plan, and estimate the run's cost."""
    from bmmstream.plan.estimate import STREAM_FUSED, STREAM_TENSOR, STREAM_UNIT, estimate_report
    from bmmstream.sources.validate import validate_sources
    from bmmstream.statistics.calibration_data import CalibrationSpec

    cfg = load_config(config)
    dev = resolve_device(device)
    sources = open_sources(cfg, cache_dir=None)
    try:
        validate_sources(sources.base, sources.experts)
        infos = sources.base.tensor_infos()
        plan = plan_for(cfg, sources.base)
        method = build_method(cfg, plan)
    finally:
        sources.close()
    out_elem = {n: torch.empty((), dtype=ST_TO_TORCH[out_dtype_for(n, infos[n].dtype, cfg)]).element_size()
                for n in infos}
    out_bytes = sum(infos[n].numel * out_elem[n] for n in infos)
    # how the run will hand the method its tensors (as _merge_stream decides; an extended vocabulary,
    # which plan does not resolve, takes the tensor path)
    if _takes_units(method):
        stream = STREAM_UNIT
    elif (dev.type == "cpu" and cfg.compute_dtype == torch.float32 and cfg.tokenizer_source is None
          and method.fuses_raw()
          and all(i.dtype in FUSED_DTYPES for i in infos.values() if i.dtype.startswith(("F", "BF")))):
        stream = STREAM_FUSED
    else:
        stream = STREAM_TENSOR
    calibration_tokens = None
    if getattr(method, "needs_grams", False):
        # a model without calibration data is named by validation when the run starts
        specs = [CalibrationSpec.from_dict(m.calibration) for m in cfg.models if m.calibration is not None]
        calibration_tokens = [s.samples * s.max_len for s in specs]
    return estimate_report(
        plan,
        infos,
        experts=len(cfg.models),
        compute_bytes=torch.empty((), dtype=cfg.compute_dtype).element_size(),
        # BMM accumulates G and C in float64 unless `statistics_dtype: compute`
        statistics_bytes=8 if method.params.get("statistics_dtype") == "float64"
        else torch.empty((), dtype=cfg.compute_dtype).element_size(),
        method=method.name,
        method_description=method.describe(),
        statistics=cfg.parameters.get("statistics", "data_free"),
        needs_prepass=method.needs_prepass,
        out_bytes=out_bytes,
        calibration_tokens=calibration_tokens,
        keep_statistics=bool(cfg.parameters.get("keep_statistics", False)) or cfg.search is not None,
        device=dev,
        stream=stream,
        out_element_bytes=out_elem,
        raw_scratch_bytes=method.raw_scratch_bytes(len(cfg.models)),
        working_copies=method.working_copies(len(cfg.models)),
        extra_bytes={m.name: method.extra_bytes(tuple(m.matrix_shape), m.kind, len(cfg.models)) for m in plan.modules},
        work={m.name: method.compute_work(tuple(m.matrix_shape), m.kind, len(cfg.models)) for m in plan.modules},
    )
