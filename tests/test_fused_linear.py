"""The fused linear-family kernels (methods/linear_kernels.py) give the general path's bytes.

The general path is reproduced here step for step as pipeline._unit_inputs / _merge_unit / the writer
do it (float32 base and task vectors in the method's layout, method.merge, W = base + U, back to the
stored layout, .to(out_dtype)); merge_raw must equal it bit for bit (torch.equal on the bit patterns).
"""
from __future__ import annotations

import math

import pytest
import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import ModuleInput, RawModule, get_method
from bmmstream.plan.layout import ModuleSpec

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


def spec(shape, transposed=False, name="model.layers.0.mlp.down_proj.weight"):
    return ModuleSpec(name=name, shape=tuple(shape), kind="linear", group="mlp", layer=0, block=0, unit=1,
                      transposed=transposed)


def general(method, raw: RawModule, out_dtype):
    """The pipeline's float32 path for one tensor (NaN/Inf checks included)."""
    base = raw.base.to(torch.float32)
    flip = raw.spec.transposed
    if flip:
        base = base.T.contiguous()
    if not bool(torch.isfinite(base).all()):
        raise BmmError(f"{raw.ids[0]}: tensor '{raw.spec.name}' contains NaN or Inf values")
    deltas = torch.empty((len(raw.experts), *base.shape), dtype=torch.float32)
    for t, e in enumerate(raw.experts):
        deltas[t].copy_(e.T if flip else e)
        if not bool(torch.isfinite(deltas[t]).all()):
            raise BmmError(f"{raw.ids[t + 1]}: tensor '{raw.spec.name}' contains NaN or Inf values")
        deltas[t] -= base
    w = base + method.merge(ModuleInput(raw.spec, base, deltas))
    w = w.T.contiguous() if flip else w
    return w.to(out_dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype])


def random_inputs(gen, shape, T, dtype, kind="normal"):
    """Base and experts that are small perturbations of it (as fine-tunes are), with special values."""
    n = math.prod(shape)
    base = torch.randn(n, generator=gen, dtype=torch.float64) * 0.05
    if kind == "wide":  # magnitudes over many binades, incl. subnormals of the dtype and large values
        base = base * torch.exp2(torch.randint(-40, 40, (n,), generator=gen).double())
        if dtype == torch.float16:
            base = base.clamp(-6e4, 6e4) * torch.exp2(torch.randint(-20, 0, (n,), generator=gen).double())
    base = base.to(dtype)
    experts = []
    for _ in range(T):
        d = torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3
        if kind == "wide":
            d = d * base.double().abs().clamp_min(1e-30) * 100
        e = (base.double() + d).to(dtype)
        # some exact equals, signed zeros, and an element of the smallest subnormal
        e[:: 7] = base[:: 7]
        experts.append(e)
    if n >= 4:
        base[0], base[1] = 0.0, -0.0
        experts[0][0], experts[-1][1] = -0.0, 0.0
        tiny = torch.finfo(dtype).smallest_normal * (2.0 ** -3)
        base[2] = tiny
        experts[0][2] = -tiny
    return base.reshape(shape), [e.reshape(shape) for e in experts]


def make_raw(base, experts, transposed=False):
    shape = base.shape
    return RawModule(spec(shape, transposed), base, experts, ["base", *[f"expert{i}" for i in range(len(experts))]])


def method(name, params, weights=None):
    models = None if weights is None else [(f"m{i}", {"weight": w}) for i, w in enumerate(weights)]
    return get_method(name, params, models=models)


CASES = [
    # (method, params, per-model weights)
    ("task_arithmetic", {"scale": 0.3}, None),
    ("task_arithmetic", {"scale": 1.7, "normalize": True}, None),
    ("task_arithmetic", {"scale": -0.55}, "w"),
    ("task_arithmetic", {"scale": 0.9, "normalize": True}, "w"),
    ("linear", {}, None),
    ("linear", {"normalize": True}, "w"),
    ("linear", {"normalize": False}, "w"),
    ("linear", {"normalize": False}, None),
]


BF, F16, F32 = DTYPES
# (base dtype, experts' dtype, output dtype): every decoder and encoder twice, and mixed sources
DTYPE_COMBOS = [(BF, BF, BF), (F16, F16, F16), (F32, F32, F32), (BF, BF, F32), (F16, F16, BF), (F32, F32, F16),
                (BF, F32, BF)]


