"""TIES-Merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging
Models"; reference code github.com/prateeks/ties-merging, `ties_merging` in its notebook).

Per task, Trim the task vector to its top-`density` fraction by magnitude, Elect per entry the sign
with the larger total mass, and take the disjoint Mean of the entries that agree with it; U = scale *
that mean. Defaults follow the paper/reference: density 0.2 (k = 20%), scale (lambda) 1.0.

Threshold (`threshold`):
- "global" (default, as the reference): the reference flattens the whole model per task and keeps
  |U_t| >= the (d - int(d * density))-th smallest |U_t| (torch.kthvalue), d = all parameters. Here a
  first streaming pass (`prepass_observe`) sees every tensor of every kind (linear, embedding and
  vector, like the reference's flattened state dict) and builds per task a log-spaced histogram of
  |U_t| (bmmstream.methods.magnitude_histogram); the threshold is the lower edge of the bin holding that order statistic,
  so  tau_hist <= tau_exact < tau_hist * (1 + 2^-12)  (relative error bound 2.4e-4, on float32
  magnitudes). Entries within that sliver above tau_hist are kept too.
- "per_tensor" (mergekit's `ties`): keep exactly max(1, int(density * numel)) entries of each tensor
  per task, the largest by magnitude (the argsort rule of mergekit 0.1.5's `magnitude` sparsification).
Every tensor kind (2-D, embeddings, vectors) is merged by the same rule, as in the reference and mergekit.

Per-model parameters, as mergekit's `ties` (merge_methods/generalized_task_arithmetic.py): `density`
(each model trimmed to its own fraction; default the global `density`) and `weight` w_t (default 1).
With weights the election and the mean run on w_t * trimmed U_t: sign of sum_t w_t U_t, then
sum of the agreeing w_t U_t divided by the sum of the agreeing w_t (by 1 where none agrees); without
weights this is exactly the unweighted disjoint mean. `normalize: false` (mergekit allows it) skips
that division. A weight of 0 gives the merge without that model (its thresholds are per task).
`scale` plays mergekit's `lambda` (accepted as an alias).

Sign election: sign of the sum of the trimmed values. Where that sum is exactly 0 (exact
cancellations, common when bf16 checkpoints put deltas on a coarse grid): with threshold "global"
the reference's rule, the majority sign, taken over the tensor rather than the whole model (+1 if
that is 0 too); with "per_tensor" mergekit's rule, +1. (Measured: on a bf16 suite the two rules
differ in a few entries per tensor, which is why each mode follows its own source.)

On the CPU with float32 compute, the pipeline asks the fused kernels first
(bmmstream.methods.ties_kernels): `prepass_observe_raw` builds the same histograms from the stored
bf16/fp16/fp32 tensors and `merge_raw` (global threshold) writes the merged weight in one pass, with
the same bytes as the general path; `elect_and_mean` on contiguous float32 CPU tensors (per-tensor
threshold, DARE-TIES, Breadcrumbs-TIES, DELLA) runs the same kernel. Neither materialises T float32
task vectors or their T-fold temporaries.
"""
from __future__ import annotations

import math
import numba
import numpy as np
import torch

from bmmstream.methods import magnitude_histogram as kernels
from bmmstream.methods import ties_kernels as fused
from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, RawModule, register, weighted_combination
from bmmstream.plan.estimate import numel_of, sort_work

THRESHOLDS = ("global", "per_tensor")
# entries per step of the torch paths whose temporaries are T-fold (elect_and_mean). A multiple of
# 32768: on slices of that width torch's sum over the task axis gives the whole tensor's bits (for
# T >= 5 its order depends on the column; measured equal for T up to 13 on 1-4 threads, float32 and
# float64, odd lengths; narrower slices differ in a few entries)
ELEMENT_CHUNK = 1 << 18
ELECTION_SCRATCH_PER_ENTRY = 16  # bytes per task and chunk entry (election_scratch_bytes)


