"""mergekit-style per-model `parameters` (weight, density), global aliases, and config refusals.

References are written here in float64 from mergekit's generalized_task_arithmetic formulas:
WD_t = w_t * sparsify(U_t, density_t); with sign consensus mask = sign(WD) == sign(sum WD)
(exact zeros of the sum: see each method), mixed = sum mask*WD, divisor = sum mask*w (0 -> 1);
without consensus mixed = sum WD, divisor = sum w (|.| < 1e-8 -> 1); normalize: mixed / divisor.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import bmmstream
from bmmstream.config import load_config
from bmmstream.errors import BmmError
from bmmstream.methods import get_method
from bmmstream.methods.dare import keep_mask
from bmmstream.methods.registry import ModuleInput, method_class
from bmmstream.plan.layout import ModuleSpec

M = [("./experts/a", {}), ("./experts/b", {}), ("./experts/c", {})]


def _inp(name: str, deltas: torch.Tensor, kind: str = "linear") -> ModuleInput:
    shape = tuple(deltas.shape[1:])
    return ModuleInput(ModuleSpec(name, shape, kind, "other", 0, 0, 1), torch.zeros(shape, dtype=deltas.dtype), deltas)


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _models(**per: dict) -> list[tuple[str, dict]]:
    """M with per-model parameters, e.g. _models(b={"weight": 0})."""
    return [(m, dict(per.get(m.rsplit("/", 1)[1], {}))) for m, _ in M]


# -- float64 references ---------------------------------------------------------------------

def ref_topk(u: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's magnitude sparsification of one task vector."""
    if density >= 1:
        return u.clone()
    flat = u.flatten()
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(u.shape)


def ref_consensus(wd: torch.Tensor, w: list[float], normalize: bool) -> torch.Tensor:
    """mergekit's TIES consensus and weighted disjoint mean, sign ties to +."""
    sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0).to(wd.dtype)
    mask = torch.sign(wd) == sign
    mixed = (wd * mask).sum(0)
    wt = torch.tensor(w, dtype=wd.dtype).reshape(-1, *[1] * (wd.dim() - 1))
    divisor = (wt * mask).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed / divisor if normalize else mixed


def ref_linear(wd: torch.Tensor, w: list[float], normalize: bool) -> torch.Tensor:
    mixed = wd.sum(0)
    divisor = sum(w)
    return mixed / (divisor if abs(divisor) >= 1e-8 else 1.0) if normalize else mixed


def _weighted(u: torch.Tensor, w: list[float]) -> torch.Tensor:
    return torch.stack([wi * ui for wi, ui in zip(w, u)])


# -- task arithmetic --------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_weights_match_reference(normalize):
    u = _rand(0, 3, 16, 12)
    w = [0.5, -0.25, 2.0]
    m = get_method("task_arithmetic", {"scale": 0.7, "normalize": normalize},
                   models=_models(a={"weight": 0.5}, b={"weight": -0.25}, c={"weight": 2.0}))
    ref = 0.7 * ref_linear(_weighted(u, w), w, normalize)
    assert torch.allclose(m.merge(_inp("w", u)), ref, rtol=0, atol=1e-12)


def test_task_arithmetic_weight_zero_is_the_merge_without_that_model():
    u = _rand(1, 3, 16, 12)
    zero = get_method("task_arithmetic", models=_models(b={"weight": 0}))
    without = get_method("task_arithmetic")
    got = zero.merge(_inp("w", u))
    assert torch.allclose(got, without.merge(_inp("w", u[[0, 2]])), rtol=0, atol=1e-12)
    assert torch.allclose(got, 0.3 * (u[0] + u[2]), rtol=0, atol=1e-12)
    # normalize divides by the weights' sum: weight 0 leaves the mean of the others
    norm = get_method("task_arithmetic", {"normalize": True, "lambda": 1.0}, models=_models(b={"weight": 0}))
    assert torch.allclose(norm.merge(_inp("w", u)), (u[0] + u[2]) / 2, rtol=0, atol=1e-12)


