import json
import math

import numpy as np
import pytest

from bmmstream.errors import BmmError
from bmmstream.search import SearchSpace, run_search
from bmmstream.search.design import DesignOptions, bootstrap_noise, line_trials, stage1_shape
from bmmstream.search.space import params_key


def edge(p):
    """Optimum at the ranges' edges (rho = 1 for three groups, scale = 1.3) and mlp_out in the interior:
    where NGOpt's walk from the middle did not go on the real suite."""
    b = p["blocks"][0]
    r = b["rho"]
    return (-sum(math.log10(v) ** 2 for g, v in r.items() if g != "mlp_out")
            - (math.log10(r["mlp_out"]) + 2) ** 2 - 20 * (b["scale"] - 1.3) ** 2)


def plateau(p):
    """Equal scores everywhere except at the top edge of every range (a plateau with a cliff)."""
    top = all(v == 1.0 for b in p["blocks"] for v in b["rho"].values()) and all(b["scale"] == 1.3 for b in p["blocks"])
    return 1.0 if top else 0.5


def _search(p):
    return [t for t in p.trials if t.phase == "search"]


def test_stage1_is_the_shared_lattice_edges_included_and_holds_the_grid(tmp_path):
    sp = SearchSpace(1, rho_range=(1e-4, 1.0))
    assert stage1_shape(sp, 40, DesignOptions()) == (9, 2)
    assert stage1_shape(sp, 80, DesignOptions()) == (9, 3)
    assert stage1_shape(sp, 3, DesignOptions()) == (1, 1)
    assert [stage1_shape(sp, b, DesignOptions()) for b in (12, 20, 36)] == [(3, 2), (5, 2), (9, 2)]
    assert sp.lattice(9, 1) == sp.grid(9)
    assert stage1_shape(sp, 5, DesignOptions(stage1=(9, 3))) == (2, 2)  # never more than the budget
    assert stage1_shape(SearchSpace(1, scale_range=(1.1, 1.1)), 40, DesignOptions()) == (9, 1)
    r = run_search(sp, edge, budget=40, run_dir=tmp_path, write_report=False)  # staged is the default
    assert r.optimizer == "staged"
    first = [t.params for t in r.trials[:18]]
    assert first == sp.lattice(9, 2) and all(g in first for g in sp.grid(9))
    assert len(_search(r)) == 40 and r.evaluations <= 40


@pytest.mark.parametrize("fn", [edge, plateau])
@pytest.mark.parametrize("blocks", [1, 3])
def test_staged_is_never_below_the_grid_it_contains(tmp_path, fn, blocks):
    sp = SearchSpace(blocks, rho_range=(1e-4, 1.0))
    f = (lambda p: fn({"blocks": p["blocks"][:1]})) if blocks > 1 else fn
    grid = run_search(sp, f, optimizer="grid", budget=9, run_dir=tmp_path, write_report=False)
    staged = run_search(sp, f, optimizer="staged", budget=40, run_dir=tmp_path, write_report=False)
    ng = run_search(sp, f, optimizer="NGOpt", budget=40, run_dir=tmp_path, write_report=False)
    lattice_best = max(t.score for t in staged.trials[:18])
    assert staged.best_score >= lattice_best >= grid.best_score
    assert staged.best_score > grid.best_score  # the edges of the scale range are in its lattice
    if fn is plateau:  # the cliff sits at the corner: the lattice has it, NGOpt's walk from the middle not
        assert staged.best_score == 1.0 and ng.best_score < 1.0
    else:  # the refinement found what the shared lattice could not
        assert staged.best_score > lattice_best + 1.0


@pytest.mark.parametrize("fn", [edge, plateau])
def test_the_grid_line_stage1_holds_the_9_point_grid_at_budget_12(tmp_path, fn):
    """`stage1: [9, 1]` scores the grid's damping line (at the decoder suite's budget, where the
    default lattice is 3 x 2): it cannot end below the 9-point grid, and the refinement's first poll
    moves the scale that stage 1 fixed."""
    sp = SearchSpace(1, rho_range=(1e-4, 1.0))
    grid = run_search(sp, fn, optimizer="grid", budget=9, run_dir=tmp_path, write_report=False)
    staged = run_search(sp, fn, budget=12, design={"stage1": [9, 1]}, run_dir=tmp_path, write_report=False)
    assert [t.params for t in staged.trials[:9]] == sp.grid(9)
    assert [t.score for t in staged.trials[:9]] == [t.score for t in grid.trials]
    assert staged.best_score >= grid.best_score
    refined = [t.params["blocks"][0] for t in staged.trials[9:]]
    assert any(b["scale"] != 1.0 for b in refined)  # the scale is polled although stage 1 fixed it
    if fn is edge:  # the scale's step up pays on this objective: a real gain, not noise
        assert staged.best_score > grid.best_score


