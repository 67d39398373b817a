"""linear, slerp, model_stock, breadcrumbs(_ties), della(_linear): each equals an independent float64
reference written here from mergekit's formulas (numpy, on full weights where mergekit uses them), on
random tensors of several shapes; per-model weights; each as BMM's anchor end to end; `bmm methods`."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import bmmstream
from bmmstream.errors import BmmError
from bmmstream.methods import get_method
from bmmstream.methods.dare import mask_key
from bmmstream.methods.registry import ModuleInput
from bmmstream.plan.layout import ModuleSpec

SHAPES = [(7, 5), (16,), (3, 4, 6), (1,), (2, 33)]
NAME = "model.layers.1.mlp.down_proj.weight"


def _inp(base: torch.Tensor, deltas: torch.Tensor, name: str = NAME, layer: int | None = 1) -> ModuleInput:
    kind = "linear" if base.dim() == 2 else "vector"
    return ModuleInput(ModuleSpec(name, tuple(base.shape), kind, "other", layer, 0, 1), base, deltas)


def _rand(shape, T=3, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    deltas = scale * torch.randn((T, *shape), generator=g, dtype=torch.float64)
    return base, deltas


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# ---- references (numpy, float64) ----------------------------------------------------------------
def linear_ref(weights: list[np.ndarray], w: list[float], normalize: bool) -> np.ndarray:
    res = sum(wi * Wi for wi, Wi in zip(w, weights))
    return res / sum(w) if normalize else res


def slerp_ref(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    a_n = a / na if na > 1e-8 else a
    b_n = b / nb if nb > 1e-8 else b
    dot = float(np.sum(a_n * b_n))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta_0 = np.arccos(dot)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / np.sin(theta_0)
    s1 = np.sin(theta_t) / np.sin(theta_0)
    return s0 * v0 + s1 * v1


def model_stock_ref(w0: np.ndarray, ws: list[np.ndarray], filter_wise: bool) -> np.ndarray:
    shape = w0.shape
    if filter_wise:
        w0 = w0.reshape(1, -1) if w0.ndim == 1 else w0.reshape(-1, shape[-1])
        ws = [w.reshape(w0.shape) for w in ws]
    else:
        w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            den = np.maximum(np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1), 1e-6)
            cos.append(np.clip(np.sum(offs[i] * offs[j], axis=-1) / den, -1, 1))
    c = np.mean(cos, axis=0)[:, None]
    n = len(ws)
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1.0, den))  # mergekit 0.1.5
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def breadcrumbs_sparsify_ref(d: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit 0.1.5 sparsify.magnitude_outliers (its formulation: [n_bot, n_bot + target))."""
    if density >= 1:
        return d
    n = d.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    idx = np.argsort(np.abs(d.reshape(-1)), kind="stable")
    mask = np.zeros(n)
    mask[idx[n_bot:n_bot + target]] = 1
    return d * mask.reshape(d.shape)


def della_sparsify_ref(d: np.ndarray, name: str, seed: int, task: int, density: float, eps: float,
                       rescale: str) -> np.ndarray:
    if density >= 1:
        return d
    rows = d.reshape(1, -1) if d.ndim < 2 else d.reshape(-1, d.shape[-1])
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable") + 1
    rank_norm = (ranks - 1) / (n - 1) if n > 1 else np.zeros(rows.shape)
    p = (density - eps) + 2 * eps * rank_norm
    u = np.random.Generator(np.random.Philox(key=mask_key(seed, name, task))).random(d.size, dtype=np.float32)
    keep = u.reshape(rows.shape) < p.astype(np.float32)
    masked = rows * keep
    if rescale == "probability":
        masked = masked / p
    elif rescale == "l1":
        before, after = np.abs(rows).sum(), np.abs(masked).sum()
        if before >= 1e-7 and after >= 1e-7:
            masked = masked * (before / after)
    return masked.reshape(d.shape)


