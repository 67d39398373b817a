"""Fused TIES kernels (bmmstream.methods.ties_kernels): the raw-tensor prepass and merge give the
general path's histograms, thresholds and output bytes exactly (bf16 / fp16 / fp32 sources, per-model
weights and densities, normalize false, exact-zero masses, transposed storage), and its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.methods import get_method
from bmmstream.methods import ties_kernels as fused
from bmmstream.methods.registry import ModuleInput, RawModule
from bmmstream.plan.layout import ModuleSpec

INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _spec(name: str, shape: tuple[int, ...], transposed: bool = False) -> ModuleSpec:
    return ModuleSpec(name, shape, "linear" if len(shape) == 2 else "vector", "other", 0, 0, 1, transposed)


def _raw(name, base, experts, transposed=False) -> RawModule:
    ids = ["base"] + [f"expert{t}" for t in range(len(experts))]
    return RawModule(_spec(name, tuple(base.shape), transposed), base, list(experts), ids)


def _general_input(raw: RawModule) -> ModuleInput:
    """What pipeline._unit_inputs builds: float32, transposed specs flipped, deltas = f32(e) - f32(b)."""
    flip = raw.spec.transposed
    base = raw.base.to(torch.float32)
    base = base.T.contiguous() if flip else base
    deltas = torch.empty((len(raw.experts), *base.shape), dtype=torch.float32)
    for t, e in enumerate(raw.experts):
        deltas[t].copy_(e.T if flip else e)
        deltas[t] -= base
    return ModuleInput(raw.spec, base, deltas)


def _general_weight(method, raw: RawModule, out_dtype: torch.dtype) -> torch.Tensor:
    inp = _general_input(raw)
    w = inp.base + method.merge(inp)
    return (w.T.contiguous() if raw.spec.transposed else w).to(out_dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype and a.shape == b.shape
    v = INT_VIEW[a.element_size()]
    return torch.equal(a.contiguous().view(v), b.contiguous().view(v))


def _suite(seed: int, t_count: int, dtype: torch.dtype, shapes) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per shape a base and t_count experts in `dtype`. Half of each tensor sits on a coarse grid
    (base in [1, 2), deltas small multiples of the bf16 ulp there) so masses cancel exactly; the
    other half is continuous with magnitudes over many octaves; some deltas are exactly 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        n = int(np.prod(shape)) if shape else 1
        base = torch.randn(n, generator=g) * 0.05
        grid = torch.arange(n) % 2 == 0
        base[grid] = 1.0 + torch.randint(0, 128, (int(grid.sum()),), generator=g).float() / 128
        experts = []
        for _ in range(t_count):
            cont = torch.randn(n, generator=g) * 10 ** torch.empty(n).uniform_(-6, -2, generator=g)
            k = torch.randint(-3, 4, (n,), generator=g).float() / 128
            delta = torch.where(grid, k, cont)
            delta[torch.rand(n, generator=g) < 0.1] = 0.0
            experts.append((base + delta).to(dtype).reshape(shape))
        out.append((base.to(dtype).reshape(shape), experts))
    return out


SHAPES = [(37, 53), (8192 * 2 + 3,), (5,), (), (64, 96)]


def _both_prepassed(params, models, suite, transposed_first=False):
    gen = get_method("ties", params, models=models)
    raw_m = get_method("ties", params, models=models)
    raws = []
    for i, (base, experts) in enumerate(suite):
        raw = _raw(f"t{i}", base, experts, transposed=transposed_first and i == 0 and base.dim() == 2)
        gen.prepass_observe(_general_input(raw))
        assert raw_m.prepass_observe_raw(raw)
        raws.append(raw)
    return gen, raw_m, raws


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t_count", [1, 2, 3, 4])
def test_raw_prepass_histograms_and_thresholds_equal_general(dtype, t_count):
    suite = _suite(t_count, t_count, dtype, SHAPES)
    gen, raw_m, _ = _both_prepassed({"density": 0.3}, None, suite)
    assert np.array_equal(gen._counts.sum(0), raw_m._counts.sum(0))
    assert gen.prepass_state() == raw_m.prepass_state()


def test_raw_prepass_parallel_segments_and_mixed_dtypes():
    # a tensor of >= 2^20 entries with one expert is cut into per-thread segments; fp32 base, bf16 and
    # fp16 experts
    g = torch.Generator().manual_seed(7)
    n = (1 << 20) + 5
    base = torch.randn(n, generator=g)
    experts = [(base + torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16)]
    gen, raw_m, _ = _both_prepassed({"density": 0.2}, None, [(base, experts)])
    assert np.array_equal(gen._counts.sum(0), raw_m._counts.sum(0))
    assert gen.thresholds() == raw_m.thresholds()
    half = [(base + torch.randn(n, generator=g) * 1e-3).to(torch.float16) for _ in range(2)]
    gen, raw_m, _ = _both_prepassed({"density": 0.2}, None, [(base, half)])
    assert gen.thresholds() == raw_m.thresholds()


CASES = [
    ({"density": 0.3}, None),
    ({"density": 0.5, "scale": 0.3}, None),
    ({"density": 0.4, "normalize": False, "scale": -1.7}, None),
    ({"density": 0.3}, [{"weight": 0.7}, {"weight": 1.3, "density": 0.6}, {"weight": -0.4}, {"weight": 0.0}]),
    ({"density": 0.6, "normalize": False}, [{"weight": 0.25}, {}, {"density": 0.1}, {"weight": 3.0}]),
    ({"density": 1.0}, None),
]


@pytest.mark.parametrize("case,t_count", [(c, t) for c in range(len(CASES)) for t in (2, 4)] + [(0, 1), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_raw_equals_general_path_bit_for_bit(case, t_count, dtype):
    params, models = CASES[case]
    models = None if models is None else [(f"m{t}", models[t]) for t in range(t_count)]
    suite = _suite(100 + case * 10 + t_count, t_count, dtype, SHAPES)
    gen, raw_m, raws = _both_prepassed(params, models, suite, transposed_first=True)
    assert gen.thresholds() == raw_m.thresholds()
    deferred_seen = False
    for raw in raws:
        for out_dtype in (dtype, torch.float32) if dtype != torch.float32 else (torch.float32, torch.bfloat16):
            got = raw_m.merge_raw(raw, out_dtype)
            assert got is not None and _same_bits(got, _general_weight(gen, raw, out_dtype)), (raw.spec.name, out_dtype)
        inp = _general_input(raw)
        mass = gen.trim(inp).sum(0)
        deferred_seen |= bool(((mass == 0) & (gen.trim(inp) != 0).any(0)).any())
    if t_count >= 2 and params["density"] >= 0.5:
        assert deferred_seen  # the grid half produces exact cancellations: the majority rule is exercised


def test_majority_negative_and_all_below_tau():
    # column 0 cancels exactly; the rest vote negative: the tensor majority (-1) decides column 0.
    base = torch.zeros(4, 3, dtype=torch.bfloat16)
    e0 = torch.tensor([[1.0, -2.0, -3.0]] * 4, dtype=torch.bfloat16)
    e1 = torch.tensor([[-1.0, -1.0, -1.0]] * 4, dtype=torch.bfloat16)
    small = torch.full((7,), 1e-6, dtype=torch.bfloat16)  # all below tau: merged to the base
    # density 0.5 of 19 entries per task: the 10th smallest |.| is 1.0, so the 1e-6 entries are trimmed
    gen, raw_m, raws = _both_prepassed({"density": 0.5}, None, [(base, [e0, e1]), (small * 0, [small, -small])])
    got = raw_m.merge_raw(raws[0], torch.float32)
    assert torch.equal(got, torch.tensor([[-1.0, -1.5, -2.0]] * 4))
    assert _same_bits(got, _general_weight(gen, raws[0], torch.float32))
    assert min(raw_m.thresholds()) > 1e-6
    got = raw_m.merge_raw(raws[1], torch.bfloat16)
    assert _same_bits(got, torch.zeros(7, dtype=torch.bfloat16))
    assert _same_bits(got, _general_weight(gen, raws[1], torch.bfloat16))


def test_majority_through_torch_sum_when_rounding_could_matter(monkeypatch):
    # above 2^24 entries the majority is taken from torch's own float32 sum of the signs (forced here)
    monkeypatch.setattr(fused, "majority_is_exact", lambda n, p, q: False)
    suite = _suite(5, 3, torch.bfloat16, [(64, 96), (301,)])
    gen, raw_m, raws = _both_prepassed({"density": 0.7}, None, suite, transposed_first=True)
    for raw in raws:
        assert _same_bits(raw_m.merge_raw(raw, torch.bfloat16), _general_weight(gen, raw, torch.bfloat16))


def test_fp16_sources_and_fp16_output():
    suite = _suite(9, 3, torch.float16, [(33, 17), (4,)])
    gen, raw_m, raws = _both_prepassed({"density": 0.4}, [("a", {"weight": 0.5}), ("b", {}), ("c", {})], suite)
    for raw in raws:
        for out_dtype in (torch.float16, torch.bfloat16, torch.float64):
            assert _same_bits(raw_m.merge_raw(raw, out_dtype), _general_weight(gen, raw, out_dtype))


def test_all_fp16_values_convert_exactly():
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    h = bits.view(torch.float16)
    h = h[torch.isfinite(h)]
    zero = torch.zeros_like(h)
    counts = np.zeros((1, 1, 1 << 20), dtype=np.int64)
    flags = np.zeros((1, 1), dtype=np.int64)
    fused.magnitude_histogram_kernel(zero.data_ptr(), fused.F16, np.array([h.data_ptr()]), np.array([fused.F16]),
                                     h.numel(), counts, flags)
    want = np.zeros(1 << 20, dtype=np.int64)
    np.add.at(want, ((h.float().view(torch.int32) & 0x7FFFFFFF) >> 11).numpy(), 1)
    assert np.array_equal(counts[0, 0], want) and flags[0, 0] == 0


def _grid_suite(seed: int, t_count: int, shapes):
    """bf16 tensors whose deltas are small multiples of the bf16 ulp in [1, 2): every sum over the
    experts is exact, in any order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        n = int(np.prod(shape))
        base = 1.0 + torch.randint(0, 128, (n,), generator=g).float() / 128
        experts = [(base + torch.randint(-3, 4, (n,), generator=g).float() / 128).bfloat16().reshape(shape)
                   for _ in range(t_count)]
        out.append((base.bfloat16().reshape(shape), experts))
    return out