def peak(p):
    """Every group's best damping is 10^-3.5, between the budget-12 lattice's 1e-4 and 0.0316 (the dec3
    decoder suite's shape); a group moved alone by a lattice step loses, and scale 1.3 loses."""
    b = p["blocks"][0]
    return -sum((math.log10(v) + 3.5) ** 2 for v in b["rho"].values()) / 4 - 5 * (b["scale"] - 1.0)


def test_the_line_stage_bisects_the_shared_damping_towards_the_best(tmp_path):
    sp = SearchSpace(1, rho_range=(1e-4, 10.0), scale_range=(1.0, 1.3))
    r = run_search(sp, peak, budget=12, run_dir=tmp_path / "a", write_report=False)
    assert [t.params for t in r.trials[:6]] == sp.lattice(3, 2)
    # midpoints on the log axis at scale 1.0: toward 0.0316 (1e-4's only neighbour), then between the
    # line's best and its better neighbour
    line = [t.params for t in r.trials[6:9]]
    assert line == [sp.shared_point(10 ** (-4 + 5 * u), 1.0) for u in (0.25, 0.125, 0.0625)]
    assert r.best_params == line[1] and r.best_score == pytest.approx(-(0.125 ** 2), rel=1e-4)  # dampings rounded to 6 digits
    lattice_best = max(t.score for t in r.trials[:6])
    off = run_search(sp, peak, budget=12, run_dir=tmp_path / "b", design={"line": 0}, write_report=False)
    assert [t.params for t in off.trials[:6]] == sp.lattice(3, 2)
    assert off.best_score < r.best_score and lattice_best == pytest.approx(-0.25)
    # the line's points are shared, as the grid's: no guard (a 400-row plateau scores them the same)
    flat = run_search(sp, Rows(0), budget=12, run_dir=tmp_path / "c", write_report=False)
    assert flat.best_trial == 0


def test_line_trials_default_and_bounds():
    sp = SearchSpace(1, rho_range=(1e-4, 10.0), scale_range=(1.0, 1.3))
    assert [line_trials(sp, b, DesignOptions()) for b in (3, 12, 20, 40)] == [0, 3, 3, 3]
    assert line_trials(sp, 12, DesignOptions(line=5)) == 5 and line_trials(sp, 8, DesignOptions(line=5)) == 4  # 2 x 2 lattice, 4 left
    assert line_trials(SearchSpace(1, rho_range=(0.01, 0.01)), 12, DesignOptions()) == 0
    with pytest.raises(BmmError, match=r"^search.design.line must be an integer >= 0, got -1$"):
        DesignOptions.from_config({"line": -1})


class Rows:
    """A validation set of 400 rows: every shared point scores the same rows (a plateau); a point
    whose dampings differ gets `gain` more rows right. Returns (score, rows)."""

    def __init__(self, gain: int):
        rng = np.random.default_rng(0)
        self.base = (rng.random(400) < 0.6).astype(float)
        self.gain, self.calls = gain, 0

    def __call__(self, p):
        self.calls += 1
        rows = self.base.copy()
        if len({v for b in p["blocks"] for v in b["rho"].values()}) > 1:
            rows[np.flatnonzero(rows == 0)[: self.gain]] = 1.0
        return float(rows.mean()), rows.tolist()


def test_refinement_inside_the_noise_is_not_accepted(tmp_path):
    sp = SearchSpace(1, rho_range=(1e-4, 1.0))
    nd, ns = stage1_shape(sp, 30, DesignOptions())
    small = run_search(sp, Rows(2), budget=30, run_dir=tmp_path / "a", write_report=False)
    refined = [t for t in small.trials[nd * ns:] if len(set(t.params["blocks"][0]["rho"].values())) > 1]
    assert refined and all(t.score == pytest.approx(small.best_score + 2 / 400) for t in refined)
    # 2 more right rows of 400 is inside the bootstrap noise: the grid's winner (the first) stays
    assert small.best_params == sp.lattice(nd, ns)[0] and small.best_trial == 0
    assert all("rows" in t.extra and len(t.extra["rows"]) == 400 for t in small.trials)
    # 40 more right rows is far outside it: accepted
    big = run_search(sp, Rows(40), budget=30, run_dir=tmp_path / "b", write_report=False)
    assert big.best_score == pytest.approx(small.best_score + 40 / 400)
    assert len(set(big.best_params["blocks"][0]["rho"].values())) > 1


def test_without_rows_the_fixed_margin_guards(tmp_path):
    sp = SearchSpace(1, rho_range=(1e-4, 1.0))
    scalar = lambda p: Rows(2)(p)[0]  # noqa: E731
    guarded = run_search(sp, scalar, budget=30, run_dir=tmp_path / "a", design={"margin": 0.01}, write_report=False)
    assert guarded.best_trial == 0
    bare = run_search(sp, scalar, budget=30, run_dir=tmp_path / "b", design={"margin": 0.0}, write_report=False)
    nd, ns = stage1_shape(sp, 30, DesignOptions())
    assert bare.best_trial >= nd * ns and bare.best_score > guarded.best_score


