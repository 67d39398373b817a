import math

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.search.posterior import ModulePosterior, PosteriorOptions, default_modules, posterior_evaluate
from bmmstream.solve.posterior import ece, ensemble_probs, sample_rows


def _problem(d_out=3, d_in=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_in, 2 * d_in, dtype=torch.float64, generator=g)
    G = A @ A.T / (2 * d_in)
    U = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    return U, G


def test_sample_covariance_and_mean_match_the_posterior():
    U, G = _problem()
    lam, beta, S = 0.3, 2.5, 40000
    X = sample_rows(U, G, lam, beta, S, torch.Generator().manual_seed(1))
    assert X.shape == (S, 3, 4) and X.dtype == torch.float64
    target = torch.linalg.inv(G + lam * torch.eye(4, dtype=torch.float64)) / beta
    var = torch.diagonal(target)
    # mean: within 5 standard errors per entry
    assert ((X.mean(0) - U).abs() <= 5 * torch.sqrt(var / S)[None, :]).all()
    for i in range(3):  # every row: covariance within 5 standard errors of each entry (Wishart)
        D = X[:, i, :] - U[i]
        cov = D.T @ D / S
        se = torch.sqrt((var[:, None] * var[None, :] + target**2) / S)
        assert ((cov - target).abs() <= 5 * se).all()
    # rows are independent: the cross-covariance of rows 0 and 1 is zero within noise
    cross = (X[:, 0, :] - U[0]).T @ (X[:, 1, :] - U[1]) / S
    assert (cross.abs() <= 5 * torch.sqrt(var[:, None] * var[None, :] / S)).all()


