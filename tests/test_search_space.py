import json
import math

import numpy as np
import pytest

from bmmstream.errors import BmmError
from bmmstream.search.space import SEARCH_GROUPS, SearchSpace, canonical, params_key, round_sig


def test_round_sig_and_canonical_are_stable():
    assert round_sig(0.010000000000000004) == 0.01
    assert round_sig(1.23456789) == 1.23457
    assert round_sig(1.23456789e-5) == 1.23457e-5
    p = {"blocks": ({"scale": 1.0000001, "rho": {"attn_in": np.float64(0.1234567)}},), "eps": 0.3333333333}
    c = canonical(p)
    assert c == {"blocks": [{"scale": 1.0, "rho": {"attn_in": 0.123457}}], "eps": 0.333333}
    assert canonical(c) == c  # idempotent
    assert json.loads(json.dumps(c)) == c  # JSON round trip exact
    assert params_key(p) == params_key(json.loads(json.dumps(c)))


def test_parametrization_value_maps_to_plain_form():
    sp = SearchSpace(3, hybrid=True)
    param = sp.parametrization(seed=0)
    assert param.dimension == 3 * 5 + 1 == sp.dimension
    point = sp.to_params(param.value)
    assert len(point["blocks"]) == 3
    for b in point["blocks"]:
        assert set(b) == {"scale", "rho"}
        assert set(b["rho"]) == set(SEARCH_GROUPS)
        assert 1.0 <= b["scale"] <= 1.3
        assert b["rho"]["attn_in"] == pytest.approx(1e-2)  # nevergrad starts at the geometric middle
    assert point["eps"] == 0.5
    # a mutated sample stays inside the bounds
    child = param.spawn_child()
    child.mutate()
    q = sp.to_params(child.value)
    for b in q["blocks"]:
        assert 1.0 <= b["scale"] <= 1.3 and all(1e-4 <= v <= 1.0 for v in b["rho"].values())


def test_absolute_lam_uses_lam_key_and_fixed_ranges_are_constants():
    sp = SearchSpace(1, scale_range=(1.0, 1.0), rho_range=(0.5, 2.0), lam_mode="absolute")
    assert sp.dimension == 4
    point = sp.to_params(sp.parametrization(0).value)
    assert point["blocks"][0]["scale"] == 1.0
    assert set(point["blocks"][0]) == {"scale", "lam"}
    assert "eps" not in point


def test_grid_is_log_spaced_and_shared():
    sp = SearchSpace(2, rho_range=(1e-4, 1.0))
    pts = sp.grid(5)
    rhos = [p["blocks"][0]["rho"]["attn_in"] for p in pts]
    assert rhos == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    for p in pts:
        vals = {v for b in p["blocks"] for v in b["rho"].values()}
        assert len(vals) == 1
        assert all(b["scale"] == 1.0 for b in p["blocks"])
    assert sp.grid(1)[0]["blocks"][0]["rho"]["mlp_out"] == pytest.approx(1e-2)
    # the grid scale is 1.0 clipped into the scale range
    assert SearchSpace(1, scale_range=(1.1, 1.3)).grid(2)[0]["blocks"][0]["scale"] == 1.1


def test_random_points_seeded_and_in_range():
    sp = SearchSpace(2, hybrid=True)
    a = [sp.random_point(np.random.default_rng(7)) for _ in range(1)]
    b = [sp.random_point(np.random.default_rng(7)) for _ in range(1)]
    assert a == b
    rng = np.random.default_rng(0)
    logs = []
    for _ in range(400):
        p = sp.random_point(rng)
        assert 0 <= p["eps"] <= 1
        for blk in p["blocks"]:
            assert 1.0 <= blk["scale"] <= 1.3
            logs += [math.log10(v) for v in blk["rho"].values()]
    # log-uniform on [1e-4, 1]: mean of log10 is -2, each decade gets about a quarter
    assert abs(np.mean(logs) + 2) < 0.1
    counts = np.histogram(logs, bins=[-4, -3, -2, -1, 0])[0] / len(logs)
    assert np.all(np.abs(counts - 0.25) < 0.04)


def test_bmm_parameters_shape():
    sp = SearchSpace(2, hybrid=True)
    p = sp.random_point(np.random.default_rng(1))
    bp = sp.to_bmm_parameters(p)
    assert bp["blocks"] == 2 and bp["eps"] == p["eps"]
    assert bp["rho"][1] == p["blocks"][1]["rho"] and bp["scale"] == [b["scale"] for b in p["blocks"]]


