"""WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors"; reference code github.com/nathanielyvo/WUDI-Merging,
`get_redundant_task_vector`; also FusionBench's `wudi_merging`).

Per 2-D weight, starting from U = sum_t U_t, minimise
    L(U) = sum_t ||(U - U_t) U_t^T||_F^2 / ||U_t||_F^2
with Adam (torch.optim.Adam's update rule, reference defaults lr 1e-5, 300 steps, betas (0.9, 0.999), eps 1e-8,
no weight decay). The reference forms the d_out x d_out products every step; here everything goes
through d_in x d_in Grams computed once: with A_t = U_t^T U_t / ||U_t||^2,
    L(U) = sum_t tr((U - U_t) A_t (U - U_t)^T),   dL/dU = 2 (U A - B),
    A = sum_t A_t (d_in x d_in),  B = sum_t U_t A_t (d_out x d_in),
so a step costs one (d_out x d_in) @ (d_in x d_in) product. Optimisation runs in float32 at least.

Non-2-D tensors ("vector"): the mean of the task vectors, merged = W_pre + (1/T) sum_t U_t, as
FusionBench's `wudi_merging` (tanganke/fusion_bench, fusion_bench/method/wudi/wudi.py at commit e41de5a, lines 55-56: every tensor it does not
optimise is divided by the number of task vectors after starting from their sum). Embeddings/lm_head
("embedding"): not optimised either, so also the mean (FusionBench's rule for excluded keys): their
layout is (vocab, hidden), the transpose of a linear map on one-hot inputs, so WUDI's premise (rows of
U_t span the layer's inputs) does not hold; the LLM ports exclude them. A task vector that is exactly zero
carries no information and is left out of L (the reference would divide by zero).
No scaling coefficient: WUDI is designed to need none.
"""
from __future__ import annotations

import torch

from bmmstream.errors import BmmError
from bmmstream.methods.registry import MergeMethod, ModuleInput, register
from bmmstream.methods.tsv import merge_batched


def wudi_statistics(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sum_t U_t^T U_t / ||U_t||^2 and B = sum_t U_t A_t for stacked [..., T, m, n]."""
    t_count, m, n = deltas.shape[-3:]
    lead = deltas.shape[:-3]
    a = torch.zeros(*lead, n, n, dtype=deltas.dtype, device=deltas.device)
    b = torch.zeros(*lead, m, n, dtype=deltas.dtype, device=deltas.device)
    for t in range(t_count):
        u = deltas[..., t, :, :]
        norm2 = u.pow(2).sum((-2, -1), keepdim=True)
        a_t = (u.transpose(-1, -2) @ u) / torch.where(norm2 > 0, norm2, torch.ones_like(norm2))
        a += a_t
        b += u @ a_t
    return a, b


def wudi_merge(deltas: torch.Tensor, lr: float = 1e-5, steps: int = 300, losses: list | None = None) -> torch.Tensor:
    """WUDI of stacked task vectors [..., T, m, n] -> [..., m, n].

    If `losses` is a list, L(U) (summed over leading dims, up to the constant sum_t tr(U_t A_t U_t^T))
    is appended before every step and after the last."""
    dt = deltas.dtype
    x = deltas.float() if dt in (torch.float16, torch.bfloat16) else deltas
    a, b = wudi_statistics(x)
    u = x.sum(-3).clone()
    m1, m2 = torch.zeros_like(u), torch.zeros_like(u)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for i in range(steps + 1):
        ua = u @ a
        if losses is not None:
            losses.append(float((ua * u).sum() - 2 * (b * u).sum()))
        if i == steps:
            break
        g = 2 * (ua - b)
        # torch.optim.Adam's update, written out so it runs under no_grad/inference_mode alike
        m1.mul_(beta1).add_(g, alpha=1 - beta1)
        m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        c1, c2 = 1 - beta1 ** (i + 1), 1 - beta2 ** (i + 1)
        u.addcdiv_(m1, (m2.sqrt() / c2**0.5).add_(eps), value=-lr / c1)
    return u.to(dt)


@register
class Wudi(MergeMethod):
    name = "wudi"
    defaults = {"lr": 1e-5, "steps": 300}

    def __init__(self, params: dict | None = None, *, seed: int = 0, models=None):
        super().__init__(params, seed=seed, models=models)
        if int(self.params["steps"]) < 0 or float(self.params["lr"]) <= 0:
            raise BmmError(f"merge method 'wudi': need steps >= 0 and lr > 0, got {self.params}")

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        return self.merge_unit([inp])[inp.spec.name]

    def merge_unit(self, inputs: list[ModuleInput]) -> dict[str, torch.Tensor]:
        lr, steps = float(self.params["lr"]), int(self.params["steps"])
        return merge_batched(inputs, lambda d: wudi_merge(d, lr, steps), lambda inp: inp.deltas.mean(0))
