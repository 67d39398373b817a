"""TIES: exact trimming / election / disjoint mean on a hand-made example, and the global threshold."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bmmstream.methods import magnitude_histogram as kernels
from bmmstream.errors import BmmError
from bmmstream.methods import get_method
from bmmstream.methods.registry import ModuleInput
from bmmstream.methods.ties import elect_and_mean
from bmmstream.plan.layout import ModuleSpec


def _inp(name: str, deltas: torch.Tensor, kind: str = "linear") -> ModuleInput:
    shape = tuple(deltas.shape[1:])
    spec = ModuleSpec(name, shape, kind, "other", 0, 0, 1)
    return ModuleInput(spec, torch.zeros(shape, dtype=deltas.dtype), deltas)


# Three task vectors of 6 entries, chosen so each step is visible by hand.
HAND = torch.tensor(
    [
        [3.0, -1.0, 0.5, -4.0, 2.0, 0.1],
        [-2.0, 1.5, -0.2, -3.0, -2.5, 0.3],
        [1.0, -0.4, 0.6, 5.0, 2.2, -0.05],
    ],
    dtype=torch.float64,
)


def test_hand_made_example_per_tensor():
    # density 0.5 -> keep int(0.5*6) = 3 largest |.| per task:
    #   t0: 3, -4, 2        t1: -2, -3, -2.5      t2: 1 is 4th; keep 5, 2.2, 1.0
    trimmed = torch.tensor(
        [
            [3.0, 0, 0, -4.0, 2.0, 0],
            [-2.0, 0, 0, -3.0, -2.5, 0],
            [1.0, 0, 0, 5.0, 2.2, 0],
        ],
        dtype=torch.float64,
    )
    # elected signs: col0 3-2+1=2 (+), col3 -4-3+5=-2 (-), col4 2-2.5+2.2=1.7 (+), others 0 -> all-zero
    expected = torch.tensor([(3.0 + 1.0) / 2, 0, 0, (-4.0 - 3.0) / 2, (2.0 + 2.2) / 2, 0], dtype=torch.float64)
    m = get_method("ties", {"density": 0.5, "threshold": "per_tensor", "scale": 1.0})
    out = m.merge(_inp("w", HAND.clone()))
    assert torch.equal(m.trim(_inp("w", HAND.clone())), trimmed)
    assert torch.equal(out, expected)
    m2 = get_method("ties", {"density": 0.5, "threshold": "per_tensor", "scale": 0.5})
    assert torch.equal(m2.merge(_inp("w", HAND.clone())), 0.5 * expected)


def test_hand_made_example_global_threshold():
    # Two tensors; the global threshold per task comes from both together (12 values per task).
    a, b = HAND[:, :3].clone(), HAND[:, 3:].clone()
    m = get_method("ties", {"density": 0.5})  # threshold: global
    assert m.needs_prepass
    m.prepass_observe(_inp("a", a))
    m.prepass_observe(_inp("b", b, kind="vector"))
    # k = 6 - int(6*0.5) = 3rd smallest |.| per task: t0 {0.1,0.5,1,2,3,4} -> 1.0;
    # t1 {0.2,0.3,1.5,2,2.5,3} -> 1.5; t2 {0.05,0.4,0.6,1,2.2,5} -> 0.6 (all exact bin edges? no:
    # bound says hist <= exact < hist*(1+2^-12)); keep |U| >= threshold.
    taus = m.prepass_state()["thresholds"]
    for got, exact in zip(taus, [1.0, 1.5, 0.6]):
        assert got <= exact < got * (1 + kernels.REL_ERROR)
    ta = m.trim(_inp("a", a))
    tb = m.trim(_inp("b", b))
    full = torch.cat([ta, tb], dim=1)
    expected_trim = torch.tensor(
        [
            [3.0, -1.0, 0, -4.0, 2.0, 0],
            [-2.0, 1.5, 0, -3.0, -2.5, 0],
            [1.0, 0, 0.6, 5.0, 2.2, 0],
        ],
        dtype=torch.float64,
    )
    assert torch.equal(full, expected_trim)
    # col1: -1 + 1.5 = 0.5 -> +, only 1.5 agrees; col2: only 0.6
    exp_a = torch.tensor([(3.0 + 1.0) / 2, 1.5, 0.6], dtype=torch.float64)
    exp_b = torch.tensor([(-4.0 - 3.0) / 2, (2.0 + 2.2) / 2, 0.0], dtype=torch.float64)
    assert torch.equal(m.merge(_inp("a", a)), exp_a)
    assert torch.equal(m.merge(_inp("b", b)), exp_b)


def test_zero_sum_sign_uses_tensor_majority():
    # column 0 cancels exactly (+1, -1); the other columns vote negative -> column 0 takes -1
    d = torch.tensor([[1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    out = elect_and_mean(d)
    assert torch.equal(out, torch.tensor([-1.0, -1.5, -2.0], dtype=torch.float64))


def test_global_threshold_matches_kthvalue_within_bound():
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 12), (12,), (24, 16), (7, 5)]
    T = 3
    tensors = [torch.randn((T, *s), generator=g, dtype=torch.float64) * torch.rand((T, 1) + (1,) * (len(s) - 1), generator=g) for s in shapes]
    # heavy tails and exact zeros make the quantile non-trivial
    tensors[2] = tensors[2] ** 3
    tensors[3][:, :2] = 0.0
    for density in (0.2, 0.5, 0.9, 0.01):
        m = get_method("ties", {"density": density})
        for i, x in enumerate(tensors):
            m.prepass_observe(_inp(f"t{i}", x))
        state = m.prepass_state()
        flat = torch.cat([x.reshape(T, -1) for x in tensors], dim=1)
        d = flat.shape[1]
        assert state["numel"] == d
        k = d - int(d * density)
        exact = flat.abs().float().kthvalue(k, dim=1).values
        for t in range(T):
            tau, v = state["thresholds"][t], float(exact[t])
            assert tau <= v < tau * (1 + kernels.REL_ERROR), (density, t, tau, v)
        # state round-trips through JSON-like dicts
        m2 = get_method("ties", {"density": density})
        m2.load_prepass_state(state)
        assert m2.thresholds() == state["thresholds"]


def test_histogram_kernel_counts_exactly():
    x = torch.tensor([0.0, 1.0, -1.0, 1.0 + 2**-13, 1.0 + 2**-11, 3.0, -0.0], dtype=torch.float32)
    counts = np.zeros(kernels.NUM_BINS, dtype=np.int64)
    kernels.add_magnitude_histogram(x, counts)
    assert counts.sum() == 7
    assert counts[0] == 2  # +0 and -0
    one = np.array([1.0], dtype=np.float32).view(np.uint32)[0] >> kernels.SHIFT
    assert counts[one] == 3  # 1, -1, 1 + 2^-13 share the bin [1, 1 + 2^-12)
    assert counts[one + 2] == 1  # 1 + 2^-11
    assert kernels.bin_lower_edge(int(one)) == 1.0
    assert kernels.kth_smallest_from_histogram(counts, 3) == 1.0
    assert kernels.kth_smallest_from_histogram(counts, 7) == 3.0


def test_load_state_for_other_density_refused():
    m = get_method("ties", {"density": 0.3})
    with pytest.raises(BmmError, match="density 0.2"):
        m.load_prepass_state({"thresholds": [0.1], "numel": 10, "density": 0.2})


def test_bad_parameters():
    with pytest.raises(BmmError, match="density must be in"):
        get_method("ties", {"density": 0.0})
    with pytest.raises(BmmError, match="threshold must be one of"):
        get_method("ties", {"threshold": "layer"})


def test_per_tensor_keeps_at_least_one_entry_like_mergekit():
    d = torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, -0.3]], dtype=torch.float64)
    m = get_method("ties", {"density": 0.2, "threshold": "per_tensor"})  # int(0.6) = 0 -> keep 1
    trimmed = m.trim(_inp("n", d, kind="vector"))
    assert torch.equal(trimmed, torch.tensor([[0, -2.0, 0], [0, 0, -0.3]], dtype=torch.float64))


def test_zero_mass_sign_per_mode():
    # column 0 cancels exactly; the other columns vote negative
    d = torch.tensor([[1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    # mergekit (per_tensor): zero mass -> +1, so column 0 keeps the +1 entry
    assert torch.equal(elect_and_mean(d, "positive"), torch.tensor([1.0, -1.5, -2.0], dtype=torch.float64))
    pt = get_method("ties", {"density": 1.0, "threshold": "per_tensor"})
    assert torch.equal(pt.merge(_inp("w", d)), torch.tensor([1.0, -1.5, -2.0], dtype=torch.float64))
    gl = get_method("ties", {"density": 1.0})
    gl.prepass_observe(_inp("w", d))
    assert torch.equal(gl.merge(_inp("w", d)), torch.tensor([-1.0, -1.5, -2.0], dtype=torch.float64))


def test_torch_histogram_path_equals_numba_kernel():
    # the accelerator path (torch.bincount) must count exactly like the numba kernel
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g) * torch.logspace(-30, 10, 5000)
    x[:10] = 0.0
    x[10] = float("inf")
    a = np.zeros(kernels.NUM_BINS, dtype=np.int64)
    b = np.zeros(kernels.NUM_BINS, dtype=np.int64)
    kernels.add_magnitude_histogram(x, a)
    kernels.add_magnitude_histogram_torch(x, b)
    assert a.sum() == 5000 and np.array_equal(a, b)