def combine_ref(sparse: list[np.ndarray], w: list[float], ties: bool, normalize: bool, lam: float) -> np.ndarray:
    """mergekit generalized_task_arithmetic.merge_group after sparsification (get_mask 'sum')."""
    d = np.stack([wi * s for wi, s in zip(w, sparse)])
    wt = np.array(w).reshape((-1,) + (1,) * (d.ndim - 1))
    if ties:
        majority = np.where(d.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(d) == majority
        mixed = (d * mask).sum(0)
        divisor = (wt * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = d.sum(0)
        divisor = np.broadcast_to(wt.sum(0), mixed.shape).copy()
        divisor[np.abs(divisor) < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return lam * mixed


def _models(T: int, **per_model: list) -> list[tuple[str, dict]]:
    return [(f"m{i}", {k: v[i] for k, v in per_model.items()}) for i in range(T)]


# ---- linear -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_reference(shape, normalize):
    base, deltas = _rand(shape)
    w = [1.0, 2.5, -0.5]
    m = get_method("linear", {"normalize": normalize}, models=_models(3, weight=w))
    U = m.merge(_inp(base, deltas))
    ref = linear_ref([_np(base + d) for d in deltas], w, normalize)
    np.testing.assert_allclose(_np(base + U), ref, rtol=1e-12, atol=1e-12)


def test_linear_defaults_and_weights():
    base, deltas = _rand((6, 4))
    U = get_method("linear").merge(_inp(base, deltas))
    assert torch.allclose(U, deltas.mean(0), atol=1e-15)  # normalize default true, weight 1: the mean
    # weight 0 is the merge without that model
    U0 = get_method("linear", models=_models(3, weight=[1.0, 0.0, 3.0])).merge(_inp(base, deltas))
    U2 = get_method("linear", models=_models(2, weight=[1.0, 3.0])).merge(_inp(base, deltas[[0, 2]]))
    assert torch.allclose(U0, U2, atol=1e-15)
    with pytest.raises(BmmError, match=r"^merge method 'linear': the per-model weights sum to 0; cannot normalize by it \(set normalize: false\)$"):
        get_method("linear", models=_models(2, weight=[1.0, -1.0]))


# ---- slerp --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.4])
def test_slerp_equals_reference(shape, t):
    base, deltas = _rand(shape, T=2, scale=1.0)  # far apart: the spherical branch
    m = get_method("slerp", {"t": t})
    two = m.merge(_inp(base, deltas))  # v0 = models[0], v1 = models[1]
    np.testing.assert_allclose(_np(base + two), slerp_ref(t, _np(base + deltas[0]), _np(base + deltas[1])),
                               rtol=1e-10, atol=1e-12)
    one = m.merge(_inp(base, deltas[1:]))  # v0 = base, v1 = the expert
    np.testing.assert_allclose(_np(base + one), slerp_ref(t, _np(base), _np(base + deltas[1])), rtol=1e-10, atol=1e-12)


def test_slerp_endpoints_and_near_parallel_lerp():
    base, deltas = _rand((9, 7), T=2, scale=1.0)
    assert torch.allclose(get_method("slerp", {"t": 0}).merge(_inp(base, deltas)), deltas[0], atol=1e-12)
    assert torch.allclose(get_method("slerp", {"t": 1}).merge(_inp(base, deltas)), deltas[1], atol=1e-12)
    assert torch.equal(get_method("slerp", {"t": 0}).merge(_inp(base, deltas[:1])), torch.zeros_like(base))
    # near-parallel (dot > 0.9995): lerp of the original tensors, whatever their norms
    d = torch.stack([torch.zeros_like(base), 0.5 * base + 1e-4 * deltas[1]])
    v0, v1 = _np(base), _np(base + d[1])
    n0 = v0.reshape(-1) / np.linalg.norm(v0)
    assert np.dot(n0, v1.reshape(-1) / np.linalg.norm(v1)) > 0.9995
    U = get_method("slerp", {"t": 0.3}).merge(_inp(base, d))
    np.testing.assert_allclose(_np(base + U), 0.7 * v0 + 0.3 * v1, rtol=1e-13, atol=1e-13)
    # a zero weight is not normalised (mergekit's 1e-8 rule): dot 0, the spherical branch
    z = torch.zeros(4, dtype=torch.float64)
    dz = torch.stack([torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)])
    np.testing.assert_allclose(_np(get_method("slerp", {"t": 0.25}).merge(_inp(z, dz))),
                               slerp_ref(0.25, _np(z), _np(dz[1])), atol=1e-15)


def test_slerp_layer_gradient_and_filters():
    base, deltas = _rand((5, 4), T=2, scale=1.0)
    grad = [0.0, 0.8, 0.2, 1.0]
    m = get_method("slerp", {"t": grad})
    m.num_layers = 6
    for layer in [None, 0, 1, 2, 3, 4, 5]:
        t_layer = 0.0 if layer is None else layer / 5
        t = float(np.interp(t_layer, np.linspace(0, 1, len(grad)), grad))
        U = m.merge(_inp(base, deltas, layer=layer))
        np.testing.assert_allclose(_np(base + U), slerp_ref(t, _np(base + deltas[0]), _np(base + deltas[1])),
                                   rtol=1e-10, atol=1e-12)
    filters = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.9}, {"value": 0.1}]
    m = get_method("slerp", {"t": filters})
    m.num_layers = 3
    for name, layer, t in [("model.layers.2.self_attn.q_proj.weight", 2, 1.0), ("model.layers.1.self_attn.o_proj.weight", 1, 0.5),
                           ("model.layers.0.mlp.up_proj.weight", 0, 0.9), ("model.norm.weight", None, 0.1)]:
        U = m.merge(_inp(base, deltas, name=name, layer=layer))
        np.testing.assert_allclose(_np(base + U), slerp_ref(t, _np(base + deltas[0]), _np(base + deltas[1])),
                                   rtol=1e-10, atol=1e-12)