@pytest.mark.parametrize("t_count", [5, 7])
def test_more_experts_fused_where_every_order_sums_exactly(t_count):
    # beyond 4 experts torch regroups its sum over them: the kernel serves entries whose sums are exact
    # in any order (bf16 grids without weights, or weights that are short binary fractions) ...
    for models in (None, [(f"m{t}", {"weight": [0.5, 1.0, 0.75, 2.0, 1.5, 0.25, 1.0][t]}) for t in range(t_count)]):
        gen, raw_m, raws = _both_prepassed({"density": 0.6}, models, _grid_suite(t_count, t_count, [(40, 30), (9,)]))
        for raw in raws:
            got = raw_m.merge_raw(raw, torch.bfloat16)
            assert got is not None and _same_bits(got, _general_weight(gen, raw, torch.bfloat16))
    # ... and leaves the tensor to the general path otherwise (fp32 values, weights like 0.3)
    suite = _suite(3, t_count, torch.float32, [(16, 16)])
    gen, raw_m, raws = _both_prepassed({"density": 0.6}, None, suite)
    assert raw_m.merge_raw(raws[0], torch.float32) is None
    w = [(f"m{t}", {"weight": 0.3}) for t in range(t_count)]
    gen, raw_m, raws = _both_prepassed({"density": 0.6}, w, _grid_suite(1, t_count, [(8, 8)]))
    assert raw_m.merge_raw(raws[0], torch.bfloat16) is None
    # mixed data: whatever the kernel returns equals the general path
    for dtype in (torch.bfloat16, torch.float32):
        gen, raw_m, raws = _both_prepassed({"density": 0.5}, None, _suite(11, t_count, dtype, SHAPES))
        for raw in raws:
            got = raw_m.merge_raw(raw, dtype)
            assert got is None or _same_bits(got, _general_weight(gen, raw, dtype))


