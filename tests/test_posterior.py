import math

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.search.posterior import (METRICS, ModulePosterior, PosteriorOptions, default_modules,
                                       beta_choice_note, posterior_evaluate, posterior_report)
from bmmstream.solve.posterior import ece, ensemble_nll, ensemble_probs, sample_rows


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


def test_ensemble_nll_equals_a_direct_float64_computation():
    # two models, three rows: softmax(log p) = p, so the averaged probabilities are known by hand
    p1 = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], dtype=torch.float64)
    p2 = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.5, 0.25, 0.25]], dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    expected = -(math.log((0.5 + 0.7) / 2) + math.log((0.3 + 0.3) / 2) + math.log((0.2 + 0.25) / 2)) / 3
    assert ensemble_nll(torch.stack([p1.log(), p2.log()]), labels) == pytest.approx(expected, abs=1e-14)
    logits = torch.randn(5, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    direct = -ensemble_probs(logits)[torch.arange(7), y].log().mean()
    assert ensemble_nll(logits, y) == pytest.approx(float(direct), abs=1e-13)
    assert ensemble_nll(logits.float(), y) == pytest.approx(ensemble_nll(logits.float().double(), y), abs=1e-15)
    # a confidently wrong row: softmax underflows to 0 (log 0 = inf); in log space the loss is 1000
    assert ensemble_nll(torch.tensor([[[0.0, -1000.0]]], dtype=torch.float64), torch.tensor([1])) == 1000.0
    # a label-likelihood row with fewer choices: -inf logits are no probability
    ll = torch.tensor([[[math.log(0.25), math.log(0.75), -math.inf]]], dtype=torch.float64)
    assert ensemble_nll(ll, torch.tensor([1])) == pytest.approx(-math.log(0.75), abs=1e-15)


def test_evaluate_reports_nll_of_the_ensemble_and_the_map():
    model = Toy()
    post = {"down.weight": ModulePosterior(torch.eye(8, dtype=torch.float64), 0.1)}
    r = posterior_evaluate(model, post, _predict, PosteriorOptions(samples=3, beta=5.0, seed=2))
    assert set(r) == {"samples", "beta", "modules", "tasks", *METRICS}
    with torch.no_grad():
        map_logits = model(model.x).double()
    assert r["map_nll"] == pytest.approx(float(-torch.log_softmax(map_logits, -1)[torch.arange(50), model.y].mean()),
                                         abs=1e-12)
    # the ensemble's NLL from the same draws, made by hand
    gen = torch.Generator().manual_seed(2)
    W = model.down.weight.detach().clone()
    logits = []
    with torch.no_grad():
        for _ in range(3):
            model.down.weight.copy_(sample_rows(W.double(), torch.eye(8, dtype=torch.float64), 0.1, 5.0, 1, gen)[0])
            logits.append(model(model.x).double())
        model.down.weight.copy_(W)
    assert r["nll"] == pytest.approx(ensemble_nll(torch.stack(logits), model.y), abs=1e-12)
    inf = posterior_evaluate(model, post, _predict, PosteriorOptions(samples=2, beta=math.inf))
    assert inf["nll"] == pytest.approx(inf["map_nll"], abs=1e-12) and inf["map_nll"] == r["map_nll"]


def test_report_chooses_the_beta_of_lowest_validation_nll():
    model = Toy()
    post = {"down.weight": ModulePosterior(torch.eye(8, dtype=torch.float64), 0.1)}
    opts = PosteriorOptions(samples=4, beta=(0.05, 1.0, 30.0, math.inf), seed=1)
    rep = posterior_report(model, post, _predict, opts)
    cands = rep["beta_candidates"]
    assert [c["beta"] for c in cands] == [0.05, 1.0, 30.0, math.inf]
    best = min(cands, key=lambda c: c["nll"])
    assert rep["beta"] == best["beta"] and rep["nll"] == best["nll"]
    for c in cands:  # common random numbers: each candidate is posterior_evaluate at that beta, same seed
        one = posterior_evaluate(model, post, _predict, PosteriorOptions(samples=4, beta=c["beta"], seed=1))
        assert c == {k: one[k] for k in ("beta", *METRICS)}
    assert cands[-1]["accuracy"] == cands[-1]["map_accuracy"]
    assert cands[-1]["nll"] == pytest.approx(cands[-1]["map_nll"], abs=1e-12)
    assert len({c["nll"] for c in cands}) == 4  # the candidates differ, so the choice is a real one
    # ties go to the larger beta (closer to MAP): 1e299 and 1e300 both give the MAP weights exactly
    tie = posterior_report(model, post, _predict, PosteriorOptions(samples=2, beta=(1e300, 1e299)))
    assert tie["beta_candidates"][0]["nll"] == tie["beta_candidates"][1]["nll"] and tie["beta"] == 1e300
    # one number: today's report (no choice, no candidates)
    assert posterior_report(model, post, _predict, PosteriorOptions(samples=2, beta=3.0)) == \
        posterior_evaluate(model, post, _predict, PosteriorOptions(samples=2, beta=3.0))


def test_report_says_when_the_chosen_beta_is_at_an_edge_of_the_grid():
    """A grid that does not bracket the best beta is reported: at the largest candidate with the MAP
    model's NLL lower (the criterion prefers beta -> inf), at the smallest, and not inside or at inf."""
    model = Toy()
    post = {"down.weight": ModulePosterior(torch.eye(8, dtype=torch.float64), 0.1)}
    low = posterior_report(model, post, _predict, PosteriorOptions(samples=4, beta=(1e-4, 1e-3), seed=1))
    assert low["beta"] == 1e-3 and low["nll"] > low["map_nll"]  # noise of variance 1e3: far worse than MAP
    assert low["beta_note"] == beta_choice_note({"beta": 1e-3, "nll": low["nll"], "map_nll": low["map_nll"]},
                                                (1e-4, 1e-3))
    assert "the largest candidate" in low["beta_note"] and "MAP model (beta: .inf)" in low["beta_note"]
    with_map = posterior_report(model, post, _predict, PosteriorOptions(samples=4, beta=(1e-4, 1e-3, math.inf), seed=1))
    assert with_map["beta"] == math.inf and "beta_note" not in with_map
    assert beta_choice_note({"beta": 2.0, "nll": 0.5, "map_nll": 0.6}, (1.0, 2.0, 3.0)) is None
    assert beta_choice_note({"beta": 1.0, "nll": 0.5, "map_nll": 0.6}, (1.0, 2.0)) == \
        "beta 1, the smallest candidate, was chosen: smaller ones may do better"
    assert beta_choice_note({"beta": 2.0, "nll": 0.5, "map_nll": 0.6}, (1.0, 2.0)) == \
        "beta 2, the largest candidate, was chosen: larger ones may do better"
    assert beta_choice_note({"beta": 2.0, "nll": 0.5, "map_nll": 0.6}, (2.0,)) is None


def test_report_on_other_rows_keeps_validation_figures():
    model = Toy()
    post = {"down.weight": ModulePosterior(torch.eye(8, dtype=torch.float64), 0.1)}

    def rows(lo, hi):
        return lambda m: (m(m.x[lo:hi]), m.y[lo:hi])

    opts = PosteriorOptions(samples=3, beta=(0.1, 10.0), seed=4)
    rep = posterior_report(model, post, rows(0, 30), opts, rows(30, 50))
    val = posterior_report(model, post, rows(0, 30), opts)
    on_test = posterior_evaluate(model, post, rows(30, 50), PosteriorOptions(samples=3, beta=val["beta"], seed=4))
    assert rep["beta"] == val["beta"] and rep["beta_candidates"] == val["beta_candidates"]
    assert {k: rep[k] for k in METRICS} == {k: on_test[k] for k in METRICS}
    assert rep["validation"] == {k: val[k] for k in ("tasks", *METRICS)}
    one = posterior_report(model, post, rows(0, 30), PosteriorOptions(samples=3, beta=10.0, seed=4), rows(30, 50))
    assert "beta_candidates" not in one and one["beta"] == 10.0
    assert one["validation"]["nll"] == posterior_evaluate(model, post, rows(0, 30),
                                                          PosteriorOptions(samples=3, beta=10.0, seed=4))["nll"]


@pytest.mark.parametrize("cfg, message", [
    ({"beta": []}, "search.posterior.beta is an empty list; give numbers > 0, e.g. [1e2, 1e3, 1e4]"),
    ({"beta": [1e3, 0]}, "search.posterior.beta[1] must be a number > 0, got 0"),
    ({"beta": [1e3, math.nan]}, "search.posterior.beta[1] must be a number > 0, got nan"),
    ({"beta": [1e3, "1e4"]}, "search.posterior.beta[1] must be a number > 0, got '1e4'"),
    ({"beta": [True]}, "search.posterior.beta[0] must be a number > 0, got True"),
    ({"beta": [1e3, 1000]}, "search.posterior.beta lists a value twice: [1000.0, 1000]"),
    ({"beta": math.nan}, "search.posterior.beta must be a number > 0, got nan"),
    ({"beta": "1e4"}, "search.posterior.beta must be a number > 0 or a list of them, got '1e4'"),
    ({"beta": 1, "scorer": "test.jsonl"},
     "search.posterior.scorer must be a mapping like search.scorer, got 'test.jsonl'"),
    ({"beta": 1, "scorer": {"kind": "label_likelihood", "data": {"a": "t.jsonl"}, "proxy_size": 5}},
     "search.posterior.scorer: ['proxy_size'] not allowed (the report scores every row)"),
    ({"beta": 1, "scorer": {"kind": "label_likelihood", "data": {"a": "t.jsonl"}, "proxy": {}}},
     "search.posterior.scorer: ['proxy'] not allowed (the report scores every row)"),
    ({"beta": 1, "scorer": {"kind": "perplexity", "data": "t.jsonl"}},
     "search.posterior.scorer.kind must be one of encoder_accuracy, label_likelihood, got 'perplexity'"),
    ({"beta": 1, "scorer": {"callable": "m:f"}},
     "search.posterior.scorer: unknown key(s) ['callable']; known: ['batch_size', 'data', 'kind']"),
    ({"beta": 1, "scorer": {"kind": "label_likelihood"}},
     "search.posterior.scorer: kind 'label_likelihood' needs 'data'"),
    ({"beta": 1, "scorer": {"kind": "label_likelihood", "data": "t.jsonl"}},
     "search.posterior.scorer.data must be a non-empty mapping task -> data, got 't.jsonl'"),
])
def test_new_option_errors(cfg, message):
    with pytest.raises(BmmError) as e:
        PosteriorOptions.from_config(cfg)
    assert str(e.value) == message


def test_beta_list_and_scorer_options():
    spec = {"kind": "label_likelihood", "data": {"a": "test.jsonl"}}
    o = PosteriorOptions.from_config({"beta": [1e2, 1e3, math.inf], "scorer": spec, "samples": 4})
    assert o == PosteriorOptions(samples=4, beta=(100.0, 1000.0, math.inf), scorer=spec)
    assert PosteriorOptions.from_config({"beta": [7]}).beta == (7.0,)
    with pytest.raises(ValueError, match="one beta expected"):
        posterior_evaluate(Toy(), {}, _predict, o)
