"""Posterior-sampled ensembles of a merged model (the paper's App. B) as a scorer option.

`search: {posterior: {samples: 10, beta: 1e4, modules: [...], seed: 0}}` scores the merged model as
the average softmax of S models whose chosen linears are drawn from BMM's posterior
N(U_MAP, beta^-1 (G + lam I)^-1) per row (bmmstream.solve.posterior), and reports the expected
calibration error (20 equal-width bins) and the negative log-likelihood beside the accuracy, for the
MAP model too. The default module is the last MLP output matrix. The sampled weights are written into
the resident model one sample at a time and the MAP weights are restored afterwards (also on error).

`beta: [1e2, 1e3, 1e4]` searches beta: each candidate's ensemble (same seed, so the same draws
scaled by 1/sqrt(beta)) is scored on the search's validation rows and the lowest NLL wins (a proper
scoring rule; ECE on a few hundred rows is too noisy to choose by), ties to the larger beta.
`scorer: {kind, data}` (built-in kinds) reports the chosen ensemble and the MAP model on other rows,
e.g. a test split, with the validation figures under "validation".
"""
from __future__ import annotations

import math

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from bmmstream.errors import BmmError
from bmmstream.plan.layout import Plan
from bmmstream.solve.posterior import accuracy, ece, ensemble_nll, ensemble_probs, sample_rows

ECE_BINS = 20
METRICS = ("accuracy", "ece", "nll", "map_accuracy", "map_ece", "map_nll")
SCORER_KINDS = ("encoder_accuracy", "label_likelihood")  # the kinds with per-task class predictions


@dataclass(frozen=True)
class PosteriorOptions:
    samples: int = 10
    beta: float | tuple[float, ...] = 1.0  # a tuple: candidates, the lowest validation NLL is chosen
    modules: tuple[str, ...] | None = None  # None: the last MLP output matrix
    seed: int = 0
    bins: int = ECE_BINS
    scorer: dict | None = None  # a search.scorer-like spec of the rows the report is on (None: validation)

    @classmethod
    def from_config(cls, cfg: dict) -> "PosteriorOptions":
        if not isinstance(cfg, dict):
            raise BmmError(f"search.posterior must be a mapping, got {cfg!r}")
        known = {"samples", "beta", "modules", "seed", "bins", "scorer"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise BmmError(f"search.posterior: unknown key(s) {unknown}; known: {sorted(known)}")
        if "beta" not in cfg:
            raise BmmError("search.posterior.beta is required (the posterior's precision scale, > 0)")
        kw: dict[str, Any] = {}
        for name in ("samples", "seed", "bins"):
            if name in cfg:
                v = cfg[name]
                if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1):
                    raise BmmError(f"search.posterior.{name} must be an integer >= {0 if name == 'seed' else 1}, "
                                   f"got {v!r}")
                kw[name] = v
        kw["beta"] = _betas(cfg["beta"])
        if cfg.get("modules") is not None:
            mods = cfg["modules"]
            if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
                raise BmmError(f"search.posterior.modules must be a non-empty list of tensor names, got {mods!r}")
            kw["modules"] = tuple(mods)
        if cfg.get("scorer") is not None:
            kw["scorer"] = _scorer_spec(cfg["scorer"])
        return cls(**kw)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _betas(beta: Any) -> float | tuple[float, ...]:
    """A number > 0 (inf: the MAP model), or a non-empty list of distinct ones (the candidates)."""
    if not isinstance(beta, (list, tuple)):
        if not _is_number(beta):
            raise BmmError(f"search.posterior.beta must be a number > 0 or a list of them, got {beta!r}")
        if not beta > 0:  # nan included
            raise BmmError(f"search.posterior.beta must be a number > 0, got {beta!r}")
        return float(beta)
    if not beta:
        raise BmmError("search.posterior.beta is an empty list; give numbers > 0, e.g. [1e2, 1e3, 1e4]")
    for i, b in enumerate(beta):
        if not _is_number(b) or not b > 0:
            raise BmmError(f"search.posterior.beta[{i}] must be a number > 0, got {b!r}")
    out = tuple(float(b) for b in beta)
    if len(set(out)) != len(out):
        raise BmmError(f"search.posterior.beta lists a value twice: {list(beta)!r}")
    return out


