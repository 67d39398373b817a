"""`bmm search`: BMM's outer loop (Algorithm 1) on a resident model, then one streamed write.

1. Statistics pass: stream the checkpoints unit by unit as a merge does; the anchor's non-regressed
   tensors go into the resident model, and every regressed module's spectral factors go to the
   run's Zarr store once, one group per module (`factor_key(name)`: e, Q, the residual-form
   A = C Q - U0 Q diag(e) and U0, solve/spectral.py; with hybrid statistics the two ends of G and C
   in eps). G and C stay in the store too, so the final write reuses them, and U0 with them (the
   anchor the trials were scored with is not merged again). A resumed pass merges the anchor only
   for units whose factors are not all stored.
2. Trials (`StreamedTrials`): unit by unit, read the factors (the next unit's on a worker thread),
   re-solve with one matmul per module (no factorisation per trial; hybrid: one Cholesky), write
   W_pre + s U(lam) into the resident model in place, drop the unit's factors. W_pre is read back
   from the base checkpoint (`search: {keep_base: false}`) or held resident (`true`; `auto`: only
   on an accelerator with room). Each evaluation's seconds streaming / re-solving / assembling /
   scoring go to <run>/search_costs.jsonl and search-report/trial_costs.json.
3. The driver (search/driver.py) asks the optimiser, caches scores by parameters, keeps the
   history in the run directory (a killed search resumes with the same history; the factors
   already stored are not recomputed), re-scores the best few at full fidelity; the best point is
   then written by the ordinary streaming merge.
4. `executor: ray` (search/ray_trials.py): step 2 runs on N Ray actors, each with a resident
   model of its own, N trials in flight and told as they arrive; steps 1 and 3 stay here.

Memory: one resident model in the compute dtype + two units' factors + one unit's W_pre (the
statistics pass: one unit's checkpoints and statistics, as a merge). The model itself must fit
on the device. `search: {in_core: true}` keeps the former path (every module's W_pre and factors
resident, about 4 model copies + d_in^2 per module) for comparison.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bmmstream.errors import BmmError
from bmmstream.search.posterior import PosteriorOptions
from bmmstream.solve.spectral import prepare as spectral_prepare
from bmmstream.solve.closed_form import bmm_solve


@dataclass
class _Batch:
    """Regressed modules of one shape, stacked so a trial solves them in one batched call."""

    names: list[str]
    blocks: list[int]
    groups: list[str]
    W_pre: torch.Tensor  # [B, o, i]
    spectral: object | None = None  # solve.spectral.SpectralStats (non-hybrid)
    ends: tuple | None = None  # (A, B, CA, CB, U0) for hybrid


def _resident_model(job) -> torch.nn.Module:
    """The base architecture from transformers (never hand-written), on the compute device."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfgd = dict(job.sources.base.config())
    mt = cfgd.pop("model_type", None)
    if mt is None:
        raise BmmError(f"{job.cfg.base_model}: config.json has no model_type; the search needs a transformers model")
    config = AutoConfig.for_model(mt, **cfgd)
    archs = cfgd.get("architectures") or []
    cls = AutoModelForCausalLM if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else AutoModel
    model = cls.from_config(config, dtype=job.cfg.compute_dtype)
    return model.to(job.device).eval()