def test_sums_exact_in_any_order():
    f = np.float32
    assert fused.sums_exact_in_any_order(np.array([1.0, -0.5, 0.25, 0.0, 3.0], dtype=f))
    assert fused.sums_exact_in_any_order(np.array([2.0**24, 1.0, -1.0], dtype=f)) is False  # 2^24 + 1 rounds
    assert fused.sums_exact_in_any_order(np.array([2.0**23, 2.0**22, 1.0], dtype=f))
    assert not fused.sums_exact_in_any_order(np.array([0.1, 0.2, 0.3], dtype=f))
    assert fused.sums_exact_in_any_order(np.array([1e-45, 3e-45], dtype=f))  # subnormals: multiples of 2^-149


def test_unsupported_cases_return_none():
    suite = _suite(3, 5, torch.bfloat16, [(8, 8)])
    gen, raw_m, raws = _both_prepassed({"density": 0.3}, None, suite)  # the prepass takes any T
    assert gen.thresholds() == raw_m.thresholds()
    pt = get_method("ties", {"threshold": "per_tensor"})
    assert not pt.prepass_observe_raw(raws[0])
    assert pt.merge_raw(raws[0], torch.bfloat16) is None
    ints = _raw("i", torch.zeros(4, dtype=torch.int64), [torch.zeros(4, dtype=torch.int64)])
    assert not get_method("ties").prepass_observe_raw(ints)