def test_from_config_and_errors():
    sp = SearchSpace.from_config({"rho_range": [1e-3, 0.1], "scale_range": [1.0, 1.2]}, num_blocks=2)
    assert sp.rho_range == (1e-3, 0.1) and sp.scale_range == (1.0, 1.2) and sp.lam_mode == "relative"
    assert SearchSpace.from_config({"lam_range": [0.1, 10]}, num_blocks=1).lam_mode == "absolute"
    with pytest.raises(BmmError, match=r"^search: give rho_range \(relative lam\) or lam_range"):
        SearchSpace.from_config({"rho_range": [1e-3, 1], "lam_range": [1, 2]}, num_blocks=1)
    with pytest.raises(BmmError, match=r"^search.rho_range must be positive .* got \[0.0, 1.0\]$"):
        SearchSpace(1, rho_range=(0.0, 1.0))
    with pytest.raises(BmmError, match=r"^search.scale_range must satisfy low <= high \(finite\), got \[1.3, 1.0\]$"):
        SearchSpace(1, scale_range=(1.3, 1.0))
    with pytest.raises(BmmError, match=r"^search.rho_range must be a pair \[low, high\] of numbers, got 'abc'$"):
        SearchSpace(1, rho_range="abc")
    with pytest.raises(BmmError, match=r"^search.eps_range must lie within \[0.0, 1.0\]"):
        SearchSpace(1, hybrid=True, eps_range=(0.0, 2.0))
    with pytest.raises(BmmError, match=r"^search space: blocks must be an integer >= 1, got 0$"):
        SearchSpace(0)


def test_validate_point():
    sp = SearchSpace(1)
    good = sp.grid(1)[0]
    assert sp.validate(good) == good
    with pytest.raises(BmmError, match=r"^search point: 2 blocks given, the space has 1$"):
        sp.validate({"blocks": good["blocks"] * 2})
    bad = {"blocks": [{"scale": 1.0, "rho": {"attn_in": 0.1}}]}
    with pytest.raises(BmmError, match=r"lacks group\(s\) \['attn_out', 'mlp_in', 'mlp_out'\]"):
        sp.validate(bad)


def _plan(groups_per_block: list[set[str]], family: str = "toy"):
    from bmmstream.plan.layout import ModuleSpec, Plan

    mods = [ModuleSpec(f"layers.{b}.{g}.weight", (4, 4), "linear", g, b, b, b + 1)
            for b, gs in enumerate(groups_per_block) for g in sorted(gs)]
    mods.append(ModuleSpec("pooler.weight", (4, 4), "linear", "other", None, len(groups_per_block) - 1, 9))
    mods.append(ModuleSpec("layers.0.norm.weight", (4,), "vector", "other", 0, 0, 1))
    return Plan(family, len(groups_per_block), len(groups_per_block), mods)


def test_plan_groups_keeps_only_groups_with_modules_and_refuses_when_none():
    from bmmstream.search.space import plan_groups

    kept, dropped = plan_groups(_plan([{"attn_in", "attn_out", "mlp_in", "mlp_out"}, {"attn_in", "mlp_out"}]))
    assert kept == [("attn_in", "attn_out", "mlp_in", "mlp_out"), ("attn_in", "mlp_out")]
    assert dropped == [(), ("attn_out", "mlp_in")]
    with pytest.raises(BmmError, match=r"^search: no regressed module of this 'generic' model is in a searched group "
                                       r"\(attn_in, attn_out, mlp_in, mlp_out\), so no rho would reach the model; "):
        plan_groups(_plan([{"other"}, {"other"}], family="generic"))


def test_per_block_groups_shape_every_point():
    sp = SearchSpace(2, block_groups=[("attn_in", "mlp_out"), ("attn_in", "attn_out", "mlp_in", "mlp_out")])
    assert sp.groups_of(0) == ("attn_in", "mlp_out") and sp.groups_of(1) == SEARCH_GROUPS
    assert sp.dimension == (1 + 2) + (1 + 4)
    param = sp.parametrization(seed=0)
    assert param.dimension == sp.dimension
    points = [sp.to_params(param.value), sp.random_point(np.random.default_rng(0)), sp.grid(1)[0]]
    for p in points:
        assert [sorted(b["rho"]) for b in p["blocks"]] == [["attn_in", "mlp_out"], sorted(SEARCH_GROUPS)]
        assert sp.validate(p) == p
    assert sp.signature()["groups"] == [["attn_in", "mlp_out"], list(SEARCH_GROUPS)]
    # the same groups in every block fold into `groups`: the signature of the four-group space is unchanged
    same = SearchSpace(2, block_groups=[SEARCH_GROUPS, SEARCH_GROUPS])
    assert same.block_groups is None and same.signature() == SearchSpace(2).signature()
    two = SearchSpace(1, block_groups=[("attn_in", "attn_out")])
    assert two.dimension == 3 and set(two.grid(1)[0]["blocks"][0]["rho"]) == {"attn_in", "attn_out"}
    with pytest.raises(BmmError, match=r"^search space: 1 block group lists for 2 blocks$"):
        SearchSpace(2, block_groups=[SEARCH_GROUPS])
    with pytest.raises(BmmError, match=r"^search space: unknown group 'other'"):
        SearchSpace(1, block_groups=[("other",)])
    with pytest.raises(BmmError, match=r"^search space: no group to search a damping for$"):
        SearchSpace(1, block_groups=[()])
    bad = {"blocks": [{"scale": 1.0, "rho": {"attn_in": 0.1}}, points[0]["blocks"][1]]}
    with pytest.raises(BmmError, match=r"^search point: block 0 'rho' lacks group\(s\) \['mlp_out'\]$"):
        sp.validate(bad)


