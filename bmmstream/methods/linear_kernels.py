"""Fused CPU kernels for the linear merge family (task arithmetic, linear): the merged weight
W = B + f(sum_t w_t (E_t - B)) read straight from the stored bf16/fp16/fp32 tensors and written in
the output dtype, with no T float32 task vectors.

Why kernels and not torch ops: the general path converts T+1 inputs to float32 and walks them several
times (about 20x the time of this on 4 bf16 experts); this reads each stored byte once, so a
task-arithmetic merge runs near the speed of reading its inputs.

Bit-identical to the general path (float32 compute, then `.to(out_dtype)`), operation by operation:
  d_t = f32(E_t) - f32(B);  d_t *= f32(w_t) (per-model weights);
  m = torch's `sum(0)` of the d_t, in torch's own order (below);  m = m / f32(div) (normalize);
  m = f32(scale) * m;  m = m + f32(c - 1) * B (linear without normalize, c != 1);  W = B + m;
  output: float32 -> bf16/fp16 rounded to nearest even, as torch's conversions.
No FMA contraction (numba without fastmath keeps every multiply and add separately rounded).

torch's CPU `sum(0)` over [T, N] (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum) adds the rows
in two orders, by column: columns [0, 4V*(N//4V)) (V = float lanes of its SIMD kernels) take
`multi_row_sum` (rows one after another into a zero accumulator; from 16 rows on, in blocks of 16 or
more that cascade into higher levels), the last N mod 4V columns take `row_sum` (4 interleaved partial
sums, rows 4i+k, then the leftover rows into the first, then the 4 partials added). For T <= 4 the two
orders coincide. For T >= 5 the column boundary 4V is measured once per process from torch itself
(`_torch_sum_block`); where the rule cannot be trusted (an unexpected probe, vectors of fewer than V
elements, torch's threaded split not aligned to 4V) the kernel declines and the pipeline takes the
general path.

Kernels: for T < 16, passes over 4 experts at a time (`pass_*`; the running float32 sum is kept
between passes when T > 4), every element in the sequential order, vectorised by LLVM; for T >= 16, a
block kernel with torch's cascade (`fused_linear`, slower, rare); then the <= 4V-1 elements in
row_sum order are recomputed (`fused_linear_tail`). For a stored-transposed tensor those elements are
counted in the transposed (method) layout and mapped back to stored positions; everything else is
elementwise, so the stored layout is used as it is. NaN/Inf in an input raises the general path's
message for the first source with one (base, then experts in order); a NaN made by the arithmetic
(Inf times 0, Inf - Inf) makes the kernel decline, so the general path writes torch's own NaN bytes.
Numba compiles one version per (base, expert, output) dtype and caches it on disk (first use: seconds).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

from bmmstream.methods import hugepages
from bmmstream.errors import BmmError

BLOCK = 8192  # elements per parallel work item: the block's buffers stay in L1/L2
# torch dtype -> numpy view dtype the kernel dispatches on (bits only: numpy has no bfloat16)
_VIEW = {torch.bfloat16: (torch.int16, np.uint16), torch.float16: (torch.int16, np.int16),
         torch.float32: (torch.int32, np.uint32)}
SUPPORTED = tuple(_VIEW)


# -- per-dtype element access, resolved at compile time by the numpy type of the stored bits: -----
# uint16 bf16, int16 fp16, uint32 fp32 (`like` in _encode_bits only carries the output type)
def _decode_bits(x):
    raise NotImplementedError


def _nonfinite_bits(x):
    raise NotImplementedError


def _encode_bits(v, like):
    raise NotImplementedError


@overload(_decode_bits)
def _decode_bits_ol(x):
    if x == types.uint16:
        return lambda x: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    if x == types.int16:
        return lambda x: _half_to_float(np.uint32(np.uint16(x)))
    if x == types.uint32:
        return lambda x: np.uint32(x).view(np.float32)


@overload(_nonfinite_bits)
def _nonfinite_bits_ol(x):
    if x == types.uint16:
        return lambda x: np.int64((x & np.uint16(0x7F80)) == np.uint16(0x7F80))
    if x == types.int16:
        return lambda x: np.int64((x & np.int16(0x7C00)) == np.int16(0x7C00))
    if x == types.uint32:
        return lambda x: np.int64((x & np.uint32(0x7F800000)) == np.uint32(0x7F800000))


@overload(_encode_bits)
def _encode_bits_ol(v, like):
    if like == types.uint16:
        def enc_bf16(v, like):
            u = np.float32(v).view(np.uint32)
            return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return enc_bf16
    if like == types.int16:
        return lambda v, like: np.int16(_float_to_half(np.float32(v)))
    if like == types.uint32:
        return lambda v, like: np.float32(v).view(np.uint32)


@njit
def _decode(a, i):  # stored element i as float32
    return _decode_bits(a[i])


@njit
def _nonfinite(a, i):  # stored element i is NaN or Inf
    return _nonfinite_bits(a[i]) != 0


@njit
def _encode(out, i, x):  # float32 x into out[i], rounded to nearest even
    out[i] = _encode_bits(x, out[i])


@intrinsic
def _address_as(typingctx, address, like):
    """An int64 address as a pointer to `like`'s element type (experts are passed as addresses so
    that one compiled kernel serves any number of them)."""
    sig = types.CPointer(like.dtype)(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@njit
def _half_to_float(h):
    """IEEE binary16 bits -> float32, exactly."""
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == np.uint32(0x1F):
        return np.uint32(sign | np.uint32(0x7F800000) | (m << np.uint32(13))).view(np.float32)
    if e != np.uint32(0):
        return np.uint32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))).view(np.float32)
    v = np.float32(m) * np.float32(2.0 ** -24)  # subnormal (or zero): exact in float32
    return -v if sign != np.uint32(0) else v


@njit
def _float_to_half(x):
    """float32 -> IEEE binary16 bits, round to nearest even (overflow to Inf, subnormals kept)."""
    u = np.float32(x).view(np.uint32)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # Inf (NaN never reaches here: the kernel declines those)
        return sign | np.uint32(0x7C00) | np.uint32(a > np.uint32(0x7F800000)) * np.uint32(0x200)
    if a >= np.uint32(0x477FF000):  # >= 65520: rounds to Inf
        return sign | np.uint32(0x7C00)
    if a >= np.uint32(0x38800000):  # normal half: rebias, round the 13 dropped bits to even
        v = a - np.uint32(0x38000000)
        return sign | ((v + np.uint32(0xFFF) + ((v >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13))
    # subnormal half m * 2^-24: m = rint(|x| * 2^24); the 2^23 trick rounds to nearest even
    f = np.abs(x) * np.float32(16777216.0)
    r = (f + np.float32(8388608.0)) - np.float32(8388608.0)
    return sign | np.uint32(r)


@njit
def _finish(m, b, div, scale, cm1):
    """The method's float32 tail after the sum, in the general path's order: W = B + U with
    U = scale * (m / div) + cm1 * B. Without normalize div = 1 (an exact division); task arithmetic
    has scale, linear scale 1 (exact); without the linear term cm1 = 0, which changes no bit of W:
    m + (+-0) differs from m only for m = -0 and B >= +0, where B + m is B either way. No option is a
    branch, so the element loop vectorises."""
    return b + ((scale * (m / div)) + cm1 * b)


@njit
def _add_term(acc, e, lo, b, w, weighted):
    """acc += f32(e[lo:lo+m]) - b (times w): one row of the sum; True if e holds NaN/Inf there."""
    bad = False
    for i in range(acc.size):
        bad |= _nonfinite(e, lo + i)
        d = _decode(e, lo + i) - b[i]
        if weighted:
            d = d * w
        acc[i] = acc[i] + d
    return bad


# One pass over 4 experts, every element in torch's multi_row_sum order for < 16 rows:
# acc = (+0 or the previous pass's acc) + d_0*w_0 + ... + d_3*w_3, rows in order. A missing expert
# is padded as expert 0 with weight 0 (adding +-0 to a sum that is never -0 changes no bit); without
# per-model weights every weight is 1.0 (an exact multiply). Four kernels (from zero or from `acc`,
# into `acc` or finished into `out`) because a branch on where to load or store from stops numba's
# vectorisation; the finishing options are value selects, which do not. Each returns
# (count of NaN/Inf input elements, count of NaN outputs).
@njit
def _nonfinite5(x, y0, y1, y2, y3):
    return (_nonfinite_bits(x) + _nonfinite_bits(y0) + _nonfinite_bits(y1)
            + _nonfinite_bits(y2) + _nonfinite_bits(y3))


@njit
def _sum4(acc, b, y0, y1, y2, y3, w):
    acc = acc + (_decode_bits(y0) - b) * w[0]
    acc = acc + (_decode_bits(y1) - b) * w[1]
    acc = acc + (_decode_bits(y2) - b) * w[2]
    return acc + (_decode_bits(y3) - b) * w[3]


@njit(parallel=True, cache=True)
def pass_zero_out(base, e0, e1, e2, e3, w, div, scale, cm1, out):
    bad = 0
    nans = 0
    for i in prange(base.size):
        x, y0, y1, y2, y3 = base[i], e0[i], e1[i], e2[i], e3[i]
        bad += _nonfinite5(x, y0, y1, y2, y3)
        b = _decode_bits(x)
        v = _finish(_sum4(np.float32(0.0), b, y0, y1, y2, y3, w), b, div, scale, cm1)
        nans += np.int64(v != v)
        out[i] = _encode_bits(v, out[0])
    return bad, nans


@njit(parallel=True, cache=True)
def pass_zero_acc(base, e0, e1, e2, e3, w, acc):
    bad = 0
    for i in prange(base.size):
        x, y0, y1, y2, y3 = base[i], e0[i], e1[i], e2[i], e3[i]
        bad += _nonfinite5(x, y0, y1, y2, y3)
        acc[i] = _sum4(np.float32(0.0), _decode_bits(x), y0, y1, y2, y3, w)
    return bad, 0


@njit(parallel=True, cache=True)
def pass_acc_acc(base, e0, e1, e2, e3, w, acc):
    bad = 0
    for i in prange(base.size):
        x, y0, y1, y2, y3 = base[i], e0[i], e1[i], e2[i], e3[i]
        bad += _nonfinite5(x, y0, y1, y2, y3)
        acc[i] = _sum4(acc[i], _decode_bits(x), y0, y1, y2, y3, w)
    return bad, 0


@njit(parallel=True, cache=True)
def pass_acc_out(base, e0, e1, e2, e3, w, acc, div, scale, cm1, out):
    bad = 0
    nans = 0
    for i in prange(base.size):
        x, y0, y1, y2, y3 = base[i], e0[i], e1[i], e2[i], e3[i]
        bad += _nonfinite5(x, y0, y1, y2, y3)
        b = _decode_bits(x)
        v = _finish(_sum4(acc[i], b, y0, y1, y2, y3, w), b, div, scale, cm1)
        nans += np.int64(v != v)
        out[i] = _encode_bits(v, out[0])
    return bad, nans


@njit(parallel=True, cache=True)
def fused_linear(base, eaddr, like, weights, weighted, div, scale, cm1, level_power, out, bad, nan):
    """Main pass: every element with torch's multi_row_sum order. Experts: addresses `eaddr` of arrays
    of `like`'s dtype and base's size. bad[k, s]: source s (0 = base) has NaN/Inf in block k;
    nan[k]: block k produced a NaN."""
    n = base.size
    T = eaddr.size
    step = 1 << level_power
    mask = step - 1
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        m = min(n, lo + BLOCK) - lo
        b = np.empty(m, np.float32)
        badb = False
        for i in range(m):
            badb |= _nonfinite(base, lo + i)
            b[i] = _decode(base, lo + i)
        if badb:
            bad[k, 0] = 1
        lv = np.zeros((4, m), np.float32)
        t = 0
        while t + step <= T:  # torch's cascade levels (only from `step` >= 16 rows on)
            for _ in range(step):
                if _add_term(lv[0], carray(_address_as(eaddr[t], like), n), lo, b, weights[t], weighted):
                    bad[k, t + 1] = 1
                t += 1
            for j in range(1, 4):
                for i in range(m):
                    lv[j, i] = lv[j, i] + lv[j - 1, i]
                    lv[j - 1, i] = 0.0
                if t & (mask << (j * level_power)):
                    break
        while t < T:
            if _add_term(lv[0], carray(_address_as(eaddr[t], like), n), lo, b, weights[t], weighted):
                bad[k, t + 1] = 1
            t += 1
        got_nan = False
        for i in range(m):
            s = lv[0, i]
            if T >= step:
                s = ((s + lv[1, i]) + lv[2, i]) + lv[3, i]
            w = _finish(s, b[i], div, scale, cm1)
            got_nan |= w != w
            _encode(out, lo + i, w)
        if got_nan:
            nan[k] = 1


@njit
def _multi_row_sum(terms, first, stride, size):
    """torch's multi_row_sum for one column: terms[first + stride*i], i < size."""
    level_power = max(4, _ceil_log2(size) // 4)
    step = 1 << level_power
    mask = step - 1
    acc = np.zeros(4, np.float32)
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] = acc[0] + terms[first + stride * i]
            i += 1
        for j in range(1, 4):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = 0.0
            if i & (mask << (j * level_power)):
                break
    while i < size:
        acc[0] = acc[0] + terms[first + stride * i]
        i += 1
    return ((acc[0] + acc[1]) + acc[2]) + acc[3]