def test_slerp_refusals():
    base, deltas = _rand((3, 3), T=3)
    with pytest.raises(BmmError, match=r"^merge method 'slerp' interpolates two models \(the base and one expert, or two experts\), got 3 experts$"):
        get_method("slerp").merge(_inp(base, deltas))
    with pytest.raises(BmmError, match=r"^merge method 'slerp': model.layers.1.mlp.down_proj.weight: t is a gradient over layers, but the number of layers was not given to the method$"):
        get_method("slerp", {"t": [0, 1]}).merge(_inp(base, deltas[:2]))
    with pytest.raises(BmmError, match=r"^merge method 'slerp': no entry of parameter 't' matches tensor 'model.layers.1.mlp.down_proj.weight' \(add an entry without filter as the default\)$"):
        get_method("slerp", {"t": [{"filter": "attn", "value": 0.2}]}).merge(_inp(base, deltas[:2]))
    with pytest.raises(BmmError, match=r"^merge method 'slerp': parameter 't' must be a number, a non-empty list"):
        get_method("slerp", {"t": "half"})
    with pytest.raises(BmmError, match=r"^merge method 'slerp': parameter 't' value must be a number"):
        get_method("slerp", {"t": [{"filter": "x", "value": None}]})


# ---- model_stock --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("T", [2, 4])
def test_model_stock_equals_reference(shape, filter_wise, T):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    common = torch.randn(shape, generator=g, dtype=torch.float64)  # correlated experts: 0 < cos < 1
    deltas = torch.stack([common + torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(T)])
    U = get_method("model_stock", {"filter_wise": filter_wise}).merge(_inp(base, deltas))
    ref = model_stock_ref(_np(base), [_np(base + d) for d in deltas], filter_wise)
    np.testing.assert_allclose(_np(base + U), ref, rtol=1e-10, atol=1e-12)