@pytest.mark.parametrize("blocks", [1, 3])
def test_paper_presets_give_exactly_the_papers_ranges(blocks):
    llm = SearchSpace.from_config({"preset": "paper_llm"}, num_blocks=blocks)
    assert (llm.lam_mode, llm.damping_key, llm.num_blocks) == ("absolute", "lam", blocks)
    assert llm.rho_range == (1e-3, 100.0) and llm.scale_range == (1.0, 1.3)
    vit = SearchSpace.from_config({"preset": "paper_vit"}, num_blocks=blocks)
    assert vit.lam_mode == "absolute" and vit.rho_range == (1e-4, 1.0) and vit.scale_range == (1.0, 1.3)
    # log-uniform lam: the parametrization is a Log over exactly the range
    p = llm.parametrization(seed=0)
    lam = p["blocks"][0]["damping"]["mlp_out"]
    assert type(lam).__name__ == "Log" and (lam.bounds[0].item(), lam.bounds[1].item()) == pytest.approx((1e-3, 100.0))
    assert llm.dimension == blocks * 5
    # a key beside the preset wins; rho_range would switch it to relative and is refused
    over = SearchSpace.from_config({"preset": "paper_llm", "scale_range": [1.0, 1.1]}, num_blocks=1)
    assert over.scale_range == (1.0, 1.1) and over.rho_range == (1e-3, 100.0)
    with pytest.raises(BmmError, match=r"^search.preset: unknown preset 'paper'; known: \['paper_llm', 'paper_vit'\]$"):
        SearchSpace.from_config({"preset": "paper"}, num_blocks=1)
    with pytest.raises(BmmError, match=r"^search.preset: paper_vit searches absolute lam; give lam_range to change it, "
                                       r"not rho_range$"):
        SearchSpace.from_config({"preset": "paper_vit", "rho_range": [1e-3, 1]}, num_blocks=1)


def test_lattice_covers_the_ranges_edges_included_and_holds_the_grid():
    sp = SearchSpace(2, rho_range=(1e-4, 1.0), scale_range=(1.0, 1.3))
    lat = sp.lattice(9, 3)
    assert len(lat) == 27 and all(p in lat for p in sp.grid(9))
    rhos = sorted({p["blocks"][1]["rho"]["mlp_in"] for p in lat})
    assert rhos[0] == 1e-4 and rhos[-1] == 1.0
    assert all(math.isclose(math.log10(b) - math.log10(a), 0.5, abs_tol=1e-5) for a, b in zip(rhos, rhos[1:]))
    assert sorted({p["blocks"][0]["scale"] for p in lat}) == [1.0, 1.15, 1.3]
    for p in lat:  # shared: one damping and one scale for every group and block
        assert len({v for b in p["blocks"] for v in b["rho"].values()}) == 1
        assert len({b["scale"] for b in p["blocks"]}) == 1
    assert sp.lattice(4, 1) == sp.grid(4)


def test_coordinates_and_moves():
    sp = SearchSpace(2, block_groups=[("attn_in",), ("attn_in", "mlp_out")], rho_range=(1e-4, 1.0))
    assert sp.coordinates() == [("scale", 0, None), ("damping", 0, "attn_in"), ("scale", 1, None),
                                ("damping", 1, "attn_in"), ("damping", 1, "mlp_out")]
    assert sp.tied_coordinates() == [("scale", None, None), ("damping", None, "attn_in"), ("damping", None, "mlp_out")]
    p = sp.shared_point(1e-2, 1.15)
    q = sp.moved(p, ("damping", 1, "mlp_out"), 0.25)  # a quarter of four decades: one decade up
    assert q["blocks"][1]["rho"]["mlp_out"] == pytest.approx(0.1) and q["blocks"][0] == p["blocks"][0]
    t = sp.moved(p, ("damping", None, "attn_in"), -1.0)  # clipped to the low edge, every block
    assert [b["rho"]["attn_in"] for b in t["blocks"]] == [1e-4, 1e-4]
    s = sp.moved(p, ("scale", None, None), 5.0)
    assert [b["scale"] for b in s["blocks"]] == [1.3, 1.3]
    assert sp.unit_value(p, ("scale", 0, None)) == pytest.approx(0.5)
    fixed = SearchSpace(1, scale_range=(1.0, 1.0))
    assert [c[0] for c in fixed.coordinates()] == ["damping"] * 4 and fixed.tied_coordinates() == []
