"""Fused CPU kernels for TIES with the global threshold, reading the stored tensors directly.

Why: the general path materialises T float32 task vectors per tensor and then several full-size
temporaries (trim, weights, signs, agree masks, selected values); here one pass per tensor reads the
base and the T experts in their stored dtype (bf16, fp16, fp32 or fp64, through raw addresses so that
one compiled kernel serves every T and every mix of dtypes) and writes the merged weight in the output
dtype. The arithmetic is the general path's, operation for operation, in float32:

    d_t = f32(e_t) - f32(b);  x_t = (|d_t| >= tau_t ? d_t : 0) [* w_t];  mass = ((0 + x_0) + x_1) + ...
    sign = sign(mass) (zero mass: the rule's sign);  agree_t = sign > 0 ? x_t > 0 : x_t < 0
    sel = sequential sum of agreeing x_t;  r = sel / max(count, 1)  or  sel / (sum of agreeing w_t or 1)
    W = b + r * f32(scale), rounded to the output dtype (bf16: round to nearest even)

torch sums over the task axis in this sequential order for T <= 4 only (its reduction kernels
regroup 5 or more rows in an order that depends on the column and the thread split). With more
experts the kernel checks per entry that every order gives the same float32 sum (the values are
multiples of a common power of two with a small enough total, as bf16 task vectors without weights
are); where one does not, the caller leaves the tensor to the general path.

The magnitude histogram (bmmstream.methods.magnitude_histogram) is built from the same float32 d_t.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from bmmstream.methods.magnitude_histogram import SHIFT

MAX_TASKS = 4  # torch's sum over dim 0 is sequential from +0 for up to 4 rows (see module docstring)
CHUNK = 8192  # elements per parallel work item
BLOCK = 512  # elements per inner step (scratch of T + 8 such float32 rows stays in L1)

# source dtype codes
F32, BF16, F16, F64 = 0, 1, 2, 3
NEG_ZERO = 4  # a base of -0.0 everywhere (no array): -0 + r = r and e - (-0) = e, for combining task vectors
CODES = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16, torch.float64: F64}
# output codes: float32 and bf16 are written directly; other float dtypes go through a float32 buffer
OUT_F32, OUT_BF16 = 0, 1

# per-chunk statistics columns and flag bits
POS, NEG, DEFERRED, FLAGS = 0, 1, 2, 3
INPUT_BAD = 1  # some source has NaN/Inf in the chunk
RESULT_BAD = 2  # an overflow (non-finite mass or result): the general path decides
ORDER_BAD = 4  # (more than MAX_TASKS experts) a sum whose float32 value could depend on its order

# kernel modes
WRITE, DEFERRED_ONLY, SIGNS = 0, 1, 2


# -- raw loads and stores (unaligned: safetensors offsets need not be aligned) ----------------
@intrinsic
def _ld_u16(typingctx, addr, i):
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(16).as_pointer())
        return builder.load(builder.gep(ptr, [args[1]]), align=1)

    return types.uint16(types.int64, types.int64), codegen


@intrinsic
def _ld_bf16(typingctx, addr, i):
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(16).as_pointer())
        h = builder.load(builder.gep(ptr, [args[1]]), align=1)
        bits = builder.shl(builder.zext(h, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.int64, types.int64), codegen


@intrinsic
def _ld_f32(typingctx, addr, i):
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.FloatType().as_pointer())
        return builder.load(builder.gep(ptr, [args[1]]), align=1)

    return types.float32(types.int64, types.int64), codegen


@intrinsic
def _ld_f64(typingctx, addr, i):
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.DoubleType().as_pointer())
        return builder.load(builder.gep(ptr, [args[1]]), align=1)

    return types.float64(types.int64, types.int64), codegen


@intrinsic
def _st_u16(typingctx, addr, i, v):
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(16).as_pointer())
        builder.store(args[2], builder.gep(ptr, [args[1]]), align=1)
        return context.get_dummy_value()

    return types.none(types.int64, types.int64, types.uint16), codegen


@intrinsic
def _st_f32(typingctx, addr, i, v):
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.FloatType().as_pointer())
        builder.store(args[2], builder.gep(ptr, [args[1]]), align=1)
        return context.get_dummy_value()

    return types.none(types.int64, types.int64, types.float32), codegen


@intrinsic
def _f32_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _f32_from_bits(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@numba.njit(cache=True, inline="always")
def _quantum(x):
    """The value of the lowest set bit of float32 x != 0: x is an integer multiple of it."""
    bits = _f32_bits(abs(x))
    ex = bits >> np.uint32(23)
    man = bits & np.uint32(0x7FFFFF)
    if man == 0:
        return abs(x)
    low = man & (~man + np.uint32(1))
    if ex == 0:
        return _f32_from_bits(low)
    return _f32_from_bits((ex << np.uint32(23)) | low) - _f32_from_bits(ex << np.uint32(23))


@numba.njit(cache=True)
def sums_exact_in_any_order(values: np.ndarray) -> bool:
    """Whether every float32 sum of any subset of `values`, in any order, is exact: all are multiples
    of the smallest quantum q among them and sum |v| <= 2^24 q, so every partial sum is a multiple of
    q below 2^24 q (a float32 integer times q). Then torch's order of summation cannot matter."""
    q = np.float32(np.inf)
    total = 0.0
    for v in values:
        if v != 0:
            q = min(q, _quantum(v))
            total += abs(np.float64(v))
    return total <= np.float64(q) * 2.0**24