@pytest.mark.parametrize("dtypes", range(len(DTYPE_COMBOS)))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bit_identical_to_general_path(dtypes, case):
    name, params, weighted = CASES[case]
    in_dtype, expert_dtype, out_dtype = DTYPE_COMBOS[dtypes]
    gen = torch.Generator().manual_seed(case * 31 + dtypes)
    for T, shape, transposed, kind in [
        (1, (1,), False, "normal"), (3, (), False, "normal"), (4, (17, 9), False, "wide"),
        (2, (8195,), False, "normal"), (5, (33, 97), True, "normal"), (6, (5, 7, 13), False, "wide"),
        (4, (129, 64), True, "wide"), (7, (3000,), False, "normal"), (17, (40, 9), False, "normal"),
        (5, (12,), False, "normal"), (9, (257, 33), True, "wide"),
    ]:
        weights = None
        if weighted:
            weights = [float(x) for x in (torch.rand(T, generator=gen) * 2 - 0.5)]
        m = method(name, params, weights)
        base, experts = random_inputs(gen, shape, T, in_dtype, kind)
        experts = [e.to(expert_dtype) for e in experts]
        raw = make_raw(base, experts, transposed and len(shape) == 2)
        got = m.merge_raw(raw, out_dtype)
        want = general(m, raw, out_dtype)
        assert got is not None, (T, shape)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(bits(got), bits(want)), (name, T, shape, transposed, kind,
                                                    int((bits(got) != bits(want)).sum()))


def test_rounding_ties_and_large_magnitudes():
    """Sums that land exactly halfway between two bf16/fp16 values, and values near the float range's
    end (fp16 outputs overflow to Inf like torch's conversion)."""
    m = method("task_arithmetic", {"scale": 1.0})
    for in_dtype, out_dtype in [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                (torch.float32, torch.float16), (torch.bfloat16, torch.float16)]:
        n = 4099
        base = torch.full((n,), 1.0, dtype=torch.float32)
        # base 1 + d exactly halfway between neighbours of the output dtype, both parities
        ulp = 2.0 ** -7 if out_dtype == torch.bfloat16 else 2.0 ** -10
        k = torch.arange(n, dtype=torch.float32)
        e0 = base + (k % 8) * ulp + ulp / 2
        big = torch.finfo(torch.bfloat16).max if out_dtype == torch.bfloat16 else 65504.0
        e0[-40:] = big * (1 - 2.0 ** -12) if in_dtype == torch.float32 else big
        base[-20:] = -1.0
        raw = make_raw(base.to(in_dtype), [e0.to(in_dtype), base.to(in_dtype)])
        got, want = m.merge_raw(raw, out_dtype), general(m, raw, out_dtype)
        assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("name", ["task_arithmetic", "linear"])
def test_nan_inf_messages(name):
    m = method(name, {})
    gen = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        base, experts = random_inputs(gen, (70, 300), 3, dtype)
        for where, bad in [("base", float("nan")), ("expert1", float("inf")), ("base", -float("inf"))]:
            b, e = base.clone(), [x.clone() for x in experts]
            target = b if where == "base" else e[1]
            target.view(-1)[12345] = bad
            if where == "expert1":
                e[2].view(-1)[0] = float("nan")  # a later expert too: the first in order is named
            raw = make_raw(b, e)
            with pytest.raises(BmmError) as general_err:
                general(m, raw, torch.bfloat16)
            with pytest.raises(BmmError) as fused_err:
                m.merge_raw(raw, torch.bfloat16)
            assert str(fused_err.value) == str(general_err.value) == (
                f"{where}: tensor 'model.layers.0.mlp.down_proj.weight' contains NaN or Inf values")


def test_unsupported_inputs_decline():
    m = method("task_arithmetic", {})
    base = torch.randn(64, 8, dtype=torch.float64)
    raw = make_raw(base, [base + 1, base - 1])
    assert m.merge_raw(raw, torch.bfloat16) is None  # float64 sources
    b16 = base.to(torch.bfloat16)
    assert m.merge_raw(make_raw(b16, [b16, b16]), torch.float64) is None  # float64 output
    assert m.merge_raw(make_raw(b16, [b16, b16.float()]), torch.bfloat16) is None  # mixed expert dtypes
    assert m.merge_raw(make_raw(b16, [b16.T.contiguous().T, b16]), torch.bfloat16) is None  # strided


def test_overflow_gives_inf_and_nan_declines():
    """Finite bf16 inputs near float32's maximum: a task vector that overflows to Inf gives the general
    path's Inf bytes; a NaN made by the arithmetic (scale 0 times Inf) makes the kernel decline, so the
    general path writes torch's own NaN bytes (torch's NaN encoding depends on its SIMD path)."""
    mx = torch.finfo(torch.bfloat16).max
    base = torch.full((100,), -mx, dtype=torch.bfloat16)
    e = torch.full((100,), mx, dtype=torch.bfloat16)
    raw = make_raw(base, [e, base, base, base])
    m = method("task_arithmetic", {"scale": 0.5})
    got, want = m.merge_raw(raw, torch.bfloat16), general(m, raw, torch.bfloat16)
    assert got is not None and torch.isinf(want.float()).all() and torch.equal(bits(got), bits(want))
    m = method("task_arithmetic", {"scale": 0.0})
    assert torch.isnan(general(m, raw, torch.bfloat16).float()).all()
    assert m.merge_raw(raw, torch.bfloat16) is None


