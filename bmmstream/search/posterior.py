"""Posterior-sampled ensembles of a merged model (the paper's App. B) as a scorer option.

`search: {posterior: {samples: 10, beta: 1e4, modules: [...], seed: 0}}` scores the merged model as
the average softmax of S models whose chosen linears are drawn from BMM's posterior
N(U_MAP, beta^-1 (G + lam I)^-1) per row (bmmstream.solve.posterior), and reports the expected
calibration error (20 equal-width bins) beside the accuracy, for the MAP model too. The default
module is the last MLP output matrix. The sampled weights are written into the resident model one
sample at a time and the MAP weights are restored afterwards (also on error).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from bmmstream.errors import BmmError
from bmmstream.plan.layout import Plan
from bmmstream.solve.posterior import accuracy, ece, ensemble_probs, sample_rows

ECE_BINS = 20


@dataclass(frozen=True)
class PosteriorOptions:
    samples: int = 10
    beta: float = 1.0
    modules: tuple[str, ...] | None = None  # None: the last MLP output matrix
    seed: int = 0
    bins: int = ECE_BINS

    @classmethod
    def from_config(cls, cfg: dict) -> "PosteriorOptions":
        if not isinstance(cfg, dict):
            raise BmmError(f"search.posterior must be a mapping, got {cfg!r}")
        known = {"samples", "beta", "modules", "seed", "bins"}
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
        beta = cfg["beta"]
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0 or math.isnan(beta):
            raise BmmError(f"search.posterior.beta must be a number > 0, got {beta!r}")
        kw["beta"] = float(beta)
        if cfg.get("modules") is not None:
            mods = cfg["modules"]
            if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
                raise BmmError(f"search.posterior.modules must be a non-empty list of tensor names, got {mods!r}")
            kw["modules"] = tuple(mods)
        return cls(**kw)


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
    """Accuracy and ECE of the S-sample posterior ensemble and of the MAP model.

    predict(model) -> (logits (N, C), labels (N,)) on the scoring rows, or a list of such pairs, one
    per task (a scorer's `predict`): each metric is then the mean over tasks, as the scorer's score is.
    `posteriors` maps tensor names of `model` to their ModulePosterior. The weights are the MAP on return."""
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
    out: dict[str, list[float]] = {"accuracy": [], "ece": [], "map_accuracy": [], "map_ece": []}
    for k, (map_logits, labels) in enumerate(map_tasks):
        probs = ensemble_probs(torch.stack([s[k][0] for s in samples]))
        map_probs = ensemble_probs(map_logits[None])
        out["accuracy"].append(accuracy(probs, labels))
        out["ece"].append(ece(probs, labels, opts.bins))
        out["map_accuracy"].append(accuracy(map_probs, labels))
        out["map_ece"].append(ece(map_probs, labels, opts.bins))
    return {"samples": opts.samples, "beta": opts.beta, "modules": sorted(posteriors), "tasks": len(map_tasks),
            **{k: float(sum(v) / len(v)) for k, v in out.items()}}


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