def test_model_stock_limits():
    base, deltas = _rand((6, 5), T=3)
    same = deltas[:1].expand(3, 6, 5).clone()
    assert torch.allclose(get_method("model_stock").merge(_inp(base, same)), same[0], atol=1e-14)  # cos 1 -> t 1
    ortho = torch.zeros(2, 4, dtype=torch.float64)
    ortho[0, 0], ortho[1, 1] = 1.0, 2.0
    z = torch.zeros(4, dtype=torch.float64)
    assert torch.equal(get_method("model_stock").merge(_inp(z, ortho)), torch.zeros(4, dtype=torch.float64))  # cos 0
    opposite = torch.stack([ortho[0], -ortho[0]])  # cos -1 with N = 2: 1 + cos = 0, no estimate: the base
    assert torch.equal(get_method("model_stock").merge(_inp(z, opposite)), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(BmmError, match=r"^merge method 'model_stock' needs at least 2 experts, got 1$"):
        get_method("model_stock").merge(_inp(base, deltas[:1]))


# ---- breadcrumbs --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES + [(40, 50)])
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_equals_reference(shape, method, normalize):
    base, deltas = _rand(shape, T=3)
    dens, gam, w = [0.9, 0.5, 0.75], [0.01, 0.1, 0.0], [1.0, 0.5, 2.0]
    m = get_method(method, {"normalize": normalize, "lambda": 0.7}, models=_models(3, density=dens, gamma=gam, weight=w))
    U = m.merge(_inp(base, deltas))
    sparse = [breadcrumbs_sparsify_ref(_np(d), dens[i], gam[i]) for i, d in enumerate(deltas)]
    ref = combine_ref(sparse, w, method == "breadcrumbs_ties", normalize, 0.7)
    np.testing.assert_allclose(_np(U), ref, rtol=1e-12, atol=1e-14)


def test_breadcrumbs_masks():
    base, deltas = _rand((20, 25), T=1)
    d = deltas[0]
    order = d.abs().reshape(-1).argsort(descending=True)
    # gamma 0 keeps exactly the largest int(density n) entries (mergekit at a6e40288 zeroed the tensor)
    U = get_method("breadcrumbs", {"density": 0.3, "gamma": 0.0}).merge(_inp(base, deltas))
    kept = U.reshape(-1) != 0
    assert int(kept.sum()) == 150 and bool(kept[order[:150]].all())
    # gamma 0.02 drops the 10 largest, then keeps the next 150
    U = get_method("breadcrumbs", {"density": 0.3, "gamma": 0.02}).merge(_inp(base, deltas))
    kept = U.reshape(-1) != 0
    assert int(kept.sum()) == 150 and not bool(kept[order[:10]].any()) and bool(kept[order[10:160]].all())
    # density + gamma > 1: the outlier cut shrinks so that int(density n) stay
    U = get_method("breadcrumbs", {"density": 0.995, "gamma": 0.05}).merge(_inp(base, deltas))
    kept = U.reshape(-1) != 0
    assert int(kept.sum()) == 497 and not bool(kept[order[:3]].any())
    assert torch.equal(get_method("breadcrumbs", {"density": 1.0, "gamma": 0.5}).merge(_inp(base, deltas)), d)
    with pytest.raises(BmmError, match=r"^models\[1\] \(m1\): parameter 'gamma' must be a number in \[0, 1\], got 1.5$"):
        get_method("breadcrumbs", models=_models(2, gamma=[0.1, 1.5]))


# ---- della --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES + [(1, 1), (12, 40)])
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("rescale", ["probability", "l1", "none"])
def test_della_equals_reference(shape, method, rescale):
    base, deltas = _rand(shape, T=3)
    dens, eps, w = [0.5, 0.3, 0.8], [0.15, 0.1, 0.0], [1.0, -0.5, 2.0]
    m = get_method(method, {"rescale": rescale, "scale": 1.3}, seed=11, models=_models(3, density=dens, epsilon=eps, weight=w))
    U = m.merge(_inp(base, deltas))
    sparse = [della_sparsify_ref(_np(d), NAME, 11, i, dens[i], eps[i], rescale) for i, d in enumerate(deltas)]
    ref = combine_ref(sparse, w, method == "della", method == "della", 1.3)  # normalize: della true, linear false
    np.testing.assert_allclose(_np(U), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rescale", ["probability", "l1", "none"])
def test_della_magprune_in_row_chunks_equals_the_reference(rescale):
    """MagPrune runs a few rows at a time (its ranks, probabilities and masks were ~9 full copies of
    the tensor); any chunk gives the same bits, the float64 reference's values at every chunk."""
    from bmmstream.methods.della import magprune

    g = torch.Generator().manual_seed(3)
    for shape in [(37, 53), (5, 4, 33), (101,)]:
        d = torch.randn(shape, generator=g, dtype=torch.float64)
        whole = magprune(d, NAME, 11, 2, 0.4, 0.1, rescale, chunk=1 << 40)
        ref = della_sparsify_ref(_np(d), NAME, 11, 2, 0.4, 0.1, rescale)
        np.testing.assert_allclose(_np(whole), ref, rtol=1e-12, atol=1e-14)
        for chunk in (1, 53, 60, 1000):  # one entry, one row, a row and a bit, several rows
            assert torch.equal(magprune(d, NAME, 11, 2, 0.4, 0.1, rescale, chunk=chunk), whole), (shape, chunk)


def test_della_deterministic_keyed_and_magnitude_driven():
    base, deltas = _rand((30, 40), T=2)
    a = get_method("della", seed=4).merge(_inp(base, deltas))
    other = get_method("della", seed=4)
    other.merge(_inp(base, deltas, name="model.layers.0.x"))  # another tensor first: same draw after
    assert torch.equal(a, other.merge(_inp(base, deltas)))
    assert not torch.equal(a, get_method("della", seed=5).merge(_inp(base, deltas)))
    assert not torch.equal(a, get_method("della", seed=4).merge(_inp(base, deltas, name="model.layers.0.x")))
    # epsilon 0: the mask and rescale are DARE's at the same density
    dl = get_method("della_linear", {"density": 0.4, "epsilon": 0.0}, seed=4).merge(_inp(base, deltas))
    assert torch.equal(dl, get_method("dare_linear", {"density": 0.4}, seed=4).merge(_inp(base, deltas)))
    # keep rate rises with magnitude: ~ density - eps for the smallest, density + eps for the largest
    big = torch.randn((1, 4, 5000), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U = get_method("della", {"density": 0.5, "epsilon": 0.3, "rescale": "none"}).merge(
        _inp(torch.zeros(4, 5000, dtype=torch.float64), big))
    order = big[0].abs().argsort(dim=-1)
    kept = (U != 0).gather(-1, order).double()
    assert abs(float(kept[:, :500].mean()) - 0.23) < 0.03 and abs(float(kept[:, -500:].mean()) - 0.77) < 0.03


def test_della_refusals():
    with pytest.raises(BmmError, match=r"^merge method 'della': density 0.1 \+- epsilon 0.15 must lie inside \(0, 1\) \(got \[-0.05, 0.25\]\)$"):
        get_method("della", {"density": 0.1})
    with pytest.raises(BmmError, match=r"^models\[0\] \(m0\): density 0.9 \+- epsilon 0.15 must lie inside \(0, 1\)"):
        get_method("della_linear", models=_models(1, density=[0.9]))
    with pytest.raises(BmmError, match=r"^merge method 'della': rescale must be one of \['probability', 'l1', 'none'\] \(mergekit's rescale: true is 'l1'\), got True$"):
        get_method("della", {"rescale": True})
    base, deltas = _rand((4, 4), T=2)
    assert torch.equal(get_method("della_linear", {"density": 1.0}).merge(_inp(base, deltas)), deltas.sum(0))


# ---- end to end: alone, and as BMM's anchor ------------------------------------------------------
def _load(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k).double() for k in h.keys()})
    return out


def _layer(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


E2E = [
    ("linear", {}, 3, {"weight": [1.0, 2.0, 0.5]}),
    ("slerp", {"t": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.4}]}, 2, {}),
    ("model_stock", {"filter_wise": True}, 3, {}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, 3, {"weight": [1.0, 0.5, 1.5]}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05, "normalize": True}, 3, {}),
    ("della", {"density": 0.5, "epsilon": 0.2}, 3, {}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2, "scale": 0.5}, 3, {"weight": [1.0, 2.0, 0.5]}),
]