def election_scratch_bytes(matrix_shape: tuple[int, ...], tasks: int) -> int:
    """Bytes of elect_and_mean's per-chunk temporaries on its torch path (beyond MAX_TASKS experts),
    for `bmm plan`: per task and entry of a chunk, the weighted values, the selected values, the
    agreement masks and the agreeing weights (9 bytes measured in float32 without weights; 16 covers
    weights and float64 weights). The fused kernel's are negligible."""
    if tasks <= fused.MAX_TASKS:
        return 0
    return ELECTION_SCRATCH_PER_ENTRY * tasks * min(numel_of(matrix_shape), ELEMENT_CHUNK)


def elect_and_mean(
    trimmed: torch.Tensor,
    zero_sign: str = "majority",
    weights: torch.Tensor | None = None,
    normalize: bool = True,
    chunk: int = ELEMENT_CHUNK,
) -> torch.Tensor:
    """Sign election by mass and disjoint mean over the task axis 0 of trimmed task vectors.

    Where the mass is exactly 0: "majority" takes the majority of the elected signs over the tensor
    (the reference's rule, over the tensor instead of the model), "positive" takes +1 (mergekit).
    `weights` [T] (mergekit's per-model weight): the election and the mean run on w_t * trimmed_t
    and the divisor is the sum of the agreeing weights; `normalize` False: no division.

    torch's path runs `chunk` entries at a time: its masks, weighted copies and int64 counts are
    T-fold, so on a whole tensor they took ~3.7 T copies of it (38 copies at T = 8, measured). Every
    step is per entry and torch's sum over the task axis gives the same bits on slices of width a
    multiple of 32768 (tests/test_fused_ties.py), so the result is the unchunked one, bit for bit, on
    the CPU (on CUDA torch's reduction layout depends on the number of columns: not checked there)."""
    fast = _fused_elect_and_mean(trimmed, zero_sign, weights, normalize)
    if fast is not None:
        return fast
    if chunk <= 0:
        raise ValueError(f"elect_and_mean: chunk must be positive, got {chunk}")
    t_count, shape = int(trimmed.shape[0]), trimmed.shape[1:]
    n = math.prod(shape)
    if trimmed.is_contiguous() and n > chunk:
        flat = trimmed.reshape(t_count, n)
        spans = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
        parts = [flat[:, lo:hi] for lo, hi in spans]
    else:  # one step on the tensor itself (a strided input keeps its own summation layout)
        spans, parts = [(0, n)], [trimmed]

    def weighted(x: torch.Tensor) -> torch.Tensor:
        return x if weights is None else x * weights.reshape((-1,) + (1,) * (x.dim() - 1))

    # pass 1: the elected signs of the whole tensor (the majority rule needs them all)
    signs = [torch.sign(weighted(x).sum(0)) for x in parts]
    sign = signs[0] if len(parts) == 1 else torch.cat(signs).reshape(shape)
    del signs
    zero = sign == 0
    if zero_sign == "positive":
        sign = torch.where(zero, torch.ones_like(sign), sign)
    elif bool(zero.any()):
        majority = torch.sign(sign.sum())
        sign = torch.where(zero, majority if majority != 0 else torch.ones_like(majority), sign)
    del zero
    sign_flat = sign.reshape(-1) if len(parts) > 1 else sign
    out: torch.Tensor | None = None
    for (lo, hi), part in zip(spans, parts):  # pass 2: the disjoint mean, chunk by chunk
        x = weighted(part)
        sg = sign_flat[lo:hi] if len(parts) > 1 else sign
        agree = torch.where(sg > 0, x > 0, x < 0)
        selected = torch.where(agree, x, 0.0)  # a scalar 0: no T-fold zeros tensor
        if not normalize:
            r = selected.sum(0)
        elif weights is None:
            r = selected.sum(0) / agree.sum(0).clamp(min=1).to(x.dtype)
        else:
            w = weights.reshape((-1,) + (1,) * (x.dim() - 1))
            divisor = torch.where(agree, w, 0.0).sum(0)
            r = selected.sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        if len(parts) == 1:
            return r
        if out is None:
            out = torch.empty(n, dtype=r.dtype, device=r.device)
        out[lo:hi] = r
    assert out is not None
    return out.reshape(shape)