def test_no_per_model_parameters_keeps_the_old_result_bitwise():
    u = _rand(2, 3, 16, 12)
    assert torch.equal(get_method("task_arithmetic", models=M).merge(_inp("w", u)), 0.3 * u.sum(0))
    ones = _models(a={"weight": 1}, b={"weight": 1}, c={"weight": 1})
    assert torch.equal(get_method("task_arithmetic", models=ones).merge(_inp("w", u)), 0.3 * u.sum(0))
    assert torch.equal(get_method("ties", {"threshold": "per_tensor", "density": 0.4}, models=ones).merge(_inp("w", u)),
                       get_method("ties", {"threshold": "per_tensor", "density": 0.4}).merge(_inp("w", u)))


# -- TIES ------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
def test_ties_per_tensor_weights_and_densities_match_reference(normalize):
    u = _rand(3, 3, 16, 12)
    w, d = [1.5, 0.5, 1.0], [0.3, 0.6, 0.2]  # model c takes the global density
    models = _models(a={"weight": 1.5, "density": 0.3}, b={"weight": 0.5, "density": 0.6})
    m = get_method("ties", {"threshold": "per_tensor", "density": 0.2, "scale": 0.9, "normalize": normalize},
                   models=models)
    trimmed = torch.stack([ref_topk(u[t], d[t]) for t in range(3)])
    ref = 0.9 * ref_consensus(_weighted(trimmed, w), w, normalize)
    assert torch.allclose(m.merge(_inp("w", u)), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("threshold", ["per_tensor", "global"])
def test_ties_weight_zero_is_the_merge_without_that_model(threshold):
    a, b = _rand(4, 3, 16, 12), _rand(5, 3, 12)
    zero = get_method("ties", {"threshold": threshold, "density": 0.3}, models=_models(b={"weight": 0}))
    without = get_method("ties", {"threshold": threshold, "density": 0.3})
    if threshold == "global":
        for meth, keep in ((zero, [0, 1, 2]), (without, [0, 2])):
            meth.prepass_observe(_inp("a", a[keep]))
            meth.prepass_observe(_inp("b", b[keep], "vector"))
    for name, u in (("a", a), ("b", b)):
        got = zero.merge(_inp(name, u))
        assert torch.allclose(got, without.merge(_inp(name, u[[0, 2]])), rtol=0, atol=1e-12)


def test_ties_global_threshold_per_model_density():
    u = _rand(6, 2, 40, 25)
    m = get_method("ties", {"density": 0.5}, models=[("x", {"density": 0.1}), ("y", {})])
    m.prepass_observe(_inp("w", u))
    state = m.prepass_state()
    assert state["densities"] == [0.1, 0.5]
    kept = (m.trim(_inp("w", u)) != 0).sum((1, 2)).tolist()
    # the reference keeps |U_t| >= its k-th smallest, k = d - int(d * density): int(d * density) + 1 entries
    assert kept == [int(1000 * 0.1) + 1, int(1000 * 0.5) + 1]
    with pytest.raises(BmmError, match=r"^ties prepass state was computed for density \[0.1, 0.5\], config says 0.5$"):
        get_method("ties", {"density": 0.5}).load_prepass_state(state)


# -- DARE ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_weights_and_densities_match_reference(method):
    u = _rand(7, 3, 16, 12)
    w, d = [1.0, 0.4, 2.0], [0.5, 0.9, 0.3]
    models = _models(b={"weight": 0.4, "density": 0.9}, c={"weight": 2.0, "density": 0.3})
    m = get_method(method, {"density": 0.5, "scale": 0.8}, seed=11, models=models)
    sparse = torch.stack([
        torch.where(keep_mask(11, "w", t, (16, 12), d[t]), u[t], torch.zeros_like(u[t])) / d[t] for t in range(3)
    ])
    if method == "dare_ties":  # our default normalize for combine ties: the disjoint mean
        ref = ref_consensus(_weighted(sparse, w), w, True)
    else:
        ref = ref_linear(_weighted(sparse, w), w, False)
    assert torch.allclose(m.merge(_inp("w", u)), 0.8 * ref, rtol=0, atol=1e-12)
    # mergekit's dare_ties default: the agreeing entries summed, not divided
    m = get_method("dare_ties", {"density": 0.5, "normalize": False}, seed=11, models=models)
    if method == "dare_ties":
        assert torch.allclose(m.merge(_inp("w", u)), ref_consensus(_weighted(sparse, w), w, False), rtol=0, atol=1e-12)


# -- refusals --------------------------------------------------------------------------------

def test_unused_per_model_parameter_is_refused_in_one_line():
    with pytest.raises(BmmError) as e:
        get_method("task_arithmetic", models=_models(b={"density": 0.5}))
    assert str(e.value) == ("models[1] (./experts/b): parameter 'density' is not used by merge method "
                            "'task_arithmetic'; per-model parameters: ['weight']")
    with pytest.raises(BmmError) as e:
        get_method("tsv", models=_models(a={"weight": 2.0}))
    assert str(e.value) == ("models[0] (./experts/a): parameter 'weight' is not used by merge method 'tsv'; "
                            "per-model parameters: []")
    with pytest.raises(BmmError) as e:
        get_method("ties", models=_models(c={"epsilon": 0.1}))
    assert str(e.value) == ("models[2] (./experts/c): parameter 'epsilon' is not used by merge method 'ties'; "
                            "per-model parameters: ['density', 'weight']")
    with pytest.raises(BmmError) as e:
        get_method("ties", models=_models(c={"density": 2}))
    assert str(e.value) == "models[2] (./experts/c): parameter 'density' must be in (0, 1], got 2"


def test_bmm_refuses_weight_and_passes_density_and_anchor_weight_on():
    with pytest.raises(BmmError) as e:
        get_method("bmm", {"anchor": "task_arithmetic"}, models=_models(b={"weight": 0}))
    assert str(e.value) == (
        "models[1] (./experts/b): parameter 'weight' is not used by merge method 'bmm' (its statistics weigh "
        "every expert alike; to weigh this expert in the anchor 'task_arithmetic' only, write parameters: "
        "{anchor: {weight: ...}}); per-model parameters: ['anchor']")
    with pytest.raises(BmmError) as e:
        get_method("bmm", {"anchor": "tsv"}, models=_models(b={"anchor": {"weight": 0}}))
    assert str(e.value) == ("models[1] (./experts/b): parameter 'weight' is not used by merge method 'tsv'; "
                            "per-model parameters: []")
    with pytest.raises(BmmError) as e:
        get_method("bmm", {"anchor": "tsv"}, models=_models(b={"weight": 0}))
    assert str(e.value) == ("models[1] (./experts/b): parameter 'weight' is not used by merge method 'bmm' (its "
                            "statistics weigh every expert alike); per-model parameters: ['anchor']")
    with pytest.raises(BmmError) as e:
        get_method("bmm", {"anchor": "ties"}, models=_models(a={"density": 0.5, "anchor": {"density": 0.4}}))
    assert str(e.value) == ("models[0] (./experts/a): parameter 'density' is given both directly and under "
                            "'anchor'; give it once")
    u = _rand(8, 3, 16, 12)
    # density reaches a TIES anchor
    m = get_method("bmm", {"anchor": "ties", "anchor_parameters": {"threshold": "per_tensor"}},
                   models=_models(a={"density": 0.6}))
    alone = get_method("ties", {"threshold": "per_tensor"}, models=_models(a={"density": 0.6}))
    assert torch.equal(m.anchor.merge(_inp("w", u)), alone.merge(_inp("w", u)))
    # an explicit anchor weight reaches the anchor only
    m = get_method("bmm", {"anchor": "task_arithmetic"}, models=_models(b={"anchor": {"weight": 0}}))
    assert torch.allclose(m.anchor.merge(_inp("w", u)), 0.3 * (u[0] + u[2]), rtol=0, atol=1e-12)
    assert m.describe()["anchor"]["model_parameters"] == [{}, {"weight": 0}, {}]
    assert m.describe()["model_parameters"] == [{}, {"anchor": {"weight": 0}}, {}]


# -- one name for the final multiplier, and aliases --------------------------------------------

def test_scale_is_the_final_multiplier_and_aliases_are_accepted():
    u = _rand(9, 3, 16, 12)
    for name, alias in (("tsv", "alpha"), ("iso_c", "alpha"), ("iso_cts", "alpha"),
                        ("task_arithmetic", "lambda"), ("ties", "lambda"), ("dare", "lambda")):
        extra = {"threshold": "per_tensor"} if name == "ties" else {}
        a = get_method(name, {"scale": 0.6, **extra}).merge(_inp("w", u))
        b = get_method(name, {alias: 0.6, **extra}).merge(_inp("w", u))
        assert torch.equal(a, b), name
        assert get_method(name, {alias: 0.6}).describe()["parameters"]["scale"] == 0.6
        with pytest.raises(BmmError) as e:
            get_method(name, {"scale": 0.6, alias: 0.6})
        assert str(e.value) == (f"merge method '{name}': 'scale' and '{alias}' name the same parameter "
                                f"('scale'); give one of them")
    for name in ("tsv", "iso_c", "iso_cts", "task_arithmetic", "ties", "dare", "bmm"):
        assert "scale" in method_class(name).defaults and "alpha" not in method_class(name).defaults


def test_regmean_shrinkage_has_its_own_name():
    g = torch.Generator().manual_seed(3)
    deltas = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 12, 4, generator=g, dtype=torch.float64)
    inp = ModuleInput(ModuleSpec("w", (5, 4), "linear", "mlp_in", 0, 0, 1), torch.zeros(5, 4, dtype=torch.float64),
                      deltas, x.transpose(1, 2) @ x / 12)
    outs = [get_method("regmean", {k: 0.4}).merge(inp) for k in ("reduce_non_diagonal_ratio", "reduce_nondiag", "alpha")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], get_method("regmean").merge(inp))
    assert "scale" not in method_class("regmean").defaults
    with pytest.raises(BmmError) as e:
        get_method("regmean", {"alpha": 0.4, "reduce_non_diagonal_ratio": 0.4})
    assert str(e.value) == ("merge method 'regmean': 'reduce_non_diagonal_ratio' and 'alpha' name the same "
                            "parameter ('reduce_non_diagonal_ratio'); give one of them")
    with pytest.raises(BmmError) as e:
        get_method("regmean", {"reduce_nondiag": 2})
    assert str(e.value) == "merge method 'regmean': reduce_nondiag must be a number in [0, 1], got 2"