def test_overflow_leaves_the_tensor_to_the_general_path():
    big = torch.finfo(torch.bfloat16).max
    base = torch.tensor([big, 0.5], dtype=torch.bfloat16)
    experts = [torch.tensor([-big, 0.25], dtype=torch.bfloat16), torch.tensor([big, 0.75], dtype=torch.bfloat16)]
    m = get_method("ties", {"density": 1.0})
    raw = _raw("w", base, experts)
    assert m.prepass_observe_raw(raw)
    assert m.merge_raw(raw, torch.bfloat16) is None


@pytest.mark.parametrize("bad", ["base", "expert1", "both"])
def test_nan_inf_errors_name_the_source_like_the_general_path(bad):
    base = torch.zeros(3, 5, dtype=torch.bfloat16)
    experts = [torch.ones(3, 5, dtype=torch.bfloat16) for _ in range(3)]
    if bad in ("base", "both"):
        base[1, 2] = float("nan")
    if bad in ("expert1", "both"):
        experts[1][2, 4] = float("inf")
        experts[2][0, 0] = float("nan")
    who = "base" if bad != "expert1" else "expert1"
    msg = f"{who}: tensor 'w' contains NaN or Inf values"
    m = get_method("ties", {"density": 0.5})
    with pytest.raises(BmmError) as e:
        m.prepass_observe_raw(_raw("w", base, experts))
    assert str(e.value) == msg
    m.load_prepass_state({"thresholds": [0.5] * 3, "numel": 15, "densities": [0.5] * 3})
    with pytest.raises(BmmError) as e:
        m.merge_raw(_raw("w", base, experts), torch.bfloat16)
    assert str(e.value) == msg


@pytest.fixture(scope="module")
def bf16_suite(tmp_path_factory):
    from bmmstream.demo import make_llama_suite

    return make_llama_suite(tmp_path_factory.mktemp("bf16_ties"), num_experts=3, hidden=32, intermediate=64,
                            layers=2, vocab=96, dtype="bfloat16")