def test_threads_do_not_change_bytes():
    import numba

    m = method("task_arithmetic", {"scale": 0.4})
    gen = torch.Generator().manual_seed(9)
    base, experts = random_inputs(gen, (300, 301), 6, torch.bfloat16)
    raw = make_raw(base, experts, transposed=True)
    outs = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            outs.append((m.merge_raw(raw, torch.bfloat16), general(m, raw, torch.bfloat16)))
        finally:
            torch.set_num_threads(torch_threads)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for got, want in outs:
        assert torch.equal(bits(got), bits(want))


# -- end to end: `bmm merge` writes the same bytes with the fused kernels as with the general path --
def _bf16_suite(root, family: str, experts: int = 5):
    """A tiny model of `family` in bf16 (base + `experts` perturbed copies) as safetensors folders."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"llama": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=70, max_position_embeddings=32),
          "gpt2": dict(n_embd=36, n_layer=2, n_head=4, n_inner=84, vocab_size=70, n_positions=32)}[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    paths = []
    for t in range(experts):
        e = copy.deepcopy(model)
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for p in e.parameters():
                p.add_((0.02 * torch.randn(p.shape, generator=g)).to(p.dtype))
        e.save_pretrained(root / f"expert_{t}")
        paths.append(root / f"expert_{t}")
    return root / "base", paths


def _digest(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bmm_merge_bytes_equal_general_path(tmp_path, monkeypatch, family):
    import bmmstream
    from bmmstream.methods.linear import Linear
    from bmmstream.methods.task_arithmetic import TaskArithmetic

    base, experts = _bf16_suite(tmp_path, family)
    weights = [0.5, 1.25, -0.3, 0.8, 1.0]
    runs = [("task_arithmetic", {"scale": 0.4}, False, "bfloat16"),
            ("task_arithmetic", {"scale": 0.7, "normalize": True}, True, "float16"),
            ("linear", {"normalize": False}, True, "float32"), ("task_arithmetic", {"scale": 1.0}, True, "float32")]
    for i, (name, params, weighted, out_dtype) in enumerate(runs):
        cfg = {"base_model": str(base), "merge_method": name, "parameters": params, "dtype": "float32",
               "out_dtype": out_dtype,
               "models": [{"model": str(e), **({"parameters": {"weight": w}} if weighted else {})}
                          for e, w in zip(experts, weights)]}
        fused_calls = []
        cls = {"task_arithmetic": TaskArithmetic, "linear": Linear}[name]
        real = cls.merge_raw

        def spy(self, raw, out_dt, real=real):
            w = real(self, raw, out_dt)
            fused_calls.append(w is not None)
            return w

        monkeypatch.setattr(cls, "merge_raw", spy)
        fused = bmmstream.merge(cfg, out=tmp_path / f"fused{i}", run_dir=tmp_path / f"rf{i}", device="cpu",
                                progress=False)
        assert fused_calls and all(fused_calls), name  # every floating tensor went through the kernel
        monkeypatch.setattr(cls, "merge_raw", lambda self, raw, out_dt: None)  # force the general path
        general_out = bmmstream.merge(cfg, out=tmp_path / f"general{i}", run_dir=tmp_path / f"rg{i}",
                                      device="cpu", progress=False)
        monkeypatch.setattr(cls, "merge_raw", real)
        assert _digest(fused) == _digest(general_out), (family, name)


def test_outputs_on_huge_page_mappings_keep_the_bytes(monkeypatch):
    """Every fused output through bmmstream.methods.hugepages' mapping (MIN_BYTES 0): the same bits."""
    from bmmstream.methods import hugepages

    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    monkeypatch.setattr(hugepages, "available", lambda: True)
    gen = torch.Generator().manual_seed(7)
    for (name, params, weighted), (T, shape, transposed) in zip(
        CASES[:4], [(4, (129, 64), True), (2, (8195,), False), (7, (3000,), False), (17, (40, 9), False)]
    ):
        weights = [float(x) for x in torch.rand(T, generator=gen)] if weighted else None
        m = method(name, params, weights)
        base, experts = random_inputs(gen, shape, T, BF, "wide")
        raw = make_raw(base, experts, transposed)
        got = m.merge_raw(raw, BF)
        assert got is not None and torch.equal(bits(got), bits(general(m, raw, BF))), (name, T, shape)
