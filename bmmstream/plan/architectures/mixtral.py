"""Mixtral: Llama-style attention, sparse MoE MLP with one w1/w3 (in) and w2 (out) per expert."""
from bmmstream.plan.architectures.llama import ATTENTION

ARCHITECTURE = {
    "model_types": ["mixtral"],
    "rules": ATTENTION + [
        {"pattern": r"block_sparse_moe\.experts\.\d+\.(w1|w3)\.weight$", "group": "mlp_in"},
        {"pattern": r"block_sparse_moe\.experts\.\d+\.w2\.weight$", "group": "mlp_out"},
        {"pattern": r"(block_sparse_moe|mlp)\.gate\.weight$", "kind": "router"},
        # transformers >= 5 holds experts as fused 3-D tensors in memory (it saves them per expert)
        {"pattern": r"experts\.(gate_up_proj|down_proj)$",
         "refuse": "fused 3-D expert tensor; save the checkpoint with per-expert weights "
                   "(block_sparse_moe.experts.N.w1/w2/w3, as transformers' save_pretrained writes)"},
    ],
    "notes": "Every expert's w1/w3 is mlp_in and w2 mlp_out (each regressed on its own). The router "
             "(block_sparse_moe.gate) is never regressed: it takes the anchor's value, like norms.",
}