def _scorer_spec(spec: Any) -> dict:
    """The report's scorer: search.scorer's form, a built-in kind with class predictions, no proxy."""
    if not isinstance(spec, dict):
        raise BmmError(f"search.posterior.scorer must be a mapping like search.scorer, got {spec!r}")
    proxy = sorted(set(spec) & {"proxy", "proxy_size"})
    if proxy:
        raise BmmError(f"search.posterior.scorer: {proxy} not allowed (the report scores every row)")
    unknown = sorted(set(spec) - {"kind", "data", "batch_size"})
    if unknown:
        raise BmmError(f"search.posterior.scorer: unknown key(s) {unknown}; known: ['batch_size', 'data', 'kind']")
    if spec.get("kind") not in SCORER_KINDS:
        raise BmmError(f"search.posterior.scorer.kind must be one of {', '.join(SCORER_KINDS)}, "
                       f"got {spec.get('kind')!r}")
    if "data" not in spec:
        raise BmmError(f"search.posterior.scorer: kind '{spec['kind']}' needs 'data'")
    if not isinstance(spec["data"], dict) or not spec["data"]:
        raise BmmError(f"search.posterior.scorer.data must be a non-empty mapping task -> data, got {spec['data']!r}")
    return dict(spec)


def default_modules(plan: Plan) -> list[str]:
    """The last MLP output matrix of the plan (the paper's choice)."""
    outs = [m for m in plan.modules if m.kind == "linear" and m.group == "mlp_out"]
    if not outs:
        raise BmmError(f"search.posterior: this '{plan.family}' model has no MLP output matrix; "
                       "name the tensors in search.posterior.modules")
    return [max(outs, key=lambda m: (m.unit, m.layer if m.layer is not None else -1)).name]


@dataclass(frozen=True)
class ModulePosterior:
    """What a module's posterior needs: its merge Gram G (d_in x d_in), its absolute lam, and whether
    the tensor is stored (d_in, d_out)."""

    G: torch.Tensor
    lam: float
    transposed: bool = False