def test_bootstrap_noise():
    a = [0.0, 1.0] * 100
    assert bootstrap_noise(a, a, z=2, margin=0.003, n_boot=100, seed=0) == 0.003  # identical rows: no noise
    assert bootstrap_noise(None, a, z=2, margin=0.01, n_boot=100, seed=0) == 0.01
    rng = np.random.default_rng(1)
    x, y = rng.random(2000), rng.random(2000)
    se = math.sqrt(np.var(y - x, ddof=1) / 2000)
    assert bootstrap_noise(x, y, z=2, margin=0, n_boot=2000, seed=0) == pytest.approx(2 * se, rel=0.1)
    se_unpaired = math.sqrt(np.var(x) / 2000 + np.var(y[:1000]) / 1000)
    assert bootstrap_noise(x, y[:1000], z=1, margin=0, n_boot=2000, seed=0) == pytest.approx(se_unpaired, rel=0.1)


def test_proxy_for_most_trials_full_for_the_best_eligible(tmp_path):
    sp = SearchSpace(1, rho_range=(1e-4, 1.0))
    proxy = Rows(2)
    full_calls = []

    def full(p):
        full_calls.append(p)
        return edge(p)

    r = run_search(sp, full, proxy_evaluate=proxy, budget=30, full_top_k=3, run_dir=tmp_path, write_report=False)
    final = [t for t in r.trials if t.phase == "final"]
    assert len(_search(r)) == 30 and len(final) == 3 == len(full_calls)
    # refinements inside the noise were not eligible: the full scorer saw shared points only
    assert all(len(set(p["blocks"][0]["rho"].values())) == 1 for p in full_calls)
    assert r.best_fidelity == "full" and r.best_score == max(t.score for t in final)


def test_staged_resumes_with_rows_from_the_cache(tmp_path):
    sp = SearchSpace(1, rho_range=(1e-4, 1.0))
    f = Rows(40)
    a = run_search(sp, f, budget=30, run_dir=tmp_path, write_report=False)
    calls = f.calls
    # same points asked again in another search (new seed: its own history): rows come from the cache
    b = run_search(sp, f, budget=30, seed=1, run_dir=tmp_path, write_report=False)
    assert f.calls == calls and b.evaluations == 0 and b.best_params == a.best_params
    assert [t.extra for t in b.trials] == [t.extra for t in a.trials]


def test_design_options_are_checked(tmp_path):
    sp = SearchSpace(1)
    with pytest.raises(BmmError, match=r"^search.design: unknown key\(s\) \['zz'\]; known: "):
        run_search(sp, edge, budget=3, run_dir=tmp_path, design={"zz": 1})
    with pytest.raises(BmmError, match=r"^search.design.stage1 must be \[n_damping, n_scale\], integers >= 1, "
                                       r"got \[0, 2\]$"):
        DesignOptions.from_config({"stage1": [0, 2]})
    with pytest.raises(BmmError, match=r"^search.design.margin must be a finite number >= 0, got -1$"):
        DesignOptions.from_config({"margin": -1})
    with pytest.raises(BmmError, match=r"^search.design: options of the staged design given, but the optimizer is "
                                       r"'grid'$"):
        run_search(sp, edge, optimizer="grid", budget=3, run_dir=tmp_path, design={"margin": 0.1})
    assert not (tmp_path / "search").exists()


def test_paper_bo_is_gp_expected_improvement_and_replays(tmp_path):
    from bmmstream.search.driver import _NevergradAsker

    sp = SearchSpace.from_config({"preset": "paper_llm"}, num_blocks=1)
    asker = _NevergradAsker(sp, "paper_bo", 6, 0, 1)
    assert type(asker.opt).__name__ == "_BO" and asker.opt.utility_kind == "ei"

    def f(p):
        return -sum((math.log10(v) - 1.0) ** 2 for v in p["blocks"][0]["lam"].values())

    a = run_search(sp, f, optimizer="paper_bo", budget=6, run_dir=tmp_path / "a", write_report=False)
    b = run_search(sp, f, optimizer="paper_bo", budget=6, run_dir=tmp_path / "b", write_report=False)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert all("lam" in t.params["blocks"][0] for t in a.trials) and a.best_score == max(t.score for t in a.trials)
    meta = json.loads((a.search_dir / "meta.json").read_text())
    assert meta["optimizer"] == "paper_bo" and "design" not in meta
    assert params_key(a.best_params) in {params_key(t.params) for t in a.trials}
