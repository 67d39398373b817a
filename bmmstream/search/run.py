"""`bmm search`: BMM's outer loop (Algorithm 1) on a resident model, then one streamed write.

1. Statistics: stream the checkpoints unit by unit as a merge does; per regressed module keep
   W_pre, the anchor U0 and the spectral factors of G (solve.spectral.prepare: eigh once, then a new
   lam costs one matmul). G and C also go to the run's Zarr store, so the final write reuses them.
   With hybrid statistics G and C are affine in eps (G = eps A + (1 - eps) B, likewise C), so the
   two ends are kept instead and each trial does a batched Cholesky solve.
2. A resident transformers model of the base architecture holds the non-regressed tensors at the
   anchor's values; each trial writes W_pre + s U(lam) into its regressed weights in place (no
   checkpoint per trial) and scores it.
3. The driver (search/driver.py) asks the optimiser, caches scores by parameters, keeps the
   history in the run directory (a killed search resumes with the same history), re-scores the
   best few at full fidelity; the best point is then written by the ordinary streaming merge.

Memory: the resident phase holds about 4 model copies (model, W_pre, C Q, U0 Q) plus d_in^2 per
module: meant for models that fit several times in device memory (the benchmarks' 22M-135M
models); the streaming merge itself has no such limit.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bmmstream.errors import BmmError
from bmmstream.solve.spectral import prepare as spectral_prepare
from bmmstream.methods.registry import get_method
from bmmstream.solve.closed_form import bmm_solve
from bmmstream.statistics.grams import combine, hybrid_grams


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


def _param_map(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the model's parameter/buffer, allowing for a base-model prefix."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    prefix = getattr(model, "base_model_prefix", "") or ""
    out, missing = {}, []
    for n in names:
        for cand in (n, n.removeprefix(prefix + "."), f"{prefix}.{n}"):
            if cand in own:
                out[n] = own[cand]
                break
        else:
            missing.append(n)
    if missing:
        raise BmmError(
            f"the {type(model).__name__} built from the base config has no parameter for "
            f"{len(missing)} checkpoint tensor(s), e.g. '{missing[0]}'"
        )
    return out


def _collect(job, model, store, progress: bool) -> tuple[list[_Batch], dict[str, torch.Tensor]]:
    from bmmstream.pipeline import _unit_inputs

    method = job.method
    hybrid = method.params["statistics"] == "hybrid"
    names = [n for unit in job.plan.units for n in unit]
    params = _param_map(model, names)
    per_shape: dict[tuple, list] = defaultdict(list)
    units = job.plan.units
    for i, unit in enumerate(tqdm(units, desc="search statistics", unit="unit", disable=not progress)):
        if i + 1 < len(units):
            for s in job.sources.all:
                s.prefetch(units[i + 1])
        inputs, passthrough = _unit_inputs(job, unit, store)
        anchor = method.anchor.merge_unit(inputs)
        with torch.no_grad():
            for n, t in passthrough.items():
                params[n].copy_(t)
            for inp in inputs:
                n = inp.spec.name
                if inp.spec.kind != "linear":
                    params[n].copy_(inp.base + anchor[n])
                    continue
                if hybrid and inp.grams is not None:
                    A, CA = combine(inp.deltas, hybrid_grams(inp.deltas, inp.grams, 1.0))
                    B, CB = combine(inp.deltas, hybrid_grams(inp.deltas, inp.grams, 0.0))
                    stats = ("ends", (A, B, CA, CB))
                else:
                    if store.has(n):
                        st = store.get(n, job.device)
                    else:
                        st = method.module_statistics(inp)
                        store.put(n, st, {"tasks": len(job.sources.experts)})
                    stats = ("gc", (st["G"], st["C"]))
                per_shape[tuple(inp.base.shape)].append((inp.spec, inp.base, anchor[n], stats))
        for s in job.sources.all:
            s.release(unit)
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
                b.spectral = spectral_prepare(G, C, U0)
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
    blocks = point["blocks"]
    with torch.no_grad():
        for b in batches:
            dt, dev = b.W_pre.dtype, b.W_pre.device
            try:
                hp = torch.tensor([blocks[min(k, len(blocks) - 1)][key][g] for k, g in zip(b.blocks, b.groups)],
                                  dtype=dt, device=dev)
            except KeyError as e:
                raise BmmError(f"search: no {key} for group {e} (modules outside attention/MLP, e.g. "
                               f"'{b.names[0]}'); give parameters.{key} for it") from None
            s = torch.tensor([blocks[min(k, len(blocks) - 1)]["scale"] for k in b.blocks], dtype=dt, device=dev)
            if b.spectral is not None:
                lam = b.spectral.lam(hp) if key == "rho" else hp
                U = b.spectral.solve(lam)
            else:
                A, B, CA, CB, U0 = b.ends
                eps = float(point.get("eps", default_eps))
                G, C = eps * A + (1 - eps) * B, eps * CA + (1 - eps) * CB
                lam = hp * (torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)) if key == "rho" else hp
                U, _ = bmm_solve(G, C, U0, lam)
            W = b.W_pre + s[:, None, None] * U
            for k, n in enumerate(b.names):
                params[n].copy_(W[k])


def best_parameters(point: dict, base_params: dict, key: str) -> dict:
    """The BMM parameters that reproduce a search point in an ordinary merge."""
    p = {k: v for k, v in base_params.items() if k not in ("rho", "lam", "scale")}
    p[key] = [b[key] for b in point["blocks"]]
    p["scale"] = [b["scale"] for b in point["blocks"]]
    if "eps" in point:
        p["eps"] = point["eps"]
    return p


def search_merge(
    config,
    *,
    out: str | Path | None = None,
    run_dir: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Search BMM's block-tied hyperparameters, then write the best merged model.

    Returns {"output", "best_params", "best_score", "evaluations", "report_dir"}."""
    from bmmstream.statistics.data_assisted import _tokenizer_dir, calibrate
    from bmmstream.statistics.calibration_data import load_tokenizer
    from bmmstream.config import load_config
    from bmmstream.pipeline import default_run_dir, execute, prepare
    from bmmstream.search import SearchSpace, run_search
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
             "full_top_k", "num_workers"}
    unknown = sorted(set(s) - known)
    if unknown:
        raise BmmError(f"search: unknown key(s) {unknown}; known: {sorted(known)}")
    if "scorer" not in s:
        raise BmmError("search: a scorer is needed, e.g. scorer: {callable: 'my_module:score'}")
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg, str(config) if origin else None)
    job = prepare(cfg, out=out, run_dir=run_dir, device=device)
    try:
        store = StatsStore(job.run.stats)
        if job.needs_grams:
            calibrate(job, store, progress)
        hybrid = job.method.params["statistics"] == "hybrid"
        space = SearchSpace.from_config(s, num_blocks=job.plan.num_blocks, hybrid=hybrid)
        key = space.damping_key
        tok_dir = _tokenizer_dir(job.sources.base, job.run.root / "tokenizer")
        tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
        full, proxy = make_scorers(s["scorer"], tokenizer=tokenizer, base_dir=origin)

        if not job.run.complete():
            model = _resident_model(job)
            batches, params = _collect(job, model, store, progress)
            default_eps = float(job.method.params["eps"])

            def scored(scorer):
                def fn(point: dict) -> float:
                    _apply(_with_fixed_groups(point, job.method, key), batches, params, key, default_eps)
                    with torch.no_grad():
                        return float(scorer(model))

                return fn

            ctx = hashlib.sha256(json.dumps({k: v for k, v in job.run.load()["config"].items() if k != "search"},
                                            sort_keys=True).encode()).hexdigest()[:16]
            result = run_search(
                space, scored(full), optimizer=s.get("optimizer", "NGOpt"), budget=int(s.get("budget", 40)),
                seed=int(s.get("seed", cfg.seed)), run_dir=job.run.root,
                proxy_evaluate=scored(proxy) if proxy is not None else None,
                full_top_k=int(s.get("full_top_k", 3)), num_workers=1,
                scorer_id=full.id, proxy_scorer_id=proxy.id if proxy is not None else "proxy",
                data_hash=full.data_hash, context=ctx, write_report=False,
            )
            write_report(result, job.run.root / "search-report")
            del model, batches, params
            best = _with_fixed_groups(result.best_params, job.method, key)
            (job.run.root / "best_params.json").write_text(json.dumps(best, indent=2, sort_keys=True))
            job.method = get_method("bmm", best_parameters(best, cfg.parameters, key), seed=cfg.seed)
            path = execute(job, progress=progress)
            return {"output": path, "best_params": best, "best_score": result.best_score,
                    "evaluations": result.evaluations, "report_dir": job.run.root / "search-report"}
        best = json.loads((job.run.root / "best_params.json").read_text())
        return {"output": job.out, "best_params": best, "best_score": None, "evaluations": 0,
                "report_dir": job.run.root / "search-report"}
    finally:
        job.sources.close()