@numba.njit(cache=True, inline="always")
def _f16_to_f32(h):
    """IEEE half -> float32, exact (as torch's conversion)."""
    sign = np.float32(-1.0) if (h & 0x8000) else np.float32(1.0)
    ex = (h >> 10) & 0x1F
    man = np.float32(h & 0x3FF)
    if ex == 0:
        return sign * man * np.float32(2.0**-24)
    if ex == 31:
        return sign * np.float32(np.inf) if (h & 0x3FF) == 0 else np.float32(np.nan)
    return sign * (np.float32(1.0) + man * np.float32(2.0**-10)) * np.float32(2.0 ** (ex - 15))


@numba.njit(cache=True, inline="always")
def _load(addr, code, i):
    if code == BF16:
        return _ld_bf16(addr, i)
    if code == F32:
        return _ld_f32(addr, i)
    if code == F16:
        return _f16_to_f32(_ld_u16(addr, i))
    return np.float32(_ld_f64(addr, i))


@numba.njit(cache=True, inline="always")
def _bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (finite x; NaN never reaches here)."""
    u = _f32_bits(x)
    return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))


@numba.njit(cache=True, inline="always")
def _load_block(addr, code, lo, count, dst):
    """dst[:count] = the float32 values of entries lo .. lo + count (the dtype switch outside the
    loop, so each case is a plain loop LLVM can vectorise)."""
    if code == BF16:
        for j in range(count):
            dst[j] = _ld_bf16(addr, lo + j)
    elif code == F32:
        for j in range(count):
            dst[j] = _ld_f32(addr, lo + j)
    elif code == F16:
        for j in range(count):
            dst[j] = _f16_to_f32(_ld_u16(addr, lo + j))
    elif code == F64:
        for j in range(count):
            dst[j] = np.float32(_ld_f64(addr, lo + j))
    else:
        for j in range(count):
            dst[j] = np.float32(-0.0)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def ties_merge_kernel(
    base_addr: int, base_code: int, addrs: np.ndarray, codes: np.ndarray, n: int, taus: np.ndarray,
    weights: np.ndarray, use_w: bool, normalize: bool, scale: np.float32, positive_zero: bool,
    check_order: bool, majority: int, mode: int, out_addr: int, out_code: int, stats: np.ndarray,
) -> None:
    """One TIES pass over n entries, per chunk in blocks of BLOCK entries with one loop per step (no
    branches on the data, so the loops vectorise; a non-agreeing entry adds +0, which leaves a sum
    that starts at +0 unchanged, as torch's sum of the zeroed entries).

    mode WRITE: write every entry and count per chunk the elected signs (+, -) and the entries held
    for the tensor's majority (exactly zero mass, some non-zero value, rule 'majority'; written
    provisionally with +). DEFERRED_ONLY: rewrite the held entries with sign `majority`, in chunks
    that have some. SIGNS: write each entry's elected sign (+1, -1, 0) as float32 to out_addr (for
    torch's own sum of the signs where float32 rounding could matter). `weights` are all 1 when
    `use_w` is False (x * 1 = x). NaN/Inf are detected by accumulating v - v per entry (0, or NaN):
    flag INPUT_BAD for the sources (the caller finds which), RESULT_BAD for an overflow.
    `check_order` (more than MAX_TASKS experts): flag ORDER_BAD where the entry's values are not
    summed exactly in every order (`sums_exact_in_any_order`), so torch's order could matter."""
    n_tasks = addrs.shape[0]
    nchunks = (n + CHUNK - 1) // CHUNK
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for c in prange(nchunks):
        if mode == DEFERRED_ONLY and stats[c, DEFERRED] == 0:
            continue
        xs = np.empty((n_tasks, BLOCK), dtype=np.float32)
        bb = np.empty(BLOCK, dtype=np.float32)
        eb = np.empty(BLOCK, dtype=np.float32)
        mass = np.empty(BLOCK, dtype=np.float32)
        nonzero = np.empty(BLOCK, dtype=np.bool_)
        positive = np.empty(BLOCK, dtype=np.bool_)
        sel = np.empty(BLOCK, dtype=np.float32)
        div = np.empty(BLOCK, dtype=np.float32)
        cnt = np.empty(BLOCK, dtype=np.int32)
        bad_in = np.zeros(BLOCK, dtype=np.float32)
        bad_out = np.zeros(BLOCK, dtype=np.float32)
        pos = 0
        neg = 0
        held = 0
        order_bad = False
        c_lo = np.int64(c) * CHUNK
        c_hi = min(n, c_lo + CHUNK)
        for lo in range(c_lo, c_hi, BLOCK):
            m = min(BLOCK, c_hi - lo)
            _load_block(base_addr, base_code, lo, m, bb)
            for j in range(m):
                bad_in[j] += bb[j] - bb[j]
                mass[j] = zero
                nonzero[j] = False
            for t in range(n_tasks):
                _load_block(addrs[t], codes[t], lo, m, eb)
                tau, wt = taus[t], weights[t]
                xt = xs[t]
                for j in range(m):
                    e = eb[j]
                    bad_in[j] += e - e
                    d = e - bb[j]
                    x = (d if abs(d) >= tau else zero) * wt
                    xt[j] = x
                    mass[j] += x
                    nonzero[j] |= x != 0
            if check_order:
                for j in range(m):
                    q = np.float32(np.inf)
                    total = 0.0
                    for t in range(n_tasks):
                        x = xs[t, j]
                        if x != 0:
                            q = min(q, _quantum(x))
                            total += abs(np.float64(x))
                    if total > np.float64(q) * 2.0**24:
                        order_bad = True
            if mode == SIGNS:
                for j in range(m):
                    bad_out[j] += mass[j] - mass[j]
                    _st_f32(out_addr, lo + j, np.float32(mass[j] > 0) - np.float32(mass[j] < 0))
                continue
            for j in range(m):
                mj = mass[j]
                bad_out[j] += mj - mj
                pos += mj > 0
                neg += mj < 0
                h = (mj == 0) & nonzero[j] & (not positive_zero)
                held += h
                nonzero[j] = h  # from here: held for the majority
                positive[j] = (majority > 0) if (h & (mode == DEFERRED_ONLY)) else (mj >= 0)
                sel[j] = zero
                div[j] = zero
                cnt[j] = 0
            for t in range(n_tasks):
                xt = xs[t]
                wt = weights[t]
                for j in range(m):
                    x = xt[j]
                    p = positive[j]
                    agree = ((x > 0) & p) | ((x < 0) & (not p))
                    sel[j] += x if agree else zero
                    cnt[j] += agree
                    div[j] += wt if agree else zero
            for j in range(m):
                r = sel[j]
                if normalize:
                    if use_w:
                        r = r / (div[j] if div[j] != 0 else one)
                    else:
                        r = r / np.float32(max(cnt[j], 1))
                w = bb[j] + r * scale
                bad_out[j] += w - w
                if mode == DEFERRED_ONLY:
                    if nonzero[j]:
                        if out_code == OUT_BF16:
                            _st_u16(out_addr, lo + j, _bf16_bits(w))
                        else:
                            _st_f32(out_addr, lo + j, w)
                elif out_code == OUT_BF16:
                    _st_u16(out_addr, lo + j, _bf16_bits(w))
                else:
                    _st_f32(out_addr, lo + j, w)
        flags = 0
        for j in range(BLOCK):
            if bad_in[j] != 0:
                flags |= INPUT_BAD
            if bad_out[j] != 0:
                flags |= RESULT_BAD
        if order_bad:
            flags |= ORDER_BAD
        if mode == WRITE:
            stats[c, POS] = pos
            stats[c, NEG] = neg
            stats[c, DEFERRED] = held
            stats[c, FLAGS] = flags
        else:
            stats[c, FLAGS] |= flags