def test_method_listing_names_aliases_and_per_model_parameters():
    s = method_class("tsv").parameter_summary()
    assert s == "defaults={'scale': 1.0}  aliases=alpha->scale"
    s = method_class("ties").parameter_summary()
    assert "aliases=lambda->scale" in s and "per-model={'weight': 1.0, 'density': 'global value'}" in s


# -- config-level refusals -------------------------------------------------------------------

CFG = {"base_model": "./base", "models": [{"model": "./experts/a"}, {"model": "./experts/b"}]}


@pytest.mark.parametrize("extra,msg", [
    ({"shard_size": 0}, "config: shard_size: must be a positive size (examples: 5GB, 500MiB, 1000000), got 0"),
    ({"shard_size": -3}, "config: shard_size: must be a positive size (examples: 5GB, 500MiB, 1000000), got -3"),
    ({"shard_size": "0MB"}, "config: shard_size: must be a positive size (examples: 5GB, 500MiB, 1000000), got '0MB'"),
    ({"shard_size": "-5GB"}, "config: shard_size: not a size: '-5GB' (examples: 5GB, 500MiB, 1000000)"),
    ({"max_disk": 0}, "config: max_disk: must be a positive size (examples: 5GB, 500MiB, 1000000), got 0"),
    ({"max_disk": -1}, "config: max_disk: must be a positive size (examples: 5GB, 500MiB, 1000000), got -1"),
])
def test_config_refuses_non_positive_sizes(extra, msg):
    with pytest.raises(BmmError) as e:
        load_config({**CFG, **extra})
    assert str(e.value) == msg