def _tasks(out: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """predict's answer as a list of per-task (logits, labels): one pair, or a list of them."""
    pairs = [out] if isinstance(out, tuple) else list(out)
    return [(lg.detach().to("cpu", torch.float64), lb.detach().to("cpu")) for lg, lb in pairs]


def posterior_evaluate(
    model: torch.nn.Module,
    posteriors: dict[str, ModulePosterior],
    predict: Callable[[torch.nn.Module], Any],
    opts: PosteriorOptions,
) -> dict:
    """Accuracy, ECE and NLL of the S-sample posterior ensemble at one beta, and of the MAP model.

    predict(model) -> (logits (N, C), labels (N,)) on the scoring rows, or a list of such pairs, one
    per task (a scorer's `predict`): each metric is then the mean over tasks, as the scorer's score is.
    `posteriors` maps tensor names of `model` to their ModulePosterior. The weights are the MAP on return."""
    if not _is_number(opts.beta):
        raise ValueError(f"posterior_evaluate: one beta expected, got {opts.beta!r} (posterior_report chooses)")
    params = dict(model.named_parameters())
    missing = sorted(set(posteriors) - set(params))
    if missing:
        raise BmmError(f"search.posterior.modules: no tensor {missing[0]!r} in the model")
    saved = {n: params[n].detach().clone() for n in posteriors}
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    samples: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    try:
        with torch.no_grad():
            for _ in range(opts.samples):  # one sample resident at a time: memory of one module copy
                for name, post in posteriors.items():
                    U = saved[name].mT if post.transposed else saved[name]
                    G = post.G.to("cpu", torch.float64)
                    draw = sample_rows(U.to("cpu", torch.float64), G, post.lam, opts.beta, 1, gen)[0]
                    draw = draw.mT if post.transposed else draw
                    params[name].copy_(draw.to(params[name].dtype))
                samples.append(_tasks(predict(model)))
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                params[name].copy_(w)
    with torch.no_grad():
        map_tasks = _tasks(predict(model))
    out: dict[str, list[float]] = {k: [] for k in METRICS}
    for k, (map_logits, labels) in enumerate(map_tasks):
        logits = torch.stack([s[k][0] for s in samples])
        probs, map_probs = ensemble_probs(logits), ensemble_probs(map_logits[None])
        out["accuracy"].append(accuracy(probs, labels))
        out["ece"].append(ece(probs, labels, opts.bins))
        out["nll"].append(ensemble_nll(logits, labels))
        out["map_accuracy"].append(accuracy(map_probs, labels))
        out["map_ece"].append(ece(map_probs, labels, opts.bins))
        out["map_nll"].append(ensemble_nll(map_logits[None], labels))
    return {"samples": opts.samples, "beta": opts.beta, "modules": sorted(posteriors), "tasks": len(map_tasks),
            **{k: float(sum(v) / len(v)) for k, v in out.items()}}


def posterior_report(
    model: torch.nn.Module,
    posteriors: dict[str, ModulePosterior],
    predict: Callable[[torch.nn.Module], Any],
    opts: PosteriorOptions,
    report_predict: Callable[[torch.nn.Module], Any] | None = None,
) -> dict:
    """search-report/posterior.json: posterior_evaluate at opts.beta on the validation rows (`predict`)
    when beta is one number and there is no report scorer. With candidates, each is evaluated on the
    validation rows with the same seed (common random numbers: the same draws, scaled) and the one of
    lowest NLL is chosen, ties to the larger beta; all are listed in "beta_candidates". With
    `report_predict` (posterior.scorer's rows) the chosen ensemble and the MAP model are reported on
    those rows (the same draws again), the validation figures under "validation"."""
    single = not isinstance(opts.beta, tuple)
    if single and report_predict is None:
        return posterior_evaluate(model, posteriors, predict, opts)
    betas = (opts.beta,) if single else opts.beta
    cands = [posterior_evaluate(model, posteriors, predict, replace(opts, beta=b)) for b in betas]
    chosen = min(cands, key=lambda c: (c["nll"], -c["beta"]))
    out = dict(chosen)
    if report_predict is not None:
        out = posterior_evaluate(model, posteriors, report_predict, replace(opts, beta=chosen["beta"]))
        out["validation"] = {k: chosen[k] for k in ("tasks", *METRICS)}
    if not single:
        out["beta_candidates"] = [{k: c[k] for k in ("beta", *METRICS)} for c in cands]
        note = beta_choice_note(chosen, betas)
        if note:
            out["beta_note"] = note
    return out


def beta_choice_note(chosen: dict, betas: tuple[float, ...]) -> str | None:
    """What a user should know about the chosen beta: at an edge of the candidates the grid does not
    bracket the best one; at the largest, with the MAP model's validation NLL below it, the criterion
    prefers the MAP model (beta -> inf). None inside the grid or for the MAP model itself."""
    beta = chosen["beta"]
    if len(betas) < 2 or not math.isfinite(beta):
        return None
    if beta == max(betas):
        if chosen["nll"] > chosen["map_nll"]:
            return (f"beta {beta:g}, the largest candidate, was chosen and the MAP model's validation NLL "
                    f"({chosen['map_nll']:.4f}) is below the ensemble's ({chosen['nll']:.4f}): by this criterion "
                    f"a larger beta, or the MAP model (beta: .inf), does better")
        return f"beta {beta:g}, the largest candidate, was chosen: larger ones may do better"
    if beta == min(betas):
        return f"beta {beta:g}, the smallest candidate, was chosen: smaller ones may do better"
    return None


def module_posteriors(plan: Plan, store: Any, point: dict, key: str, names: list[str] | None = None
                      ) -> dict[str, ModulePosterior]:
    """The posteriors of the named modules (default: `default_modules`) at a search point: G from
    the run's statistics store (the merge's G, stored under the tensor's name), lam the point's
    absolute lam, or rho * trace(G) / d_in when the point holds relative rho (`key` "rho")."""
    from bmmstream.solve.closed_form import lam_from_rho

    specs = plan.by_name()
    out = {}
    for name in names or default_modules(plan):
        spec = specs.get(name)
        if spec is None or spec.kind != "linear":
            raise BmmError(f"search.posterior.modules: {name!r} is not a regressed linear of this model")
        if not store.has(name):
            raise BmmError(f"search.posterior: no statistics (G) stored for {name!r} in {store.path}")
        G = store.get(name)["G"].to(torch.float64)
        damp = point["blocks"][spec.block][key].get(spec.group)
        if damp is None:
            raise BmmError(f"search.posterior: the point has no {key} for group {spec.group!r} of {name!r}")
        lam = float(damp) if key == "lam" else float(lam_from_rho(G, float(damp)))
        out[name] = ModulePosterior(G, lam, spec.transposed)
    return out