@numba.njit(parallel=True, cache=True)
def magnitude_histogram_kernel(
    base_addr: int, base_code: int, addrs: np.ndarray, codes: np.ndarray, n: int, counts: np.ndarray,
    flags: np.ndarray,
) -> None:
    """counts[s, t] += histogram of |f32(e_t) - f32(b)| over segment s of the n entries (the bins of
    bmmstream.methods.magnitude_histogram). One work item per (segment, task): no shared counts.
    flags[s, t] = INPUT_BAD where the base or expert t has NaN/Inf in that segment."""
    nseg, n_tasks = counts.shape[0], counts.shape[1]
    seg_len = (n + nseg - 1) // nseg
    for job in prange(nseg * n_tasks):
        s = job // n_tasks
        t = job - s * n_tasks
        s_lo = np.int64(s) * seg_len
        s_hi = min(n, s_lo + seg_len)
        row = counts[s, t]
        addr, code = addrs[t], codes[t]
        f = 0
        for i in range(s_lo, s_hi):
            b = _load(base_addr, base_code, i)
            e = _load(addr, code, i)
            if not ((b - b) + (e - e) == 0):  # NaN/Inf (rare: a predictable branch, no dependency chain)
                f = INPUT_BAD
            row[(_f32_bits(e - b) & np.uint32(0x7FFFFFFF)) >> np.uint32(SHIFT)] += 1
        flags[s, t] = f


def source_code(x: torch.Tensor) -> int | None:
    """The kernels' code for a source tensor, None when they cannot read it (device, dtype, layout)."""
    if x.device.type != "cpu" or not x.is_contiguous():
        return None
    return CODES.get(x.dtype)


def majority_is_exact(numel: int, pos: int, neg: int) -> bool:
    """Whether torch's float32 sum of the elected signs has the sign of the exact count pos - neg.
    Up to 2^24 entries every partial sum is an exact integer; beyond, torch's cascade keeps its
    per-lane partials below 2^24 up to 2^27 entries and rounds only in a handful of final additions,
    so a count further than numel * 2^-14 from 0 cannot change sign (a margin of hundreds of ulps)."""
    return numel <= 1 << 24 or abs(pos - neg) > numel / 2**14


def raise_non_finite(ids: list[str], name: str, tensors: list[torch.Tensor]) -> None:
    """The general path's NaN/Inf error once a kernel saw some: the base first, then the experts in
    order (each checked as the general path does, on its float32 values)."""
    from bmmstream.errors import BmmError

    for src, x in zip(ids, tensors):
        if not bool(torch.isfinite(x).all()):
            raise BmmError(f"{src}: tensor '{name}' contains NaN or Inf values")