@pytest.mark.parametrize("weights", [False, True])
def test_end_to_end_merge_equals_general_path_bytes(bf16_suite, tmp_path, monkeypatch, weights):
    """A whole `bmm` merge through the pipeline's fused dispatch writes the general path's bytes."""
    from bmmstream.api import merge
    from bmmstream.methods.registry import MergeMethod
    from bmmstream.methods.ties import Ties

    models = [{"model": str(e)} for e in bf16_suite.experts]
    if weights:
        models[0]["parameters"] = {"weight": 0.6}
        models[2]["parameters"] = {"weight": 1.7, "density": 0.5}
    cfg = {"base_model": str(bf16_suite.base), "models": models, "merge_method": "ties",
           "parameters": {"density": 0.3, "scale": 0.9}}
    calls = {"merge_raw": 0, "prepass_observe_raw": 0}
    for hook in calls:
        original = getattr(Ties, hook)

        def counted(self, *a, _original=original, _hook=hook):
            r = _original(self, *a)
            calls[_hook] += r is not None and r is not False
            return r

        monkeypatch.setattr(Ties, hook, counted)
    fused_out = merge(cfg, out=tmp_path / "fused", run_dir=tmp_path / "run1", device="cpu", progress=False)
    assert calls["merge_raw"] > 0 and calls["prepass_observe_raw"] > 0
    for hook in calls:  # the pipeline asks only methods that override the hooks: the general path
        monkeypatch.setattr(Ties, hook, getattr(MergeMethod, hook))
    general_out = merge(cfg, out=tmp_path / "general", run_dir=tmp_path / "run2", device="cpu", progress=False)
    shards = sorted(p.name for p in general_out.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in fused_out.glob("*.safetensors"))
    for name in shards:
        assert (fused_out / name).read_bytes() == (general_out / name).read_bytes()