def _param_map(model: torch.nn.Module, names: list[str], transposed: set[str]) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the model's parameter/buffer (or a view of it) that holds it.

    Found by name (allowing for a base-model prefix), else through transformers' own checkpoint
    conversion (>= 5: ViT's renamed modules; Mixtral's per-expert w1/w3/w2, which the model holds
    as fused [E, ...] tensors: the view of expert e's slice). A weight the plan marks `transposed`
    (stored (d_in, d_out): GPT-2's Conv1D, Gemma 3's multimodal projector) is mapped as its transposed
    view: trials write (d_out, d_in) matrices, the layout the pipeline gives methods, and the view
    stores them as the model holds them. Tied parameters are found under either name."""
    import re

    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers()))
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        maps = get_model_conversion_mapping(model)
        converters = [m for m in maps if isinstance(m, WeightConverter)]
        renamings = [m for m in maps if not isinstance(m, WeightConverter)]
    except (ImportError, AttributeError, TypeError):  # transformers 4: checkpoints use the module names
        rename_source_key = None

    def converted(n: str) -> torch.Tensor | None:
        if rename_source_key is None:
            return None
        target, pattern = rename_source_key(n, renamings, converters, prefix, own)
        if target not in own:
            return None
        if pattern is None:
            return own[target]
        conv = next(c for c in converters if pattern in c.source_patterns)
        ops = [type(o).__name__ for o in conv.operations]
        dims = [getattr(o, "dim", None) for o in conv.operations]
        if ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]) or dims not in ([0], [0, 1]):
            raise BmmError(f"search: transformers loads '{n}' into '{target}' through {ops}; the search cannot "
                           "write it in place (merge with fixed parameters: bmm merge)")
        m = re.search(r"(\d+)".join(re.escape(part) for part in pattern.split("*")), n)  # the expert index
        if m is None or pattern.count("*") != 1:
            raise BmmError(f"search: cannot tell the expert index of '{n}' from transformers' pattern '{pattern}'")
        e, k = int(m.group(1)), conv.source_patterns.index(pattern)
        fused = own[target].detach()[e]  # expert e of the [E, ...] stack
        rows = fused.shape[0] // len(conv.source_patterns)
        return fused.narrow(0, k * rows, rows)  # source k of the concatenation along dim 1 of the stack

    out, missing = {}, []
    for n in names:
        for cand in (n, n.removeprefix(prefix + "."), f"{prefix}.{n}"):
            if cand in own:
                out[n] = own[cand].detach().T if n in transposed else own[cand]
                break
        else:
            t = converted(n)
            if t is None:
                missing.append(n)
            else:
                out[n] = t
    if missing:
        raise BmmError(
            f"the {type(model).__name__} built from the base config has no parameter for "
            f"{len(missing)} checkpoint tensor(s), e.g. '{missing[0]}'"
        )
    return out


def _resident_params(job, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The resident model's tensors by checkpoint name (transposed views where the plan says so)."""
    names = [n for unit in job.plan.units for n in unit]
    return _param_map(model, names, {m.name for m in job.plan.modules if m.transposed})


def _stream_units(job, params: dict[str, torch.Tensor], store, progress: bool,
                  anchored: Callable[[str], bool] = lambda n: False):
    """The statistics pass's walk over the checkpoints, shared by both search paths: unit by unit
    (the next one prefetched), write pass-through tensors and the anchor's non-regressed tensors
    into the resident model, and yield (regressed inputs, anchor task vectors) of the unit; the
    unit's bytes are released once the caller is done with it.

    `anchored(name)`: the regressed module's anchor is already stored (a resumed search's factors
    hold U0). A unit whose regressed modules all are merges only its other tensors with the anchor:
    a TSV-M anchor's SVDs were most of a resumed search's start-up. A unit with any module missing
    merges all of them, as the first pass did, so the stored U0 are the same bits either way."""
    from bmmstream.pipeline import _unit_inputs

    units = job.plan.units
    for i, unit in enumerate(tqdm(units, desc="search statistics", unit="unit", disable=not progress)):
        if i + 1 < len(units):
            for s in job.sources.all:
                s.prefetch(units[i + 1])
        inputs, passthrough = _unit_inputs(job, unit, store)
        linear = [inp.spec.name for inp in inputs if inp.spec.kind == "linear"]
        if linear and all(anchored(n) for n in linear):
            anchor = job.method.anchor.merge_unit([inp for inp in inputs if inp.spec.kind != "linear"])
        else:
            anchor = job.method.anchor.merge_unit(inputs)
        with torch.no_grad():
            for n, t in passthrough.items():
                params[n].copy_(t)
            for inp in inputs:
                if inp.spec.kind != "linear":
                    params[inp.spec.name].copy_(inp.base + anchor[inp.spec.name])
        yield [inp for inp in inputs if inp.spec.kind == "linear"], anchor
        del inputs, passthrough, anchor
        for s in job.sources.all:
            s.release(unit)


def _module_stats(job, store, inp) -> tuple[str, tuple[torch.Tensor, ...]]:
    """("ends", (G at eps 1, G at eps 0, C at eps 1, C at eps 0)) for a hybrid module with Grams (the
    merge's own statistics code, same dtype and rescale option; trials mix them), else ("gc", (G, C))
    from the store, computed and stored once."""
    method, n = job.method, inp.spec.name
    if method.params["statistics"] == "hybrid" and inp.grams is not None:
        one, zero = method.module_statistics(inp, eps=1.0), method.module_statistics(inp, eps=0.0)
        return "ends", (one["G"], zero["G"], one["C"], zero["C"])
    if store.has(n):
        st = store.get(n, job.device)
    else:
        st = method.module_statistics(inp)
        store.put(n, st, {"tasks": len(job.sources.experts)})
    return "gc", (st["G"], st["C"])


def _collect(job, model, store, progress: bool) -> tuple[list[_Batch], dict[str, torch.Tensor]]:
    params = _resident_params(job, model)
    per_shape: dict[tuple, list] = defaultdict(list)
    for inputs, anchor in _stream_units(job, params, store, progress):
        with torch.no_grad():
            for inp in inputs:
                stats = _module_stats(job, store, inp)
                per_shape[tuple(inp.base.shape)].append((inp.spec, inp.base, anchor[inp.spec.name], stats))
        del inputs, anchor  # one unit alive at a time: the walk loads the next one after this
    batches = []
    for shape, items in sorted(per_shape.items()):
        # a module without Grams in a hybrid run (outside the layer stack) is solved on its own
        kinds = defaultdict(list)
        for it in items:
            kinds[it[3][0]].append(it)
        for kind, its in sorted(kinds.items()):
            b = _Batch(
                names=[s.name for s, *_ in its],
                blocks=[s.block for s, *_ in its],
                groups=[s.group for s, *_ in its],
                W_pre=torch.stack([w for _, w, _, _ in its]),
            )
            U0 = torch.stack([u for _, _, u, _ in its])
            if kind == "gc":
                G = torch.stack([st[1][0] for *_, st in its])
                C = torch.stack([st[1][1] for *_, st in its])
                b.spectral = spectral_prepare(G, C, U0, dtype=G.dtype)  # the merge solves in G's dtype too
            else:
                A, B, CA, CB = (torch.stack([st[1][k] for *_, st in its]) for k in range(4))
                b.ends = (A, B, CA, CB, U0)
            batches.append(b)
    return batches, params


def _with_fixed_groups(point: dict, method, key: str) -> dict:
    """Groups the search does not tie (modules outside attention/MLP, e.g. a BERT pooler) keep the
    config's rho/lam; they are added to every block of a point so the written merge agrees."""
    fixed = method.rho if key == "rho" else method.lam
    if fixed is None:  # lam searched while the config gave rho: fall back to the default rho rule
        return point
    blocks = []
    for b, blk in enumerate(point["blocks"]):
        vals = dict(fixed[min(b, len(fixed) - 1)])
        vals.update(blk[key])
        blocks.append({**blk, key: vals})
    return {**point, "blocks": blocks}


def _apply(point: dict, batches: list[_Batch], params: dict, key: str, default_eps: float) -> None:
    """Write W_pre + s U(lam) for every regressed module of the resident model."""
    from bmmstream.methods.bmm import DEFAULT_RHO
    from bmmstream.solve.closed_form import lam_from_rho

    blocks = point["blocks"]
    with torch.no_grad():
        for b in batches:
            dt, dev = b.W_pre.dtype, b.W_pre.device
            vals = [blocks[min(k, len(blocks) - 1)][key].get(g) for k, g in zip(b.blocks, b.groups)]
            # a group without a value takes the default relative rho, as methods/bmm.py does (never lam 0);
            # lam is formed in float64 from the statistics' trace exactly as the written merge forms it
            relative = torch.tensor([key == "rho" or v is None for v in vals], device=dev)
            hp = torch.tensor([DEFAULT_RHO if v is None else float(v) for v in vals], dtype=torch.float64, device=dev)
            s = torch.tensor([blocks[min(k, len(blocks) - 1)]["scale"] for k in b.blocks], dtype=dt, device=dev)
            if b.spectral is not None:
                lam = torch.where(relative, b.spectral.lam(hp), hp.to(b.spectral.e.dtype))
                U = b.spectral.solve(lam)
            else:
                A, B, CA, CB, U0 = b.ends
                eps = float(point.get("eps", default_eps))
                G, C = eps * A + (1 - eps) * B, eps * CA + (1 - eps) * CB
                hp = hp.to(G.dtype)
                lam = torch.where(relative, lam_from_rho(G, hp), hp)
                U, _ = bmm_solve(G, C, U0, lam, dtype=G.dtype)
            W = b.W_pre + s[:, None, None] * U
            for k, n in enumerate(b.names):
                params[n].copy_(W[k])


# -- out-of-core search: factors in the Zarr store, streamed layer by layer in every trial -------
FACTOR_DTYPES = {"compute": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FactorOptions:
    """How the search stores each module's factors (defaults chosen by bench/search_memory.py).

    dtype: storage dtype of Q and A ("compute": the run's compute dtype); e and trace(G) stay in
    the statistics dtype. Measured on the suites' task vectors (bench/search_memory.py storage):
    float32 costs <= 3e-8 relative error in U at 0.65x the float64 bytes, bfloat16 2e-3 at 0.48x,
    so the default "compute" stores float32 factors in a float32 run (the default) and float64 ones
    in a float64 run, where a trial then scores exactly the model the final merge writes. energy: keep the top-k eigenpairs of G holding this fraction of
    trace(G) (None, the default: all d_in, exact); on low-rank + noise task vectors any energy
    target that drops the noise directions costs 2-7% error, as small-lam trials amplify them.
    keep_base: hold W_pre resident ("true") or stream it from the base checkpoint every trial
    ("false"); "auto" keeps it only on an accelerator with room to spare."""

    dtype: str = "compute"
    energy: float | None = None
    keep_base: str = "auto"

    @classmethod
    def from_search(cls, s: dict) -> "FactorOptions":
        f = dict(s.get("factors") or {})
        unknown = sorted(set(f) - {"dtype", "energy"})
        if unknown:
            raise BmmError(f"search.factors: unknown key(s) {unknown}; known: ['dtype', 'energy']")
        dtype = str(f.get("dtype", cls.dtype))
        if dtype not in FACTOR_DTYPES:
            raise BmmError(f"search.factors.dtype must be one of {sorted(FACTOR_DTYPES)}, got {dtype!r}")
        energy = f.get("energy")
        if energy is not None and (isinstance(energy, bool) or not 0.0 < float(energy) <= 1.0):
            raise BmmError(f"search.factors.energy must be in (0, 1], got {energy!r}")
        kb = s.get("keep_base", "auto")
        kb = {True: "true", False: "false"}.get(kb, kb)
        if kb not in ("auto", "true", "false"):
            raise BmmError(f"search.keep_base must be auto, true or false, got {kb!r}")
        return cls(dtype, None if energy is None else float(energy), kb)


def choose_rank(e: torch.Tensor, energy: float | None) -> int:
    """Smallest k whose top-k eigenvalues (descending) hold `energy` of trace(G); d_in for None."""
    d = e.shape[-1]
    if energy is None or energy >= 1.0:
        return d
    c = torch.cumsum(e.double(), -1)
    k = int(torch.searchsorted(c, energy * c[-1]).item()) + 1
    return max(1, min(k, d))


def module_factors(G: torch.Tensor, C: torch.Tensor, U0: torch.Tensor, opts: FactorOptions) -> tuple[dict, dict]:
    """A module's factors for the store: e, Q_k, A_k (residual form, solve/spectral.py), U0 and
    trace(G)/d_in, factored once in G's dtype as the in-core search does; Q and A are then cast to
    the storage dtype. Returns (arrays, attrs)."""
    st = spectral_prepare(G, C, U0, dtype=G.dtype)
    k = choose_rank(st.e, opts.energy)
    store_dt = FACTOR_DTYPES[opts.dtype] or U0.dtype
    arrays = {"e": st.e[..., :k].contiguous(), "Q": st.Q[..., :k].to(store_dt).contiguous(),
              "A": st.A[..., :k].to(store_dt).contiguous(), "U0": U0, "trace_over_d": st.trace_over_d.reshape(1)}
    return arrays, {"kind": "eig", "k": k, "d_in": int(G.shape[-1])}


@dataclass
class _Module:
    name: str
    block: int
    group: str
    transposed: bool


def _base_weight(job, name: str, transposed: bool) -> torch.Tensor:
    """W_pre as the methods see it: compute dtype, device, (d_out, d_in)."""
    w = job.sources.base.get(name).to(job.device, job.cfg.compute_dtype)
    return w.T.contiguous() if transposed else w


def _write_factors(job, model, store, opts: FactorOptions, keep_base: bool, progress: bool):
    """The statistics pass of the out-of-core search: stream the checkpoints unit by unit, write
    the anchor's non-regressed tensors into the resident model, and every regressed module's
    factors to the store once (a resumed run skips the modules already complete). Only one
    unit's tensors are alive at a time. Returns (units of regressed modules, param map, W_pre
    dict when kept else None)."""
    from bmmstream.statistics.store import factor_key

    params = _resident_params(job, model)
    out_units: list[list[_Module]] = []
    base: dict[str, torch.Tensor] | None = {} if keep_base else None
    done = lambda n: store.has(factor_key(n))  # noqa: E731
    for inputs, anchor in _stream_units(job, params, store, progress, anchored=done):
        mods = []
        with torch.no_grad():
            for inp in inputs:
                n = inp.spec.name
                mods.append(_Module(n, inp.spec.block, inp.spec.group, inp.spec.transposed))
                if base is not None:
                    base[n] = inp.base.clone()  # never a view of the checkpoint's memory map
                if done(n):
                    continue
                kind, st = _module_stats(job, store, inp)
                if kind == "ends":
                    arrays = {"GA": st[0], "GB": st[1], "CA": st[2], "CB": st[3], "U0": anchor[n]}
                    attrs = {"kind": "ends"}
                else:
                    arrays, attrs = module_factors(st[0], st[1], anchor[n], opts)
                store.put(factor_key(n), arrays, {**attrs, "dtype": opts.dtype, "energy": opts.energy})
        del inputs, anchor  # one unit alive at a time: the walk loads the next one after this
        out_units.append(mods)
    return [u for u in out_units if u], params, base


@dataclass
class TrialCost:
    """Seconds one trial spent per stage (stream: waiting for factors and W_pre)."""

    stream_s: float = 0.0
    resolve_s: float = 0.0
    assemble_s: float = 0.0
    score_s: float = 0.0
    factor_bytes: int = 0


class StreamedTrials:
    """Applies search points to the resident model with the factors streamed from the store.

    Holds no factor between trials: per trial, each unit's factors are read (the next unit's on a
    worker thread while this one is solved), re-solved with one matmul per module, W_pre + s U is
    written into the model in place, and the unit's factors are dropped. `peak_factor_bytes` is
    the most factor bytes ever held at once (this unit + the one being prefetched)."""

    def __init__(self, job, store, units: list[list[_Module]], params: dict, base: dict | None,
                 key: str, default_eps: float):
        self.job, self.store, self.units, self.params, self.base = job, store, units, params, base
        self.key, self.default_eps = key, default_eps
        self.peak_factor_bytes = 0
        self._scratch: torch.Tensor | None = None  # the re-solve's workspace (largest module's A diag + U)

    def _load(self, i: int) -> dict[str, tuple[dict, dict]]:
        """Unit i's factors on the device, Q and A cast back to the compute dtype."""
        from bmmstream.statistics.store import factor_key

        dt, dev = self.job.cfg.compute_dtype, self.job.device
        out = {}
        for m in self.units[i]:
            f = self.store.get(factor_key(m.name), dev)
            for k in ("Q", "A"):
                if k in f:
                    f[k] = f[k].to(dt)
            out[m.name] = (f, self.store.attrs(factor_key(m.name)))
        return out

    def _resolve(self, f: dict, e: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """U = U0 + A diag(1 / (e + lam)) Q^T (solve/spectral.py's solve_eigen_truncated, one
        addmm) into a scratch buffer that is reused by every module and trial."""
        A, Q, U0 = f["A"], f["Q"], f["U0"]
        inv = (1.0 / (e + lam)).to(A.dtype)
        need = A.numel() + U0.numel()
        if self._scratch is None or self._scratch.numel() < need or self._scratch.dtype != A.dtype \
                or self._scratch.device != A.device:
            self._scratch = torch.empty(need, dtype=A.dtype, device=A.device)
        AI = torch.mul(A, inv, out=self._scratch[: A.numel()].view(A.shape))
        return torch.addmm(U0, AI, Q.T, out=self._scratch[A.numel(): need].view(U0.shape))

    @staticmethod
    def _bytes(facs: dict) -> int:
        return sum(t.numel() * t.element_size() for f, _ in facs.values() for t in f.values())

    def apply(self, point: dict) -> TrialCost:
        import concurrent.futures
        import time

        from bmmstream.methods.bmm import DEFAULT_RHO
        from bmmstream.solve.closed_form import lam_from_rho

        cost = TrialCost()
        if not self.units:
            return cost
        blocks, key = point["blocks"], self.key
        eps = float(point.get("eps", self.default_eps))
        src = self.job.sources.base
        with concurrent.futures.ThreadPoolExecutor(1) as pool, torch.no_grad():
            nxt, prev = pool.submit(self._load, 0), 0
            for i, mods in enumerate(self.units):
                t0 = time.perf_counter()
                facs = nxt.result()
                nxt = pool.submit(self._load, i + 1) if i + 1 < len(self.units) else None
                if self.base is None and i + 1 < len(self.units):
                    src.prefetch([m.name for m in self.units[i + 1]])
                cost.stream_s += time.perf_counter() - t0
                here = self._bytes(facs)
                cost.factor_bytes += here
                # unit i was read while unit i - 1 was solved: both were held at once
                self.peak_factor_bytes = max(self.peak_factor_bytes, prev + here)
                prev = here
                for m in mods:
                    t0 = time.perf_counter()
                    W_pre = self.base[m.name] if self.base is not None else _base_weight(self.job, m.name, m.transposed)
                    t1 = time.perf_counter()
                    f, attrs = facs.pop(m.name)
                    blk = blocks[min(m.block, len(blocks) - 1)]
                    v = blk[key].get(m.group)
                    hp = torch.tensor(DEFAULT_RHO if v is None else float(v), dtype=torch.float64)
                    relative = key == "rho" or v is None
                    if attrs["kind"] == "eig":
                        e = f["e"]
                        h = hp.to(e.dtype).to(e.device)
                        lam = h * f["trace_over_d"][0] if relative else h  # 0-dim: one module
                        U = self._resolve(f, e, lam)
                    else:  # hybrid: mix the two ends at this eps, one Cholesky solve
                        G = (eps * f["GA"] + (1 - eps) * f["GB"])[None]
                        C = (eps * f["CA"] + (1 - eps) * f["CB"])[None]
                        h = hp.to(G.dtype).to(G.device).reshape(1)
                        lam = lam_from_rho(G, h) if relative else h
                        U = bmm_solve(G, C, f["U0"][None], lam, dtype=G.dtype)[0][0]
                    del f
                    t2 = time.perf_counter()
                    # in place into the model: no W allocated (fresh pages cost more than the arithmetic)
                    self.params[m.name].copy_(W_pre).add_(U, alpha=float(blk["scale"]))
                    del U, W_pre
                    t3 = time.perf_counter()
                    cost.stream_s += t1 - t0
                    cost.resolve_s += t2 - t1
                    cost.assemble_s += t3 - t2
                del facs
                if self.base is None:
                    src.release([m.name for m in mods])
        return cost


def resolve_keep_base(keep_base: str, device: torch.device, base_bytes: int) -> bool:
    """auto: keep W_pre resident only on an accelerator where it takes at most a quarter of the free
    memory (a host->device copy per trial is then avoided); on the CPU the base checkpoint is read
    back through its memory map every trial, which costs about what reading a resident copy does."""
    if keep_base != "auto":
        return keep_base == "true"
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return base_bytes <= free // 4


def _trial_runner(job, model, store, s: dict, key: str, progress: bool):
    """(apply(point) -> TrialCost, description) for the configured path: out of core (default),
    or the in-core path (`search: {in_core: true}`, every factor resident, kept for comparison)."""
    import time

    default_eps = float(job.method.params["eps"])
    if s.get("in_core", False):
        batches, params = _collect(job, model, store, progress)

        def apply_in_core(point: dict) -> TrialCost:
            t0 = time.perf_counter()
            _apply(point, batches, params, key, default_eps)
            return TrialCost(resolve_s=time.perf_counter() - t0)

        return apply_in_core, {"in_core": True}
    opts = FactorOptions.from_search(s)
    cb = torch.empty((), dtype=job.cfg.compute_dtype).element_size()
    base_bytes = sum(math.prod(m.shape) for m in job.plan.modules if m.kind == "linear") * cb
    keep = resolve_keep_base(opts.keep_base, job.device, base_bytes)
    units, params, base = _write_factors(job, model, store, opts, keep, progress)
    trials = StreamedTrials(job, store, units, params, base, key, default_eps)
    return trials.apply, {"in_core": False, "keep_base": keep, "keep_base_option": opts.keep_base,
                          "factor_dtype": opts.dtype, "factor_energy": opts.energy, "trials": trials}


class _CostLog:
    """Per-evaluation time split, appended to <run>/search_costs.jsonl (a resumed search appends)."""

    def __init__(self, path: Path):
        self.path = path

    def add(self, point: dict, fidelity: str, cost: TrialCost) -> None:
        from dataclasses import asdict

        rec = {"point": hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16],
               "fidelity": fidelity, **asdict(cost)}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def summary(self) -> dict:
        recs = [json.loads(l) for l in self.path.read_text().splitlines()] if self.path.exists() else []
        keys = ("stream_s", "resolve_s", "assemble_s", "score_s")
        mean = {k: sum(r[k] for r in recs) / len(recs) for k in keys} if recs else {}
        return {"evaluations": len(recs), "mean": mean, "trials": recs}


def _ray_trials(job, model, store, s: dict, key: str, progress: bool, spec, costs: "_CostLog", full, proxy,
                tok_dir, origin: Path):
    """The statistics pass here (factors to the store, the model's other tensors filled), then Ray
    actors that evaluate trials on resident models of their own. Returns (RayTrials, layout)."""
    from bmmstream.search.ray_trials import RayTrials, save_resident

    opts = FactorOptions.from_search(s)
    cb = torch.empty((), dtype=job.cfg.compute_dtype).element_size()
    base_bytes = sum(math.prod(m.shape) for m in job.plan.modules if m.kind == "linear") * cb
    keep = resolve_keep_base(opts.keep_base, job.device, base_bytes)  # each actor keeps its own W_pre
    units, params, _ = _write_factors(job, model, store, opts, False, progress)
    save_resident(job.run.root, model, params, {m.name for u in units for m in u})
    del params
    ids = {"full": (full.id, full.data_hash), "proxy": (proxy.id, proxy.data_hash) if proxy is not None else None}
    remote = RayTrials(job, spec, units=units, key=key, keep_base=keep,
                       scorer_cfg=s["scorer"], scorer_dir=str(origin), tokenizer_dir=str(tok_dir) if tok_dir else None,
                       expected_ids=ids, on_cost=lambda p, f, c: costs.add(p, f, TrialCost(**c)))
    return remote, {"in_core": False, "keep_base": keep, "keep_base_option": opts.keep_base,
                    "factor_dtype": opts.dtype, "factor_energy": opts.energy, "executor": "ray",
                    "workers": remote.size}


def _in_flight(job, s: dict, remote) -> int:
    """Trials in flight: `search.num_workers`, else what this run's search started with (recorded in
    <run>/search_dispatch.json, so a resumed search, on Ray or not, continues the same search), else
    the Ray workers, else 1."""
    from bmmstream.output.writer import write_json_atomic

    rec = job.run.root / "search_dispatch.json"
    if "num_workers" in s:
        n = int(s["num_workers"])
    elif rec.is_file():
        n = int(json.loads(rec.read_text())["num_workers"])
    else:
        n = remote.size if remote is not None else 1
    if n > 1 and not rec.is_file():
        write_json_atomic(rec, {"num_workers": n})
    return n


def _local_submit(fns: dict):
    """The driver's Submit for trials in flight evaluated here, one at a time (a resumed Ray search,
    or `search.num_workers` > 1 without Ray): each future is done when returned."""
    import concurrent.futures
    import time

    def submit(fidelity: str, point: dict) -> concurrent.futures.Future:
        f: concurrent.futures.Future = concurrent.futures.Future()
        t0 = time.perf_counter()
        f.set_result((fns[fidelity](point), time.perf_counter() - t0))
        return f

    return submit


def plan_search(config, device: str = "auto") -> dict:
    """`bmm plan` for a config with a `search:` section: the merge's plan report plus, under
    "search", the out-of-core search's estimates (statistics store on disk with the factors, peak
    host and device memory, seconds per trial) and whether W_pre is kept (headers only)."""
    from bmmstream.config import load_config
    from bmmstream.pipeline import open_sources, plan_for, plan_report, resolve_device
    from bmmstream.plan.estimate import search_estimate

    cfg = load_config(config)
    rep = plan_report(cfg, device=device)
    if not cfg.search:
        return rep
    s = dict(cfg.search)
    opts = FactorOptions.from_search(s)
    dev = resolve_device(device)
    sources = open_sources(cfg, cache_dir=None)
    try:
        infos = sources.base.tensor_infos()
        plan = plan_for(cfg, sources.base)
    finally:
        sources.close()
    cb = torch.empty((), dtype=cfg.compute_dtype).element_size()
    fdt = FACTOR_DTYPES[opts.dtype]
    base_bytes = sum(math.prod(m.shape) for m in plan.modules if m.kind == "linear") * cb
    keep = resolve_keep_base(opts.keep_base, dev, base_bytes)
    sb = 8 if cfg.parameters.get("statistics_dtype", "float64") == "float64" else cb
    est = search_estimate(
        plan, infos, experts=len(cfg.models), compute_bytes=cb, statistics_bytes=sb,
        factor_bytes=torch.empty((), dtype=fdt).element_size() if fdt is not None else cb,
        keep_base=keep, device=dev, flops_per_s=rep["estimate"]["measured_flops_per_s"],
        hybrid=cfg.parameters.get("statistics") == "hybrid",
    )
    est.update(keep_base_option=opts.keep_base, factor_dtype=opts.dtype, factor_energy=opts.energy,
               in_core=bool(s.get("in_core", False)))
    rep["search"] = est
    return rep


def best_parameters(point: dict, base_params: dict, key: str) -> dict:
    """The BMM parameters that reproduce a search point in an ordinary merge."""
    p = {k: v for k, v in base_params.items() if k not in ("rho", "lam", "scale")}
    p[key] = [b[key] for b in point["blocks"]]
    p["scale"] = [b["scale"] for b in point["blocks"]]
    if "eps" in point:
        p["eps"] = point["eps"]
    return p


def _posterior_report(job, store, s: dict, key: str, best: dict, scorer, opts, progress: bool,
                      model=None, apply=None, report_scorer=None) -> dict:
    """Accuracy, ECE and NLL of the posterior-sampled ensemble and of the MAP model at the best point
    (search.posterior; beta chosen on `scorer`'s rows when a list), written to
    search-report/posterior.json. `report_scorer` (posterior.scorer, built beside search.scorer so
    that a bad file fails before the search) gives the rows reported on. The point is applied to the
    search's resident model as a trial would be (with Ray, where the driver holds none, one is built here)."""
    from bmmstream.search.posterior import module_posteriors, posterior_report

    point = _with_fixed_groups(best, job.method, key)
    posts = module_posteriors(job.plan, store, point, key, list(opts.modules) if opts.modules else None)
    layout = None
    if model is None:
        model = _resident_model(job)
        apply, layout = _trial_runner(job, model, store, {**s, "in_core": False}, key, progress)
    apply(point)
    report = posterior_report(model, posts, scorer.predict, opts,
                              report_scorer.predict if report_scorer is not None else None)
    out = job.run.root / "search-report" / "posterior.json"
    out.write_text(json.dumps(report, indent=2, sort_keys=True))
    logging.getLogger("bmmstream.search").info(
        "posterior (S=%d, beta=%g%s): accuracy %.4f, ECE %.4f, NLL %.4f; "
        "MAP accuracy %.4f, ECE %.4f, NLL %.4f%s -> %s",
        report["samples"], report["beta"], " chosen by validation NLL" if "beta_candidates" in report else "",
        report["accuracy"], report["ece"], report["nll"], report["map_accuracy"], report["map_ece"],
        report["map_nll"], f" on {report_scorer.id}" if report_scorer is not None else "", out)
    if report.get("beta_note"):
        logging.getLogger("bmmstream.search").warning("posterior: %s", report["beta_note"])
    del model, apply, layout
    return report


def search_merge(
    config,
    *,
    out: str | Path | None = None,
    run_dir: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    executor=None,
    workers: int | None = None,
    address: str | None = None,
    threads: int | str | None = None,
) -> dict:
    """Search BMM's block-tied hyperparameters, then write the best merged model.
    `threads`: as pipeline.prepare's (the statistics pass, the trials and the final merge).

    `executor="ray"` (or {"kind": "ray", "workers": N, "address": A}, bmmstream.executors): trials
    are evaluated by N Ray actors, each with a resident model, N trials in flight (`search.num_workers`
    overrides); the statistics pass, the optimiser, the score cache, the history and the final
    write stay in this process. Returns {"output", "best_params", "best_score", "evaluations",
    "report_dir"}."""
    from bmmstream.executors import executor_spec

    from bmmstream.statistics.data_assisted import _tokenizer_dir, calibrate
    from bmmstream.statistics.calibration_data import load_tokenizer
    from bmmstream.config import load_config
    from bmmstream.pipeline import build_method, default_run_dir, execute, prepare
    from bmmstream.search import SearchSpace, run_search
    from bmmstream.search.space import plan_groups
    from bmmstream.search.report import write_report
    from bmmstream.search.scorers import make_scorers
    from bmmstream.statistics.store import StatsStore

    origin = Path(config).resolve().parent if isinstance(config, (str, Path)) else Path.cwd()
    cfg = load_config(config)
    if cfg.merge_method != "bmm":
        raise BmmError(f"search: merge_method must be bmm, got {cfg.merge_method!r}")
    if not cfg.search:
        raise BmmError("search: the config has no 'search:' section")
    s = dict(cfg.search)
    known = {"optimizer", "budget", "seed", "rho_range", "lam_range", "scale_range", "eps_range", "scorer",
             "full_top_k", "num_workers", "keep_base", "factors", "in_core", "preset", "design", "posterior"}
    unknown = sorted(set(s) - known)
    if unknown:
        raise BmmError(f"search: unknown key(s) {unknown}; known: {sorted(known)}")
    if "scorer" not in s:
        raise BmmError("search: a scorer is needed, e.g. scorer: {callable: 'my_module:score'}")
    FactorOptions.from_search(s)  # refused before any work
    posterior = PosteriorOptions.from_config(s["posterior"]) if s.get("posterior") is not None else None
    spec = executor_spec(executor, workers, address)
    if spec.kind == "ray" and s.get("in_core", False):
        raise BmmError("search.in_core: true evaluates trials in this process; drop it to use --executor ray")
    if "num_workers" in s and (isinstance(s["num_workers"], bool) or not isinstance(s["num_workers"], int)
                               or s["num_workers"] < 1):
        raise BmmError(f"search.num_workers must be an integer >= 1, got {s['num_workers']!r}")
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg, str(config) if origin else None)
    job = prepare(cfg, out=out, run_dir=run_dir, device=device, threads=threads)
    try:
        # scorer data named relative to the first run's config stay the same files when the run is
        # resumed (`bmm resume R`, from any working directory)
        rec = job.run.root / "search_origin.json"
        if rec.is_file():
            origin = Path(json.loads(rec.read_text())["scorer_base_dir"])
        else:
            from bmmstream.output.writer import write_json_atomic

            write_json_atomic(rec, {"scorer_base_dir": str(origin.resolve())})
        # a rho reaching no module of this family is never searched (refused when none is left)
        block_groups, dropped = plan_groups(job.plan)
        space_record = {"family": job.plan.family, "groups": [list(g) for g in block_groups],
                        "dropped": [list(g) for g in dropped]}
        if any(dropped):
            import logging

            logging.getLogger("bmmstream.search").warning(
                "search: %s", "; ".join(f"block {b}: {', '.join(d)} not searched (no module of this "
                                        f"'{job.plan.family}' model in that group)" for b, d in enumerate(dropped) if d))
        store = StatsStore(job.run.stats)
        if job.needs_grams:
            calibrate(job, store, progress)
        hybrid = job.method.params["statistics"] == "hybrid"
        space = SearchSpace.from_config(s, num_blocks=job.plan.num_blocks, hybrid=hybrid, block_groups=block_groups)
        key = space.damping_key
        tok_dir = _tokenizer_dir(job.sources.base, job.run.root / "tokenizer")
        tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
        full, proxy = make_scorers(s["scorer"], tokenizer=tokenizer, base_dir=origin)
        post_scorer = (make_scorers(posterior.scorer, tokenizer=tokenizer, base_dir=origin)[0]
                       if posterior is not None and posterior.scorer else None)

        if not job.run.complete():
            import time

            model = _resident_model(job)
            costs = _CostLog(job.run.root / "search_costs.jsonl")
            remote = None  # Ray actors evaluating the trials (bmmstream/search/ray_trials.py)
            if spec.kind == "ray":
                remote, layout = _ray_trials(job, model, store, s, key, progress, spec, costs, full, proxy,
                                             tok_dir, origin)
                model = apply = None  # the actors hold the models
            else:
                apply, layout = _trial_runner(job, model, store, s, key, progress)

            def scored(scorer, fidelity: str):
                def fn(point: dict) -> float:
                    cost = apply(_with_fixed_groups(point, job.method, key))
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        score = scorer.scored(model)  # (score, per-row scores or None) for the noise guard
                    cost.score_s = time.perf_counter() - t0
                    costs.add(point, fidelity, cost)
                    return score

                return fn

            ctx = hashlib.sha256(json.dumps({k: v for k, v in job.run.load()["config"].items() if k != "search"},
                                            sort_keys=True).encode()).hexdigest()[:16]
            fns = {"full": scored(full, "full"), "proxy": scored(proxy, "proxy") if proxy is not None else None}
            try:
                in_flight = _in_flight(job, s, remote)
                result = run_search(
                    space, fns["full"], optimizer=s.get("optimizer", "staged"), budget=int(s.get("budget", 40)),
                    seed=int(s.get("seed", cfg.seed)), run_dir=job.run.root, proxy_evaluate=fns["proxy"],
                    full_top_k=int(s.get("full_top_k", 3)), num_workers=in_flight,
                    scorer_id=full.id, proxy_scorer_id=proxy.id if proxy is not None else "proxy",
                    data_hash=full.data_hash, context=ctx, write_report=False, design=s.get("design"),
                    submit=remote.submit if remote is not None else _local_submit(fns) if in_flight > 1 else None,
                )
                if remote is not None:
                    remote.check_reads(job.sources.all)
            finally:
                if remote is not None:
                    remote.close()
            write_report(result, job.run.root / "search-report")
            if posterior is not None:  # the paper's App. B at the chosen point, while G is in the store
                _posterior_report(job, store, s, key, result.best_params, full, posterior, progress, model, apply,
                                  report_scorer=post_scorer)
            (job.run.root / "search-report" / "space.json").write_text(json.dumps(space_record, indent=2))
            trials = layout.pop("trials", None)
            summary = {**layout, **costs.summary()}
            if trials is not None:
                summary["peak_factor_bytes"] = trials.peak_factor_bytes
            (job.run.root / "search-report" / "trial_costs.json").write_text(json.dumps(summary, indent=2))
            del model, apply, trials
            best = _with_fixed_groups(result.best_params, job.method, key)
            (job.run.root / "best_params.json").write_text(json.dumps(best, indent=2, sort_keys=True))
            job.method = build_method(cfg, job.plan, best_parameters(best, cfg.parameters, key))
            path = execute(job, progress=progress)
            return {"output": path, "best_params": best, "best_score": result.best_score,
                    "evaluations": result.evaluations, "report_dir": job.run.root / "search-report"}
        best = json.loads((job.run.root / "best_params.json").read_text())
        return {"output": job.out, "best_params": best, "best_score": None, "evaluations": 0,
                "report_dir": job.run.root / "search-report"}
    finally:
        job.sources.close()