def _fused_elect_and_mean(
    trimmed: torch.Tensor, zero_sign: str, weights: torch.Tensor | None, normalize: bool
) -> torch.Tensor | None:
    """`elect_and_mean` by the fused kernel for contiguous float32 CPU task vectors (TIES' per-tensor
    threshold, DARE-TIES, Breadcrumbs-TIES, DELLA): the same bits without the T-fold temporaries
    (weighted copy, masks, selected values). None where torch must do it: another device or dtype,
    non-finite values, or more than MAX_TASKS tasks with sums that could depend on torch's order."""
    if (trimmed.device.type != "cpu" or trimmed.dtype != torch.float32 or trimmed.dim() < 1
            or not trimmed.is_contiguous() or trimmed.numel() == 0):
        return None
    if weights is not None and (weights.dtype != torch.float32 or weights.device.type != "cpu"):
        return None
    t_count, n = int(trimmed.shape[0]), int(trimmed[0].numel())
    w32 = np.ones(t_count, dtype=np.float32) if weights is None else weights.numpy().astype(np.float32)
    check_order = t_count > fused.MAX_TASKS
    if check_order and weights is not None and not fused.sums_exact_in_any_order(w32):
        return None
    stride = n * trimmed.element_size()
    addrs = np.array([trimmed.data_ptr() + t * stride for t in range(t_count)], dtype=np.int64)
    codes = np.full(t_count, fused.F32, dtype=np.int64)
    out = torch.empty(trimmed.shape[1:], dtype=torch.float32)
    stats = np.zeros(((n + fused.CHUNK - 1) // fused.CHUNK, 4), dtype=np.int64)
    # base -0.0: d = x - (-0) = x (up to the sign of a zero) and W = -0 + r * 1 = r; tau 0 keeps all
    common = (0, fused.NEG_ZERO, addrs, codes, n, np.zeros(t_count, dtype=np.float32), w32,
              weights is not None, normalize, np.float32(1.0), zero_sign == "positive", check_order)
    fused.ties_merge_kernel(*common, 1, fused.WRITE, out.data_ptr(), fused.OUT_F32, stats)
    if np.bitwise_or.reduce(stats[:, fused.FLAGS]) != 0:
        return None  # NaN/Inf or order-dependent sums: torch's own path
    if stats[:, fused.DEFERRED].any():
        pos, neg = int(stats[:, fused.POS].sum()), int(stats[:, fused.NEG].sum())
        if fused.majority_is_exact(n, pos, neg):
            majority = 1 if pos >= neg else -1
        else:
            signs = torch.empty(trimmed.shape[1:], dtype=torch.float32)
            fused.ties_merge_kernel(*common, 1, fused.SIGNS, signs.data_ptr(), fused.OUT_F32, stats)
            majority = -1 if float(torch.sign(signs.sum())) < 0 else 1
            del signs
        fused.ties_merge_kernel(*common, majority, fused.DEFERRED_ONLY, out.data_ptr(), fused.OUT_F32, stats)
        if np.bitwise_or.reduce(stats[:, fused.FLAGS]) & fused.RESULT_BAD:
            return None
    return out


def combine_sparse(
    sparse: torch.Tensor, weights: torch.Tensor | None, normalize: bool, consensus: bool, zero_sign: str = "positive"
) -> torch.Tensor:
    """mergekit's last step for sparsified task vectors: TIES sign consensus and (weighted) disjoint mean,
    or without consensus the weighted sum (divided by the weights' sum if `normalize`)."""
    if consensus:
        return elect_and_mean(sparse, zero_sign, weights, normalize)
    return weighted_combination(sparse, weights, normalize)


def topk_mask_per_tensor(deltas: torch.Tensor, density: float | list[float]) -> torch.Tensor:
    """mergekit's magnitude sparsification: per task keep the max(1, int(density * numel)) largest |U|
    (`density` one number, or one per task)."""
    t_count = deltas.shape[0]
    dens = [float(density)] * t_count if isinstance(density, (int, float)) else [float(d) for d in density]
    if all(d >= 1.0 for d in dens):
        return torch.ones_like(deltas, dtype=torch.bool)
    flat = deltas.reshape(t_count, -1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for t in range(t_count):
        if dens[t] >= 1.0:
            mask[t] = True
            continue
        k = max(1, int(dens[t] * flat.shape[1])) if flat.shape[1] else 0
        order = torch.argsort(flat[t].abs().float(), descending=True)[:k]
        mask[t, order] = True
    return mask.reshape(deltas.shape)


def global_keep_index(numel: int, density: float) -> int:
    """1-based rank (ascending) of the threshold, as the reference: k = d - int(d * density)."""
    if density >= 1.0:
        return 0
    return numel - int(numel * density)


def trim_by_threshold(deltas: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    tau = torch.tensor(thresholds, dtype=deltas.dtype, device=deltas.device)
    tau = tau.reshape((-1,) + (1,) * (deltas.dim() - 1))
    return torch.where(deltas.abs() >= tau, deltas, 0.0)


@register
class Ties(MergeMethod):
    name = "ties"
    defaults = {"density": 0.2, "scale": 1.0, "threshold": "global", "normalize": True}
    aliases = {"lambda": "scale"}
    tensor_parameters = {"weight": 1.0, "density": None}  # density: the global one

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        d = float(self.params["density"])
        if not 0.0 < d <= 1.0:
            raise BmmError(f"merge method 'ties': density must be in (0, 1], got {d}")
        if self.params["threshold"] not in THRESHOLDS:
            raise BmmError(
                f"merge method 'ties': threshold must be one of {list(THRESHOLDS)}, "
                f"got {self.params['threshold']!r}"
            )
        self.scale, self.normalize = self.finite("scale"), self.flag("normalize")
        self.needs_prepass = self.params["threshold"] == "global"
        self._counts: np.ndarray | None = None
        self._numel = 0
        self._thresholds: list[float] | None = None

    def densities(self, count: int) -> list[float]:
        """Per-task density: each model's own `density`, else the global one."""
        return self.per_model("density", count)

    # -- pass 1: per-task magnitude histograms over the whole model ------------------------
    def _task_counts(self, name: str, t_count: int, segments: int = 1) -> np.ndarray:
        """The histograms [segments, T, NUM_BINS]: one [T, NUM_BINS] block per parallel segment of the
        fused kernel (summed in `thresholds`), allocated by the first tensor seen."""
        if self._counts is None:
            self._counts = np.zeros((segments, t_count, kernels.NUM_BINS), dtype=np.int64)
        elif self._counts.shape[1] != t_count:
            raise BmmError(f"{name}: {t_count} task vectors, expected {self._counts.shape[1]}")
        return self._counts

    def prepass_observe(self, inp: ModuleInput) -> None:
        t_count = inp.deltas.shape[0]
        counts = self._task_counts(inp.spec.name, t_count)
        for t in range(t_count):
            kernels.add_magnitude_histogram(inp.deltas[t], counts[0, t])
        self._numel += inp.deltas[0].numel()
        self._thresholds = None

    def prepass_observe_raw(self, raw: RawModule) -> bool:
        """The histograms straight from the stored tensors (float32 deltas formed per entry, never as
        T full tensors); the same counts as `prepass_observe`. False (general path) for the
        per-tensor threshold or tensors the kernel cannot read."""
        if not self.needs_prepass:
            return False
        srcs = _raw_sources(raw)
        if srcs is None:
            return False
        base_addr, base_code, addrs, codes, n = srcs
        t_count = len(raw.experts)
        segments = max(1, numba.get_num_threads() // max(t_count, 1)) if n >= 1 << 20 else 1
        counts = self._task_counts(raw.spec.name, t_count, segments)
        flags = np.zeros(counts.shape[:2], dtype=np.int64)
        fused.magnitude_histogram_kernel(base_addr, base_code, addrs, codes, n, counts, flags)
        if flags.any():
            fused.raise_non_finite(raw.ids, raw.spec.name, [raw.base, *raw.experts])
        self._numel += n
        self._thresholds = None
        return True

    def prepass_state(self) -> dict:
        taus = self.thresholds()
        return {
            "thresholds": taus,
            "numel": self._numel,
            "density": float(self.params["density"]),
            "densities": self.densities(len(taus)),
            "relative_error_bound": kernels.REL_ERROR,
            "kinds": "all",
        }

    def load_prepass_state(self, state: dict) -> None:
        count = len(state["thresholds"])
        stored = [float(x) for x in state.get("densities", [state.get("density", -1)] * count)]
        wanted = self.densities(count)
        if stored != wanted:
            def show(d: list[float]) -> str:
                return str(d[0]) if len(set(d)) == 1 else str(d)

            raise BmmError(
                f"ties prepass state was computed for density {show(stored)}, config says {show(wanted)}"
            )
        self._thresholds = [float(x) for x in state["thresholds"]]
        self._numel = int(state["numel"])

    def thresholds(self) -> list[float]:
        if self._thresholds is None:
            if self._counts is None:
                raise BmmError("ties (threshold: global): no tensor was seen by the prepass")
            counts = self._counts.sum(axis=0) if self._counts.shape[0] > 1 else self._counts[0]
            dens = self.densities(len(counts))
            self._thresholds = [
                kernels.kth_smallest_from_histogram(c, global_keep_index(self._numel, d))
                for c, d in zip(counts, dens)
            ]
            self._counts = None  # 8 MiB per task, no longer needed
        return self._thresholds

    def fuses_raw(self) -> bool:
        return self.params["threshold"] == "global"

    def raw_scratch_bytes(self, tasks: int) -> int:
        # merge_raw's float32 signs where the majority sign is decided over the whole tensor (a stored
        # (d_in, d_out) tensor, GPT-2's Conv1D, needs a transposed copy of them too: 8)
        return 4

    def compute_work(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> dict[str, float]:
        if self.params["threshold"] != "per_tensor":
            return {}
        n = numel_of(matrix_shape)
        return {"sort_unstable": tasks * sort_work(n, n)}  # topk_mask_per_tensor: one argsort per task

    def working_copies(self, tasks: int) -> float:
        # measured, bench/method_memory.py (T = 2, 4, 8): per tensor, one task's argsort (|U| in
        # float32, the sorted values, int64 indices) beside the T-fold mask, then the T trimmed task
        # vectors, the result and the weight; global (the general path, where the fused kernel
        # declines), the trimmed task vectors, the result and the weight, plus the chunked election's
        # full-size signs beyond MAX_TASKS experts
        if self.params["threshold"] == "per_tensor":
            return max(0.25 * tasks + 8.5, 1.25 * tasks + 2.5)
        return tasks + 2.5 + (1.5 if tasks > fused.MAX_TASKS else 0.0)

    def extra_bytes(self, matrix_shape: tuple[int, ...], kind: str, tasks: int) -> int:
        return election_scratch_bytes(matrix_shape, tasks)

    # -- pass 2 ----------------------------------------------------------------------------
    def trim(self, inp: ModuleInput) -> torch.Tensor:
        deltas = inp.deltas
        if self.params["threshold"] == "per_tensor":
            mask = topk_mask_per_tensor(deltas, self.densities(deltas.shape[0]))
            return torch.where(mask, deltas, 0.0)
        taus = self.thresholds()
        if len(taus) != deltas.shape[0]:
            raise BmmError(f"{inp.spec.name}: {deltas.shape[0]} task vectors, prepass saw {len(taus)}")
        return trim_by_threshold(deltas, taus)

    def merge_raw(self, raw: RawModule, out_dtype: torch.dtype) -> torch.Tensor | None:
        """The merged weight by the fused kernel (bmmstream.methods.ties_kernels), global threshold
        only: the same bytes as the general path in float32. None where the general path must run:
        per-tensor threshold, unreadable dtypes or layouts, an overflow to Inf (the general path then
        computes it its own way), or, beyond `MAX_TASKS` experts, an entry whose float32 sums over
        the experts could depend on the order torch adds them in."""
        t_count = len(raw.experts)
        if self.params["threshold"] != "global" or t_count < 1:
            return None
        if not out_dtype.is_floating_point:
            return None
        srcs = _raw_sources(raw)
        if srcs is None:
            return None
        base_addr, base_code, addrs, codes, n = srcs
        taus = self.thresholds()
        if len(taus) != t_count:
            return None  # the general path raises its error
        weights = self.model_values("weight", 1.0, t_count)
        w32 = np.array(weights if weights is not None else [1.0] * t_count, dtype=np.float32)
        tau32 = np.array(taus, dtype=np.float32)
        check_order = t_count > fused.MAX_TASKS  # torch's sum order over the experts is no longer ours
        if check_order and weights is not None and not fused.sums_exact_in_any_order(w32):
            return None  # the sum of the agreeing weights could depend on torch's order
        out_code = {torch.bfloat16: fused.OUT_BF16, torch.float32: fused.OUT_F32}.get(out_dtype)
        out = torch.empty(raw.base.shape, dtype=out_dtype if out_code is not None else torch.float32)
        stats = np.zeros(((n + fused.CHUNK - 1) // fused.CHUNK, 4), dtype=np.int64)
        common = (base_addr, base_code, addrs, codes, n, tau32, w32, weights is not None, self.normalize,
                  np.float32(self.scale), False, check_order)
        code = fused.OUT_F32 if out_code is None else out_code
        fused.ties_merge_kernel(*common, 1, fused.WRITE, out.data_ptr(), code, stats)
        flags = np.bitwise_or.reduce(stats[:, fused.FLAGS]) if len(stats) else 0
        if flags & fused.INPUT_BAD:
            fused.raise_non_finite(raw.ids, raw.spec.name, [raw.base, *raw.experts])
        if flags & (fused.RESULT_BAD | fused.ORDER_BAD):
            return None
        if stats[:, fused.DEFERRED].any():
            pos, neg = int(stats[:, fused.POS].sum()), int(stats[:, fused.NEG].sum())
            if fused.majority_is_exact(n, pos, neg):
                majority = 1 if pos >= neg else -1
            else:  # torch's own float32 sum of the signs, in the general path's layout
                signs = torch.empty(raw.base.shape, dtype=torch.float32)
                fused.ties_merge_kernel(*common, 1, fused.SIGNS, signs.data_ptr(), fused.OUT_F32, stats)
                if raw.spec.transposed:
                    signs = signs.T.contiguous()
                majority = -1 if float(torch.sign(signs.sum())) < 0 else 1
                del signs
            fused.ties_merge_kernel(*common, majority, fused.DEFERRED_ONLY, out.data_ptr(), code, stats)
            if np.bitwise_or.reduce(stats[:, fused.FLAGS]) & fused.RESULT_BAD:
                return None
        return out if out_code is not None else out.to(out_dtype)

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        zero_sign = "positive" if self.params["threshold"] == "per_tensor" else "majority"
        merged = elect_and_mean(self.trim(inp), zero_sign, self.model_weights(inp), self.normalize)
        return self.scale * merged


def _raw_sources(raw: RawModule) -> tuple[int, int, np.ndarray, np.ndarray, int] | None:
    """(base address, base code, expert addresses, expert codes, numel) for the fused kernels, or None
    when some tensor is not a contiguous CPU float tensor of the base's shape. The tensors stay
    referenced by `raw` while a kernel reads them."""
    tensors = [raw.base, *raw.experts]
    codes = [fused.source_code(x) for x in tensors]
    if any(c is None for c in codes) or any(x.shape != raw.base.shape for x in raw.experts):
        return None
    n = raw.base.numel()
    if n == 0:
        return None
    addrs = np.array([x.data_ptr() for x in raw.experts], dtype=np.int64)
    return raw.base.data_ptr(), codes[0], addrs, np.array(codes[1:], dtype=np.int64), n