def test_sampling_is_seeded_and_beta_scales_the_spread():
    U, G = _problem()
    a = sample_rows(U, G, 0.1, 1.0, 5, torch.Generator().manual_seed(7))
    b = sample_rows(U, G, 0.1, 1.0, 5, torch.Generator().manual_seed(7))
    c = sample_rows(U, G, 0.1, 4.0, 5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    torch.testing.assert_close(c - U, (a - U) / 2, rtol=1e-12, atol=1e-12)  # 1/sqrt(beta)
    assert torch.equal(sample_rows(U, G, 0.1, math.inf, 3), U.expand(3, 3, 4))


def test_ece_equals_a_hand_computed_value():
    probs = torch.tensor([[0.92, 0.08], [0.62, 0.38], [0.29, 0.71], [0.44, 0.56], [0.93, 0.07]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1, 1])
    # bins of width 0.05: {0.92 right, 0.93 wrong} share (0.90, 0.95]: acc 0.5, conf 0.925, weight 2/5;
    # 0.62 wrong, 0.71 right, 0.56 right alone in their bins
    expected = 2 / 5 * abs(0.5 - 0.925) + (0.62 + (1 - 0.71) + (1 - 0.56)) / 5
    assert ece(probs, labels, bins=20) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.44)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert ece(perfect, torch.tensor([0, 1])) == 0.0
    logits = torch.randn(4, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(ensemble_probs(logits), torch.softmax(logits, -1).mean(0))


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(4, 8)
        self.down = torch.nn.Linear(8, 3)
        self.x = torch.randn(50, 4)
        self.y = self(self.x).argmax(1).roll(1)  # labels the model gets partly wrong

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _predict(model):
    return model(model.x), model.y


def test_one_sample_at_infinite_beta_is_the_map_model():
    model = Toy()
    G = torch.eye(8, dtype=torch.float64)
    before = model.down.weight.detach().clone()
    map_probs = torch.softmax(model(model.x).double(), -1)
    r = posterior_evaluate(model, {"down.weight": ModulePosterior(G, 0.1)}, _predict,
                           PosteriorOptions(samples=1, beta=math.inf))
    assert r["accuracy"] == r["map_accuracy"] and r["ece"] == r["map_ece"]
    assert r["ece"] == ece(map_probs, model.y)
    # a finite beta perturbs the predictions; the MAP weights are back afterwards
    s = posterior_evaluate(model, {"down.weight": ModulePosterior(G, 0.1)}, _predict,
                           PosteriorOptions(samples=10, beta=1.0))
    assert s["ece"] != s["map_ece"] and s["map_ece"] == r["map_ece"] and s["samples"] == 10
    assert torch.equal(model.down.weight, before)
    # a stored (d_in, d_out) tensor is sampled in its (d_out, d_in) form
    t = posterior_evaluate(model, {"up.weight": ModulePosterior(torch.eye(8, dtype=torch.float64), 0.1, True)},
                           _predict, PosteriorOptions(samples=2, beta=1e3))
    assert 0 <= t["ece"] <= 1


def test_several_tasks_average_like_the_scorer():
    """predict giving one (logits, labels) pair per task: each metric is the mean of the per-task
    metrics, each task scored on the same posterior draws as if it were evaluated alone."""
    model = Toy()
    G = torch.eye(8, dtype=torch.float64)
    post = {"down.weight": ModulePosterior(G, 0.1)}
    opts = PosteriorOptions(samples=4, beta=10.0, seed=3)

    def task(lo, hi):
        return lambda m: (m(m.x[lo:hi]), m.y[lo:hi])

    both = posterior_evaluate(model, post, lambda m: [task(0, 20)(m), task(20, 50)(m)], opts)
    a = posterior_evaluate(model, post, task(0, 20), opts)
    b = posterior_evaluate(model, post, task(20, 50), opts)
    assert both["tasks"] == 2 and a["tasks"] == 1
    for k in ("accuracy", "ece", "map_accuracy", "map_ece"):
        assert both[k] == pytest.approx((a[k] + b[k]) / 2, abs=1e-12)


def test_options_and_default_module():
    from bmmstream.plan.layout import ModuleSpec, Plan

    assert PosteriorOptions.from_config({"beta": 100}) == PosteriorOptions(samples=10, beta=100.0)
    with pytest.raises(BmmError, match=r"^search.posterior.beta is required"):
        PosteriorOptions.from_config({"samples": 3})
    with pytest.raises(BmmError, match=r"^search.posterior.beta must be a number > 0, got 0$"):
        PosteriorOptions.from_config({"beta": 0})
    with pytest.raises(BmmError, match=r"^search.posterior.samples must be an integer >= 1, got 0$"):
        PosteriorOptions.from_config({"beta": 1, "samples": 0})
    with pytest.raises(BmmError, match=r"^search.posterior: unknown key\(s\) \['s'\]"):
        PosteriorOptions.from_config({"beta": 1, "s": 0})
    mods = [ModuleSpec(f"layers.{i}.{g}.weight", (4, 4), "linear", g, i, 0, i + 1)
            for i in range(3) for g in ("mlp_in", "mlp_out")]
    assert default_modules(Plan("toy", 3, 1, mods)) == ["layers.2.mlp_out.weight"]
    with pytest.raises(BmmError, match=r"^search.posterior: this 'toy' model has no MLP output matrix"):
        default_modules(Plan("toy", 3, 1, [m for m in mods if m.group == "mlp_in"]))
    with pytest.raises(BmmError, match=r"^search.posterior.modules: no tensor 'nope' in the model$"):
        posterior_evaluate(Toy(), {"nope": ModulePosterior(torch.eye(8), 0.1)}, _predict, PosteriorOptions(beta=1))


def test_module_posteriors_from_the_store():
    from bmmstream.plan.layout import ModuleSpec, Plan
    from bmmstream.search.posterior import module_posteriors

    class Store:
        path = "stats.zarr"

        def __init__(self, arrays):
            self.arrays = arrays

        def has(self, k):
            return k in self.arrays

        def get(self, k):
            return {"G": self.arrays[k]}

    mods = [ModuleSpec(f"layers.{i}.mlp_out.weight", (4, 4), "linear", "mlp_out", i, i, i + 1, transposed=i == 1)
            for i in range(2)]
    plan = Plan("toy", 2, 2, mods)
    G = torch.diag(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    store = Store({"layers.1.mlp_out.weight": G})
    point = {"blocks": [{"scale": 1.0, "rho": {"mlp_out": 0.5}}, {"scale": 1.0, "rho": {"mlp_out": 0.1}}]}
    (name, post), = module_posteriors(plan, store, point, "rho").items()
    assert name == "layers.1.mlp_out.weight" and post.transposed
    assert post.lam == pytest.approx(0.1 * 3.0)  # rho * trace(G) / d_in
    lam_point = {"blocks": [{"scale": 1.0, "lam": {"mlp_out": 7.0}}] * 2}
    assert module_posteriors(plan, store, lam_point, "lam")[name].lam == 7.0
    with pytest.raises(BmmError, match=r"^search.posterior: no statistics \(G\) stored for 'layers.0.mlp_out.weight' "
                                       r"in stats.zarr$"):
        module_posteriors(plan, store, point, "rho", ["layers.0.mlp_out.weight"])