@pytest.mark.parametrize("params,msg", [
    ({"weight": "heavy"}, "parameter 'weight' must be a finite number, got 'heavy'"),
    ({"weight": True}, "parameter 'weight' must be a finite number, got True"),
    ({"weight": float("inf")}, "parameter 'weight' must be a finite number, got inf"),
    ({"density": 0}, "parameter 'density' must be in (0, 1], got 0"),
    ({"density": 1.5}, "parameter 'density' must be in (0, 1], got 1.5"),
    ({"density": "half"}, "parameter 'density' must be a finite number, got 'half'"),
    ({"anchor": {"weight": "x"}}, "parameter 'weight' must be a finite number, got 'x'"),
])
def test_config_refuses_bad_per_model_values(params, msg):
    cfg = {**CFG, "models": [{"model": "./experts/a"}, {"model": "./experts/b", "parameters": params}]}
    with pytest.raises(BmmError) as e:
        load_config(cfg)
    assert str(e.value) == f"config: models.1: ./experts/b: {msg}"


# -- through the streaming pipeline ------------------------------------------------------------

def _load(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"scale": 0.5}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "threshold": "per_tensor"}),
])
def test_pipeline_weight_zero_equals_merge_without_that_expert(tmp_path, tiny_llama_suite, method, params):
    suite = tiny_llama_suite
    common = {"base_model": str(suite.base), "dtype": "float64", "out_dtype": "float64",
              "merge_method": method, "parameters": params}
    models = [{"model": str(e)} for e in suite.experts]
    models[1]["parameters"] = {"weight": 0}
    zero = bmmstream.merge({**common, "models": models}, out=tmp_path / "zero", run_dir=tmp_path / "r0",
                           progress=False)
    without = bmmstream.merge({**common, "models": [models[0], models[2]]}, out=tmp_path / "without",
                              run_dir=tmp_path / "r1", progress=False)
    a, b, base = _load(zero), _load(without), _load(suite.base)
    assert set(a) == set(b) == set(base)
    assert max(float((a[k] - base[k].double()).abs().max()) for k in a) > 1e-4
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-12), k
    card = (zero / "README.md").read_text()
    assert "weight" in card