@njit
def _ceil_log2(x):
    p = 0
    while (1 << p) < x:
        p += 1
    return p


@njit(cache=True)
def fused_linear_tail(base, eaddr, like, weights, weighted, div, scale, cm1, idx, out, nan):
    """The elements torch sums with row_sum (4 interleaved partial sums), recomputed in that order."""
    T = eaddr.size
    n = base.size
    terms = np.empty(T, np.float32)
    for q in range(idx.size):
        p = idx[q]
        b = _decode(base, p)
        for t in range(T):
            d = _decode(carray(_address_as(eaddr[t], like), n), p) - b
            if weighted:
                d = d * weights[t]
            terms[t] = d
        size_ilp = T // 4
        part = np.zeros(4, np.float32)
        for c in range(4):
            part[c] = _multi_row_sum(terms, c, 4, size_ilp)
        for t in range(size_ilp * 4, T):
            part[0] = part[0] + terms[t]
        s = ((part[0] + part[1]) + part[2]) + part[3]
        w = _finish(s, b, div, scale, cm1)
        if w != w:
            nan[0] = 1
        _encode(out, p, w)


# -- torch's summation order, measured ---------------------------------------------------------
@lru_cache(maxsize=None)
def _torch_sum_block() -> int:
    """4V: columns [0, 4V*(N//4V)) of torch's `sum(0)` take the multi_row_sum order, the rest
    row_sum; 0 when torch's order does not look like that (then T >= 5 goes the general path).
    Probe rows (1, -1, 0, 0, 2^-30): multi_row_sum gives 2^-30, row_sum ((1 + 2^-30) - 1 ...) 0."""
    n = 255
    x = torch.zeros(5, n)
    x[0], x[1], x[4] = 1.0, -1.0, 2.0 ** -30
    s = x.sum(0)
    casc = (s == 2.0 ** -30).tolist()
    ncasc = casc.index(False) if False in casc else n
    if not all(v == (i < ncasc) for i, v in enumerate(casc)) or not all(
        float(v) in (0.0, 2.0 ** -30) for v in s.tolist()
    ):
        return 0
    for block in (8, 16, 32, 64, 128):
        if block * (n // block) == ncasc:
            return block
    return 0


def _tail_positions(shape: tuple[int, ...], transposed: bool, T: int) -> np.ndarray | None:
    """Stored positions of the elements torch sums in row_sum order (None: the order is not
    known here, let the general path do it)."""
    n = math.prod(shape)
    if T <= 4 or n == 0:  # the two orders coincide for up to 4 rows
        return np.empty(0, np.int64)
    block = _torch_sum_block()
    if block == 0 or n < block // 4:  # fewer columns than one SIMD vector: other loops in torch
        return None
    if 32 % block and torch.get_num_threads() > 1 and n * T >= 32768:
        return None  # torch splits threads at 32-column boundaries, not aligned to this block
    flat = np.arange(block * (n // block), n, dtype=np.int64)  # in the method's layout
    if transposed and len(shape) == 2:
        rows, cols = shape  # stored (rows, cols); the method sums the (cols, rows) transpose
        flat = (flat % rows) * cols + flat // rows
    return flat


def _flat_view(t: torch.Tensor) -> np.ndarray | None:
    as_int, np_dtype = _VIEW[t.dtype]
    if not t.is_contiguous() or t.device.type != "cpu":
        return None
    return t.reshape(-1).view(as_int).numpy().view(np_dtype)


def fused_merge_scratch_bytes(tasks: int) -> int:
    """Bytes per element fused_merge allocates beside its output: the float32 running sum kept between
    passes of 4 experts (5 to 15 experts)."""
    return 4 if 4 < tasks < 16 else 0


def fused_merge(
    raw, out_dtype: torch.dtype, *, weights: list[float] | None, divide: bool, div: float,
    scale: float, cm1: float | None,
) -> torch.Tensor | None:
    """W = B + (scale * (sum_t w_t (E_t - B)) [/ div]) [+ cm1 * B] in `out_dtype`, the stored layout,
    bit for bit as the float32 torch path; None when this kernel does not handle the inputs.
    `raw` is a registry.RawModule; `weights` None means no per-model weights (no multiply)."""
    base, experts = raw.base, list(raw.experts)
    T = len(experts)
    if (
        T == 0 or out_dtype not in SUPPORTED or base.dtype not in SUPPORTED
        or any(e.dtype != experts[0].dtype or e.shape != base.shape for e in experts)
        or experts[0].dtype not in SUPPORTED
    ):
        return None
    tail = _tail_positions(tuple(base.shape), bool(raw.spec.transposed), T)
    if tail is None:
        return None
    views = [_flat_view(t) for t in (base, *experts)]
    if any(v is None for v in views):
        return None
    out = hugepages.empty(base.shape, out_dtype)  # fresh 4 KiB page faults cost more than this kernel
    out_np = out.reshape(-1).view(_VIEW[out_dtype][0]).numpy().view(_VIEW[out_dtype][1])
    n = base.numel()
    w = np.asarray(weights if weights is not None else [1.0] * T, dtype=np.float32)
    tail_args = (np.float32(div if divide else 1.0), np.float32(scale), np.float32(cm1 if cm1 is not None else 0.0))
    nans = 0
    if T < 16:  # passes over 4 experts at a time (the running sum kept in float32 between passes)
        acc = np.empty(n if fused_merge_scratch_bytes(T) else 0, np.float32)
        group = 4
        for p in range(0, T, group):
            es = list(views[1 + p: 1 + p + group])
            ws = list(w[p: p + group])
            while len(es) < group:  # padding: expert 0 with weight 0 adds +-0
                es.append(views[1])
                ws.append(0.0)
            final = p + group >= T
            ws = np.asarray(ws, np.float32)
            if final:
                fin = tail_args
                bad, got_nan = (pass_acc_out(views[0], *es, ws, acc, *fin, out_np) if p
                                else pass_zero_out(views[0], *es, ws, *fin, out_np))
            else:
                bad, got_nan = (pass_acc_acc if p else pass_zero_acc)(views[0], *es, ws, acc)
            if bad:
                _raise_nonfinite(raw)
            nans += got_nan
    else:  # torch's cascade over blocks of 16 rows: the general block kernel
        nblocks = (n + BLOCK - 1) // BLOCK
        bad = np.zeros((nblocks, T + 1), np.uint8)
        nan = np.zeros(max(nblocks, 1), np.uint8)
        eaddr = np.array([v.ctypes.data for v in views[1:]], dtype=np.int64)  # raw keeps them alive
        fused_linear(views[0], eaddr, views[1][:0], w, weights is not None, *tail_args,
                     max(4, _ceil_log2_py(T) // 4), out_np, bad, nan)
        if bad.any():
            _raise_nonfinite(raw)
        nans += int(nan.sum())
    if tail.size:
        nan = np.zeros(1, np.uint8)
        eaddr = np.array([v.ctypes.data for v in views[1:]], dtype=np.int64)
        fused_linear_tail(views[0], eaddr, views[1][:0], w, weights is not None, *tail_args,
                          tail, out_np, nan)
        nans += int(nan[0])
    return None if nans else out


def _raise_nonfinite(raw) -> None:
    """The general path's message for the first source (base, then experts in order) with NaN/Inf."""
    for sid, t in zip(raw.ids, (raw.base, *raw.experts)):
        if not bool(torch.isfinite(t).all()):
            raise BmmError(f"{sid}: tensor '{raw.spec.name}' contains NaN or Inf values")
    raise AssertionError("the kernel saw NaN/Inf that torch does not")


def _ceil_log2_py(x: int) -> int:
    return max(0, (x - 1).bit_length())