def _reference(method, params, base, experts, per_model, name, seed, num_layers):
    W0, Ws = _np(base[name]), [_np(e[name]) for e in experts]
    D = [W - W0 for W in Ws]
    w = per_model.get("weight", [1.0] * len(Ws))
    if method == "linear":
        return linear_ref(Ws, w, True)
    if method == "slerp":
        layer = _layer(name)
        t_layer = 0.0 if layer is None else layer / (num_layers - 1)
        t = float(np.interp(t_layer, [0, 1], [0.2, 0.9])) if "mlp" in name else 0.4
        return slerp_ref(t, Ws[0], Ws[1])
    if method == "model_stock":
        return model_stock_ref(W0, Ws, params["filter_wise"])
    if method.startswith("breadcrumbs"):
        sparse = [breadcrumbs_sparsify_ref(d, params["density"], params["gamma"]) for d in D]
        return W0 + combine_ref(sparse, w, method == "breadcrumbs_ties", params.get("normalize", False), 1.0)
    sparse = [della_sparsify_ref(d, name, seed, i, params["density"], params["epsilon"], "probability")
              for i, d in enumerate(D)]
    return W0 + combine_ref(sparse, w, method == "della", method == "della", params.get("scale", 1.0))


@pytest.mark.parametrize("method,params,T,per_model", E2E, ids=[m for m, *_ in E2E])
def test_end_to_end_alone_and_as_bmm_anchor(tmp_path, tiny_llama_suite, method, params, T, per_model):
    suite = tiny_llama_suite
    experts = suite.experts[:T]

    def models(anchored: bool) -> list[dict]:
        out = []
        for i, e in enumerate(experts):
            p = {k: v[i] for k, v in per_model.items()}
            out.append({"model": str(e), "parameters": {"anchor": p} if anchored and p else p})
        return out

    common = {"base_model": str(suite.base), "dtype": "float64", "out_dtype": "float64", "seed": 3}
    alone = bmmstream.merge({**common, "models": models(False), "merge_method": method, "parameters": params},
                            out=tmp_path / "alone", run_dir=tmp_path / "run_alone", progress=False)
    anchored = bmmstream.merge(
        {**common, "models": models(True), "merge_method": "bmm",
         "parameters": {"anchor": method, "anchor_parameters": params, "lam": 1e12}},
        out=tmp_path / "bmm", run_dir=tmp_path / "run_bmm", progress=False)
    a, b, base = _load(alone), _load(anchored), _load(suite.base)
    ex = [_load(e) for e in experts]
    num_layers = 1 + max(_layer(n) for n in base if _layer(n) is not None)
    assert set(a) == set(b) == set(base)
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-4  # the method really moved the model
    for k in a:
        ref = _reference(method, params, base, ex, per_model, k, 3, num_layers)
        np.testing.assert_allclose(_np(a[k]), ref, rtol=1e-9, atol=1e-12, err_msg=k)
        assert torch.allclose(a[k], b[k], atol=1e-8, rtol=1e-6), k  # lam -> inf: BMM gives its anchor


def test_bmm_methods_lists_them():
    res = subprocess.run([sys.executable, "-m", "bmmstream.cli", "methods"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert {"linear", "slerp", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"} <= names