def test_pipeline_refuses_unused_per_model_parameter(tmp_path, tiny_llama_suite):
    suite = tiny_llama_suite
    models = [{"model": str(e)} for e in suite.experts]
    models[2]["parameters"] = {"density": 0.5}
    with pytest.raises(BmmError) as e:
        bmmstream.merge({"base_model": str(suite.base), "models": models, "merge_method": "bmm"},
                        out=tmp_path / "out", run_dir=tmp_path / "run", progress=False)
    assert str(e.value) == (f"models[2] ({suite.experts[2]}): parameter 'density' is not used by merge method "
                            f"'bmm'; per-model parameters: ['anchor']")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,params,msg", [
    ("task_arithmetic", {"scale": "big"}, "merge method 'task_arithmetic': scale must be a finite number, got 'big'"),
    ("ties", {"lambda": float("nan")}, "merge method 'ties': lambda must be a finite number, got nan"),
    ("tsv", {"alpha": "1"}, "merge method 'tsv': alpha must be a finite number, got '1'"),
    ("iso_cts", {"scale": None}, "merge method 'iso_cts': scale must be a finite number, got None"),
    ("task_arithmetic", {"normalize": "yes"}, "merge method 'task_arithmetic': normalize must be true or false, got 'yes'"),
    ("dare_ties", {"normalize": 1}, "merge method 'dare_ties': normalize must be true or false, got 1"),
])
def test_global_values_of_the_wrong_type_are_refused(name, params, msg):
    with pytest.raises(BmmError) as e:
        get_method(name, params)
    assert str(e.value) == msg