def _float32_tasks(seed: int, t_count: int, shape, grid: bool) -> torch.Tensor:
    """Sparse-looking float32 task vectors; `grid`: small multiples of 2^-7 (exact cancellations)."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) if shape else 1
    if grid:
        x = torch.randint(-3, 4, (t_count, n), generator=g).float() / 128
    else:
        x = torch.randn(t_count, n, generator=g) * 10 ** torch.empty(t_count, n).uniform_(-4, 0, generator=g)
    x[torch.rand(t_count, n, generator=g) < 0.5] = 0.0
    return x.reshape((t_count, *shape))


@pytest.mark.parametrize("t_count", [1, 2, 3, 4, 6])
def test_fused_elect_and_mean_equals_torch(t_count, monkeypatch):
    from bmmstream.methods import ties

    fast = ties.elect_and_mean
    used = []
    kernel = ties._fused_elect_and_mean

    def counted(*a):
        r = kernel(*a)
        used.append(r is not None)
        return r

    monkeypatch.setattr(ties, "_fused_elect_and_mean", counted)
    cases = []
    for k, shape in enumerate([(33, 65), (8192 + 7,), ()]):
        for grid in (True, False):
            cases.append(_float32_tasks(10 * t_count + k, t_count, shape, grid))
    weight_sets = [None, torch.tensor([0.5, 1.25, -0.75, 2.0, 0.0, 1.0][:t_count]),
                   torch.tensor([0.3, 1.7, 0.9, 1.1, 0.6, 1.4][:t_count])]
    results = []
    for x in cases:
        for w in weight_sets:
            for zero_sign in ("majority", "positive"):
                for normalize in (True, False):
                    results.append(((x, w, zero_sign, normalize), fast(x, zero_sign, w, normalize)))
    # beyond 4 tasks only the grid cases without the 0.3.. weights are exact in any order (a third)
    assert sum(used) >= (len(used) // 3 if t_count > 4 else len(used))
    monkeypatch.setattr(ties, "_fused_elect_and_mean", lambda *a: None)
    for (x, w, zero_sign, normalize), got in results:
        want = ties.elect_and_mean(x, zero_sign, w, normalize)
        assert _same_bits(got, want), (x.shape, w, zero_sign, normalize)


@pytest.mark.parametrize("method,params", [
    ("dare_ties", {"density": 0.5}), ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}),
    ("della", {"density": 0.5, "epsilon": 0.1}), ("ties", {"density": 0.4, "threshold": "per_tensor"}),
])
def test_sparsified_methods_with_fused_election_equal_torch(method, params, monkeypatch):
    from bmmstream.methods import ties

    models = [("a", {"weight": 0.7}), ("b", {}), ("c", {"weight": 1.5})]
    x = _float32_tasks(4, 3, (40, 24), grid=True) + _float32_tasks(5, 3, (40, 24), grid=False)
    inp = ModuleInput(_spec("w", (40, 24)), torch.zeros(40, 24), x)
    kernel, used = ties._fused_elect_and_mean, []
    monkeypatch.setattr(ties, "_fused_elect_and_mean", lambda *a: used.append(kernel(*a)) or used[-1])
    got = [get_method(method, params, models=m).merge(inp) for m in (None, models)]
    assert len(used) == 2 and all(u is not None for u in used)
    monkeypatch.setattr(ties, "_fused_elect_and_mean", lambda *a: None)
    want = [get_method(method, params, models=m).merge(inp) for m in (None, models)]
    for g, w in zip(got, want):
        assert _same_bits(g, w)


def test_float64_sources_round_like_torch():
    # f64 sources are rounded to float32 per entry (round to nearest even), as the general path's .to()
    suite = _suite(21, 2, torch.float64, [(29, 31), (3,)])
    suite = [(b + 1e-9 * torch.randn(b.shape, dtype=torch.float64), es) for b, es in suite]
    gen, raw_m, raws = _both_prepassed({"density": 0.4}, None, suite)
    assert np.array_equal(gen._counts.sum(0), raw_m._counts.sum(0))
    for raw in raws:
        for out_dtype in (torch.float64, torch.bfloat16):
            assert _same_bits(raw_m.merge_raw(raw, out_dtype), _general_weight(gen, raw, out_dtype))


@pytest.mark.parametrize("t_count", [2, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_torch_election_equals_the_whole_tensor_bit_for_bit(t_count, dtype, monkeypatch):
    """The torch path of elect_and_mean (and the weighted sum) runs ELEMENT_CHUNK entries at a time to
    keep its T-fold temporaries small; on slices of width a multiple of 32768 torch's sum over the
    task axis, whose order beyond 4 tasks depends on the column, gives the whole tensor's bits."""
    from bmmstream.methods import ties
    from bmmstream.methods.registry import weighted_combination

    monkeypatch.setattr(ties, "_fused_elect_and_mean", lambda *a: None)
    assert ties.ELEMENT_CHUNK % 32768 == 0
    shape = (7, 13_001)  # 91_007 entries: three chunks of 32768, the last one partial
    x = torch.cat([_float32_tasks(t_count, t_count - t_count // 2, shape, grid=True),
                   _float32_tasks(t_count + 1, t_count // 2, shape, grid=False)]).to(dtype)
    flat = x.view(t_count, -1)
    flat[:, :65536] = flat[:, :65536].abs()  # the first two chunks elect +, the last one mostly -,
    flat[:, 65536:] = -flat[:, 65536:].abs()  # so a per-chunk majority would differ from the tensor's
    flat[:, 80000:80100] = 0.0  # zero masses in the last chunk: the majority rule decides there
    flat[:, 90000:90050] = 0.0
    flat[0, 90000:90050], flat[1, 90000:90050] = 0.5, -0.5  # and exact cancellations
    whole = 1 << 40
    for weights in (None, torch.linspace(0.3, 1.7, t_count, dtype=torch.float64),
                    torch.full((t_count,), 0.7, dtype=dtype)):
        for zero_sign in ("majority", "positive"):
            for normalize in (True, False):
                want = ties.elect_and_mean(x, zero_sign, weights, normalize, chunk=whole)
                got = ties.elect_and_mean(x, zero_sign, weights, normalize, chunk=32768)
                assert _same_bits(got, want), (weights, zero_sign, normalize)
                # and the definition, on a dense float64 reference
                ref = x.to(torch.float64) * (1.0 if weights is None else weights.to(torch.float64).reshape(-1, 1, 1))
                sign = torch.sign(ref.sum(0))
                if zero_sign == "positive":
                    sign[sign == 0] = 1.0
                else:
                    sign[sign == 0] = 1.0 if float(torch.sign(sign.sum())) >= 0 else -1.0
                agree = (torch.sign(ref) == sign) & (ref != 0)
                total = torch.where(agree, ref, 0.0).sum(0)
                if normalize:
                    w = torch.ones(t_count, dtype=torch.float64) if weights is None else weights.to(torch.float64)
                    div = torch.where(agree, w.reshape(-1, 1, 1), 0.0).sum(0)
                    total = total / (agree.sum(0).clamp(min=1) if weights is None else torch.where(div == 0, 1.0, div))
                tol = 1e-5 if dtype == torch.float32 else 1e-13
                assert torch.allclose(got.to(torch.float64), total, rtol=tol, atol=tol * float(total.abs().max()))
        if weights is not None:
            for normalize in (True, False):
                want = weighted_combination(x, weights, normalize, chunk=whole)
                assert _same_bits(weighted_combination(x, weights, normalize, chunk=32768), want)
    # the tensor's majority is + (two chunks of + against one of -): the cancellations in the last chunk
    # take +, though a majority over that chunk alone would be -
    got = ties.elect_and_mean(x, "majority", None, True, chunk=32768).view(-1)
    assert bool((got[90000:90050] == 0.5).all()) and bool((got[80000:80100] == 0).all())


def test_sparsifying_merge_memory_is_bounded_beyond_four_experts(tmp_path):
    """DARE-TIES with 8 experts (beyond MAX_TASKS the election runs on torch): its peak for one tensor
    stays within what it declares to `bmm plan` (T + 4.5 copies and the election's chunk scratch),
    where the unchunked election took ~33 copies of this tensor."""
    import json
    import os
    import subprocess
    import sys

    from bmmstream.methods import ties

    child = r"""
import json, torch
from bmmstream.methods import get_method
from bmmstream.methods.registry import ModuleInput
from bmmstream.plan.layout import ModuleSpec
torch.set_num_threads(1)
T, shape = 8, (1024, 2048)
copy = 4 * shape[0] * shape[1]
hwm = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
g = torch.Generator().manual_seed(0)
base, deltas = torch.randn(shape, generator=g), torch.randn((T,) + shape, generator=g) * 0.01
spec = ModuleSpec("w", shape, "linear", "other", 0, 0, 1)
m = get_method("dare_ties", {"density": 0.3})
m.merge(ModuleInput(ModuleSpec("v", (64, 64), "linear", "other", 0, 0, 1), base[:64, :64], deltas[:, :64, :64]))
open("/proc/self/clear_refs", "w").write("5")  # after the kernels' first load (numba's code: ~60 MiB)
before = hwm()
m.merge(ModuleInput(spec, base, deltas))
print(json.dumps([(hwm() - before) / copy, m.working_copies(T), m.extra_bytes(shape, "linear", T) / copy]))
"""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, check=True)
    measured, declared, scratch = json.loads(res.stdout.strip().splitlines()[-1])
    assert declared == 8 + 4.5
    assert scratch == ties.ELECTION_SCRATCH_PER_ENTRY * 8 * ties.ELEMENT_CHUNK / (4 * 1024 * 2048)
    assert measured <= declared + scratch, (measured, declared, scratch)

